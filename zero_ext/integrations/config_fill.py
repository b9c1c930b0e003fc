"""Completing a zero_ext config from a trainer's own settings, library-neutral.

A trainer (the Hugging Face Trainer, Lightning) has its own batch size, accumulation, clipping
and precision, which its loop depends on; the zero_ext config must agree with them. A
:class:`ConfigFiller` takes a trainer's value where the config says "auto" (or leaves the key
out) and collects every explicit value that contradicts one, so that the integration raises
them together, in one error. No third-party import: every integration can use it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["AUTO", "AUTO_IS_A_VALUE", "ConfigFiller", "hidden_size_defaults",
           "model_hidden_size", "same"]

AUTO = "auto"
# Keys whose "auto" is DeepSpeed's own value, not a placeholder for a trainer to fill
AUTO_IS_A_VALUE = {"data_types.keep_in_fp32_modules"}
_ABSENT = object()


def same(a: Any, b: Any) -> bool:
    """Config equality: numbers compared with a relative tolerance, bools only to bools."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def model_hidden_size(model) -> int | None:
    """The width HF's DeepSpeed integration sizes "auto" buckets from: the model config's
    `hidden_size`, else the largest of its `hidden_sizes`, else the same of its `text_config`
    (multimodal models: Gemma 3, LLaVA, Qwen2-VL); None where there is none."""
    config = getattr(model, "config", None)
    for source in (config, getattr(config, "text_config", None)):
        if source is None:
            continue
        if getattr(source, "hidden_size", None):
            return source.hidden_size
        if getattr(source, "hidden_sizes", None):
            return max(source.hidden_sizes)
    return None


def hidden_size_defaults(hidden_size: int) -> list[tuple[str, int, str]]:
    """(dotted path, value, how it was derived) for the zero_optimization keys DeepSpeed's
    Trainer integration sizes from the model's width when they are "auto"."""
    return [("zero_optimization.reduce_bucket_size", hidden_size * hidden_size,
             "hidden_size**2"),
            ("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size),
             "0.9 * hidden_size**2"),
            ("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size,
             "10 * hidden_size")]


class ConfigFiller:
    """Fills one copy of a config dict and collects every contradiction before raising."""

    def __init__(self, config: Mapping):
        self.config = copy.deepcopy(dict(config))
        self.mismatches: list[str] = []

    def fill(self, path: str, value: Any, source: str, *, fill_absent: bool = True,
             must_match: bool = True) -> None:
        """`path` (dotted) becomes `value` when it is "auto", or absent and `fill_absent`;
        an explicit value must equal `value` when `must_match`."""
        *parents, key = path.split(".")
        section = self.config
        for name in parents:
            if not isinstance(section.get(name), dict):
                if not fill_absent or section.get(name, None) is not None:
                    return
                section[name] = {}
            section = section[name]
        current = section.get(key, _ABSENT)
        if current == AUTO or (current is _ABSENT and fill_absent):
            section[key] = value
        elif current is not _ABSENT and must_match and not same(current, value):
            self.mismatches.append(f"{path} is {current!r} in the config, but {source} is "
                                   f"{value!r}")

    def leftover_autos(self) -> list[str]:
        found = []

        def walk(node, prefix):
            for key, value in node.items():
                path = f"{prefix}{key}"
                if isinstance(value, dict):
                    walk(value, path + ".")
                elif value == AUTO and path not in AUTO_IS_A_VALUE:
                    found.append(path)

        walk(self.config, "")
        return found

    def finish(self, owner: str, settings: str) -> dict:
        """The filled config; or one ValueError, from `owner` (e.g. "ZeroTrainer"), listing
        every contradiction and every "auto" that none of the `settings` (e.g. "the
        TrainingArguments") fills."""
        problems = [f"  - {m}" for m in self.mismatches]
        problems += [f"  - {path} is \"auto\", but no value of {settings} corresponds to it; "
                     "give a value" for path in self.leftover_autos()]
        if problems:
            raise ValueError(
                f"{owner}: the zero_ext config does not agree with {settings}:\n"
                + "\n".join(problems) + f"\nSet those keys to \"auto\" (or remove them) to "
                f"take the values of {settings}, or change {settings} to match the config.")
        return self.config
