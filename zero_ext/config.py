"""zero_ext.config: the training configuration, read from DeepSpeed-style JSON.

``zero_ext.initialize`` passes whatever the user gave as ``config`` (a dict, a path to a JSON
file, or a :class:`ZeroConfig`) to :meth:`ZeroConfig.load`; the engine, the sharded optimizer,
the loss scaler and :mod:`zero_ext.lr_schedules` read the result. Each section of a DeepSpeed
config is one dataclass here, and an existing ``ds_config.json`` loads unchanged as long as it
only asks for what zero_ext implements.

How keys are treated, in every section:

* keys zero_ext implements are the dataclass fields; their values are type- and range-checked,
  strings converted as DeepSpeed's pydantic models convert them ("2" is 2, "on" is true);
* DeepSpeed keys that have no effect on the result of training (monitoring, profiling, NVMe
  tuning, ...) are accepted and ignored, and one warning names all of them;
* DeepSpeed keys that would change training and that zero_ext does not implement are accepted
  only at their inert value (``"prescale_gradients": false``); any other value is an error
  saying what to do instead;
* any other key is an error naming the nearest valid key (a warning in the sections DeepSpeed
  reads key by key, ignoring the rest: activation_checkpointing, data_types);
* ``"auto"`` (a Hugging Face Trainer placeholder) is an error outside that integration.

Every error is a :class:`ConfigError` (a ``ValueError``) whose message starts with the dotted
path of the offending key, e.g. ``zero_optimization.stage: expected an integer in 0..3, got 4``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

__all__ = [
    "ActivationCheckpointingConfig",
    "AdamParams",
    "BF16Config",
    "BatchSizes",
    "CompressionPlan",
    "CompressionSettings",
    "ConfigError",
    "FP16Config",
    "GradientCompressionSettings",
    "OffloadConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "WeightCompressionSettings",
    "ZeroConfig",
    "ZeroOptimizationConfig",
    "read_json_config",
    "validate_scheduler_params",
]


class ConfigError(ValueError):
    """A configuration value zero_ext cannot accept.

    ``str(error)`` is ``"<dotted.key.path>: <what was expected, what came, how to fix it>"``;
    ``path`` and ``detail`` hold the two parts.
    """

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: {detail}" if path else detail)
        self.path = path
        self.detail = detail

    def __reduce__(self):
        # Errors cross process boundaries in the distributed test harness: pickle both parts.
        return (type(self), (self.path, self.detail))

    def under(self, prefix: str) -> ConfigError:
        """The same error for a key that sits inside the section at ``prefix``."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.path}" if self.path else prefix, self.detail)


# --------------------------------------------------------------------------------------------
# Value checks. Each takes the key's path (for the message) and the raw value, and returns the
# value in its canonical Python type. Values are converted as DeepSpeed's pydantic models
# (pydantic v2, lax mode) convert them: "2" is 2, "128" is 128.0, "on" and 1 are true; what
# pydantic refuses ("5e8" for an integer, 2 for a bool) is an error naming the value as given.
# --------------------------------------------------------------------------------------------

_AUTO_DETAIL = (
    "'auto' is filled in by the Hugging Face Trainer integration "
    "(zero_ext.integrations.transformers); outside it, give a value"
)


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _reject_auto(path: str, value: Any) -> None:
    if isinstance(value, str) and value == "auto":
        raise ConfigError(path, _AUTO_DETAIL)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The strings pydantic reads as a bool, in any case (no surrounding whitespace).
_BOOL_STRINGS = {"true": True, "t": True, "yes": True, "y": True, "on": True, "1": True,
                 "false": False, "f": False, "no": False, "n": False, "off": False, "0": False}

# An integer as pydantic reads one from a string: ASCII digits with single underscores between
# them, a sign, a fraction of zeros ("2.0"), whitespace around; not "5e8", "2.5" or "2.".
_INT_STRING = re.compile(r"\s*[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?\s*")


def _bool_from(value: Any) -> Any:
    """``value`` as the bool pydantic reads from it (true/false, 0/1, a string of
    ``_BOOL_STRINGS``), else ``value`` unchanged."""
    if isinstance(value, bool):
        return value
    if _is_number(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return _BOOL_STRINGS.get(value.lower(), value)
    return value


def _number_from(value: Any, *, integer: bool) -> Any:
    """A numeric string as the int (``integer``) or float pydantic reads from it, else
    ``value`` unchanged (numbers too: the checks below take them as they are)."""
    if not isinstance(value, str) or not value.isascii():
        return value
    if integer and not _INT_STRING.fullmatch(value):
        return value
    try:
        # float: "1e3", "2.", "inf" (refused later as not finite); int: past Python's digit
        # limit a ValueError, refused as given
        return int(value.strip().split(".")[0]) if integer else float(value)
    except ValueError:
        return value


def _range_text(kind: str, lo, hi, lo_open: bool, hi_open: bool) -> str:
    lo, hi = (None if b is None else f"{b:g}" for b in (lo, hi))
    if lo is not None and hi is not None:
        if kind == "an integer":
            return f"{kind} in {lo}..{hi}"
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind


def _in_range(value, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    if lo is not None and (value <= lo if lo_open else value < lo):
        return False
    return hi is None or (value < hi if hi_open else value <= hi)


def _check_bool(path: str, value: Any, *, strings: bool = True) -> bool:
    """``value`` as a bool: JSON true/false, 0 or 1, or (``strings``) "true"/"false",
    "yes"/"no", "on"/"off", "t"/"f", "y"/"n", "1"/"0" in any case, as pydantic reads them.

    ``strings=False`` for keys DeepSpeed passes on as given, without a pydantic model
    (optimizer.params, activation_checkpointing), where a non-empty string counts as true:
    "false" there means true in DeepSpeed, so any string is an error here rather than a value
    read the other way round (0 and 1 mean the same in both)."""
    _reject_auto(path, value)
    if isinstance(value, str) and not strings:
        raise ConfigError(path, f"expected true or false, {_got(value)}: DeepSpeed reads this "
                          "key as given, where any non-empty string counts as true; write "
                          "JSON true or false")
    flag = _bool_from(value)
    if not isinstance(flag, bool):
        raise ConfigError(path, f"expected true or false, {_got(value)}")
    return flag


def _check_int(path: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int: an int, an integral float (``5e8`` in JSON) or an integer string
    ("500000000", "2"); ``5.5`` and "5e8" are errors, as in pydantic."""
    _reject_auto(path, value)
    expected = _range_text("an integer", lo, hi, False, False)
    number = _number_from(value, integer=True)
    integral = _is_number(number) and (
        isinstance(number, int) or (math.isfinite(number) and number.is_integer()))
    if not integral or not _in_range(number, lo, hi, False, False):
        raise ConfigError(path, f"expected {expected}, {_got(value)}")
    return int(number)


def _check_number(
    path: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a finite float within the given bounds (open or closed): a number or a
    numeric string ("128", "1e-4")."""
    _reject_auto(path, value)
    expected = _range_text("a number", lo, hi, lo_open, hi_open)
    number = _number_from(value, integer=False)
    if (not _is_number(number) or not math.isfinite(number)
            or not _in_range(number, lo, hi, lo_open, hi_open)):
        raise ConfigError(path, f"expected {expected}, {_got(value)}")
    return float(number)


def _check_choice(path: str, value: Any, spellings: Mapping[str, str]) -> str:
    """The canonical name for ``value``, looked up case-insensitively in ``spellings``
    (lower-case spelling -> canonical name)."""
    _reject_auto(path, value)
    canonical = spellings.get(value.lower()) if isinstance(value, str) else None
    if canonical is None:
        names = ", ".join(repr(name) for name in dict.fromkeys(spellings.values()))
        raise ConfigError(path, f"expected one of {names}, {_got(value)}")
    return canonical


def _optional(check: Callable[..., Any], path: str, value: Any, **bounds) -> Any:
    return None if value is None else check(path, value, **bounds)


# --------------------------------------------------------------------------------------------
# Parsing shared by every section.
# --------------------------------------------------------------------------------------------


class _Unsupported(NamedTuple):
    """A DeepSpeed key whose feature zero_ext lacks: accepted while it leaves training as is."""

    is_inert: Callable[[Any], bool]
    """True for the value(s) that change nothing (usually DeepSpeed's default)."""

    detail: str
    """The error for any other value: what is not supported and what to do instead."""


def _is(inert_value: Any) -> Callable[[Any], bool]:
    """A predicate: the key holds ``inert_value`` (numbers compared by value, bools exactly)."""
    if isinstance(inert_value, bool) or inert_value is None:
        return lambda value: value is inert_value
    return lambda value: _is_number(value) and value == inert_value


def _switched_off(flag: str = "enabled") -> Callable[[Any], bool]:
    """A predicate: the key holds a feature block whose ``flag`` is false or absent."""
    return lambda value: isinstance(value, Mapping) and value.get(flag, False) is False


def _never(value: Any) -> bool:
    return False


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_IGNORED = "these DeepSpeed keys have no effect in zero_ext and are ignored"


def _warn_keys(notes: list[str], headline: str = _IGNORED) -> None:
    """One warning about config keys, `headline`: then each of `notes`."""
    # Once per job, not once per rank: every rank parses the same config, rank 0 speaks
    # (torchrun's RANK is set before the script runs, so this holds before init_distributed).
    if not notes or os.environ.get("RANK", "0") != "0":
        return
    # Point the warning at the first caller outside zero_ext (the user's script).
    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package_dir):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"zero_ext config: {headline}: " + "; ".join(notes), UserWarning,
                  stacklevel=level)


class _Section:
    """Parsing and serialisation shared by the config dataclasses (a mixin; no fields).

    Subclasses describe their DeepSpeed keys beyond their fields in four class tables:
    ``_ALIASES`` (other spelling -> field), ``_SECTIONS`` (field -> nested section class),
    ``_IGNORED`` (key without effect -> note for the warning, may be empty) and ``_INERT``
    (key of a feature zero_ext lacks -> :class:`_Unsupported`). ``_NO_EFFECT`` names fields
    kept for DeepSpeed's sake whose other values zero_ext does not act on (field -> note): a
    value other than the default joins the warning about ignored keys. ``_PYDANTIC`` marks a
    section DeepSpeed validates with a pydantic model, which reads "false" or 0 as false: so
    are the values of its ``_INERT`` keys read. ``_UNKNOWN_IGNORED`` marks a section DeepSpeed
    reads key by key, ignoring any other: an unknown key there is warned about, not refused.
    """

    _ALIASES: ClassVar[dict[str, str]] = {}
    _SECTIONS: ClassVar[dict[str, type]] = {}
    _IGNORED: ClassVar[dict[str, str]] = {}
    _INERT: ClassVar[dict[str, _Unsupported]] = {}
    _NO_EFFECT: ClassVar[dict[str, str]] = {}
    _PYDANTIC: ClassVar[bool] = False
    _UNKNOWN_IGNORED: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build the section from its JSON object; ``data`` is not modified."""
        notes: list[str] = []
        section = cls._parse(data, "", notes)
        _warn_keys(notes)
        return section

    @classmethod
    def _parse(cls, data: Any, path: str, notes: list[str]):
        """The section at ``path`` from ``data``; ignored keys are appended to ``notes``."""
        if not isinstance(data, Mapping):
            raise ConfigError(path or "config", f"expected a JSON object, {_got(data)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        unknown: list[str] = []
        for key, value in data.items():
            key_path = _join(path, str(key))
            name = cls._ALIASES.get(key, key)
            if name in fields:
                if name in kwargs:
                    raise ConfigError(
                        key_path, f"given twice, also as {given_as[name]!r}; keep one of them")
                section_cls = cls._SECTIONS.get(name)
                if section_cls is not None and isinstance(value, Mapping):
                    value = section_cls._parse(value, key_path, notes)
                kwargs[name] = value
                given_as[name] = key
            elif key in cls._IGNORED:
                note = cls._IGNORED[key]
                notes.append(f"{key_path} ({note})" if note else key_path)
            elif key in cls._INERT:
                _reject_auto(key_path, value)
                is_inert, detail = cls._INERT[key]
                if not is_inert(_bool_from(value) if cls._PYDANTIC else value):
                    raise ConfigError(key_path, detail)
            elif cls._UNKNOWN_IGNORED:
                unknown.append(f"{key_path} ({cls._unknown_key_detail(str(key), fields)})")
            else:
                raise ConfigError(key_path, cls._unknown_key_detail(str(key), fields))
        _warn_keys(unknown, headline="unknown keys, ignored as DeepSpeed ignores them in this "
                                     "section")
        for f in dataclasses.fields(cls):
            if (f.name not in kwargs and f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING):
                raise ConfigError(_join(path, f.name), "missing; this section requires it")
        try:
            section = cls(**kwargs)
        except ConfigError as error:
            raise error.under(path) from None
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for name, note in cls._NO_EFFECT.items():
            value = getattr(section, name)
            if name in kwargs and value != defaults[name]:
                notes.append(f"{_join(path, given_as[name])} = {json.dumps(value)} ({note})")
        return section

    @classmethod
    def _unknown_key_detail(cls, key: str, fields: set[str]) -> str:
        known = fields | set(cls._ALIASES) | set(cls._IGNORED) | set(cls._INERT)
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        if close:
            return f"unknown key; did you mean {close[0]!r}?"
        return f"unknown key; the keys zero_ext reads here are: {', '.join(sorted(fields))}"

    def to_dict(self) -> dict[str, Any]:
        """The section as JSON-serialisable data under DeepSpeed's key names; ``None`` values
        are left out, so the result is also a valid DeepSpeed config section."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = json.loads(json.dumps(value))  # a deep, JSON-clean copy
            out[f.name] = value
        return out


def _section(path: str, value: Any, section_cls: type, *, optional: bool = False):
    """``value`` as a ``section_cls``: instances pass, mappings are parsed (for dataclasses built
    directly in Python; config files reach here already parsed)."""
    if value is None and optional:
        return None
    if isinstance(value, section_cls):
        return value
    if isinstance(value, Mapping):
        try:
            return section_cls.from_dict(value)
        except ConfigError as error:
            raise error.under(path) from None
    _reject_auto(path, value)
    raise ConfigError(path, f"expected a JSON object of {path} settings, {_got(value)}")


# --------------------------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class AdamParams(_Section):
    """``optimizer.params``: the hyperparameters of zero_ext's Adam/AdamW."""

    lr: float = 1e-3
    """Learning rate (>= 0). A scheduler, if configured, overrides it step by step."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moment estimates, each in [0, 1)."""

    eps: float = 1e-8
    """Added to the denominator for numerical stability (>= 0)."""

    weight_decay: float | None = None
    """Weight decay coefficient (>= 0): decoupled (AdamW) or an L2 term, see ``adam_w_mode``.
    Unset, it is what DeepSpeed's optimizer for these params defaults to: 0 for its FusedAdam
    and DeepSpeedCPUAdam, 0.01 with ``torch_adam`` (torch.optim.AdamW's; torch.optim.Adam's is
    0). After loading it always holds a number."""

    bias_correction: bool = True
    """Divide the moment estimates by ``1 - beta**step`` (DeepSpeed's option)."""

    adam_w_mode: bool = True
    """DeepSpeed's switch for type "Adam": true applies weight decay decoupled (AdamW), false
    adds it to the gradient as an L2 term (torch.optim.Adam). For type "AdamW" it must be true."""

    torch_adam: bool = False
    """DeepSpeed's switch from its fused Adam to torch.optim.AdamW (Adam when ``adam_w_mode`` is
    false). Honoured where it changes training: ``weight_decay`` then defaults to torch's, and
    ``bias_correction`` must stay true (torch has no such option, DeepSpeed fails on it). The
    step itself runs zero_ext's C++ Adam, the same arithmetic as torch's."""

    _IGNORED: ClassVar[dict[str, str]] = {
        "set_grad_none": "zero_ext always frees gradients after the step",
        "foreach": "kernel choice only",
        "fused": "kernel choice only",
    }
    _INERT: ClassVar[dict[str, _Unsupported]] = {
        "amsgrad": _Unsupported(
            _is(False),
            "true is not supported (zero_ext's Adam has no AMSGrad variant); remove the key, "
            "or pass your own optimizer to initialize()"),
        "maximize": _Unsupported(_is(False), "true is not supported; negate the loss instead"),
        "fp32_optimizer_states": _Unsupported(
            _is(True),
            "false is not supported: zero_ext keeps optimizer states in fp32; remove the key"),
        "max_grad_norm": _Unsupported(
            _never,
            "not an optimizer parameter; clip gradients with the top-level key "
            "\"gradient_clipping\": <max norm>"),
    }

    def __post_init__(self):
        self.lr = _check_number("lr", self.lr, lo=0.0)
        betas = self.betas
        _reject_auto("betas", betas)
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError("betas", f"expected a list of two numbers [beta1, beta2], "
                              f"{_got(betas)}")
        self.betas = tuple(
            _check_number(f"betas[{i}]", beta, lo=0.0, hi=1.0, hi_open=True)
            for i, beta in enumerate(betas))
        self.eps = _check_number("eps", self.eps, lo=0.0)
        # DeepSpeed hands these to the optimizer as given (a string there is true).
        self.bias_correction = _check_bool("bias_correction", self.bias_correction,
                                           strings=False)
        self.adam_w_mode = _check_bool("adam_w_mode", self.adam_w_mode, strings=False)
        self.torch_adam = _check_bool("torch_adam", self.torch_adam, strings=False)
        if self.weight_decay is None:
            self.weight_decay = 0.01 if self.torch_adam and self.adam_w_mode else 0.0
        self.weight_decay = _check_number("weight_decay", self.weight_decay, lo=0.0)
        if self.torch_adam and not self.bias_correction:
            raise ConfigError(
                "bias_correction", "false needs DeepSpeed's own Adam; with torch_adam true the "
                "optimizer is torch's, which always corrects the bias (DeepSpeed raises a "
                "TypeError here). Remove bias_correction or torch_adam")


_OPTIMIZER_TYPES = {"adamw": "AdamW", "adam": "Adam"}


@dataclass(kw_only=True)
class OptimizerConfig(_Section):
    """``optimizer``: which optimizer the engine builds over the (sharded) fp32 master weights."""

    type: str = "AdamW"
    """"AdamW" or "Adam" (any case). "Adam" means AdamW too unless ``params.adam_w_mode`` is
    false, as in DeepSpeed. For any other optimizer, pass one to ``initialize(optimizer=...)``."""

    params: AdamParams = field(default_factory=AdamParams)
    """The optimizer's hyperparameters."""

    _SECTIONS: ClassVar[dict[str, type]] = {"params": AdamParams}
    _IGNORED: ClassVar[dict[str, str]] = {
        "legacy_fusion": "",
        "adam_w_mode": "DeepSpeed reads adam_w_mode only inside optimizer.params",
        "torch_adam": "DeepSpeed reads torch_adam only inside optimizer.params",
    }

    def __post_init__(self):
        _reject_auto("type", self.type)
        name = _OPTIMIZER_TYPES.get(self.type.lower()) if isinstance(self.type, str) else None
        if name is None:
            raise ConfigError(
                "type",
                f"{self.type!r} is not supported; the config can build 'AdamW' or 'Adam'. For "
                "another optimizer, drop the \"optimizer\" section and pass one: "
                "zero_ext.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), "
                "lr=...), config=...)")
        self.type = name
        self.params = _section("params", self.params, AdamParams)
        if name == "AdamW" and not self.params.adam_w_mode:
            raise ConfigError(
                "params.adam_w_mode",
                "false contradicts type 'AdamW' (decoupled weight decay); for Adam with L2 "
                "weight decay write \"type\": \"Adam\" with \"adam_w_mode\": false")

    @property
    def decoupled_weight_decay(self) -> bool:
        """True for AdamW-style (decoupled) weight decay, False for an L2 term (torch Adam)."""
        return self.type == "AdamW" or self.params.adam_w_mode


# Parameters of each supported scheduler: name -> default, _REQUIRED where there is none.
# These are DeepSpeed 0.19's constructor defaults; zero_ext.lr_schedules' signatures repeat
# them (tests check the two agree).
_REQUIRED = object()
SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    "WarmupLR": {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": None,  # None: each parameter group's lr
        "warmup_num_steps": 1000,
        "warmup_type": "log",
        "last_batch_iteration": -1,  # the position the schedule starts at (-1: its start)
    },
    "WarmupDecayLR": {
        "total_num_steps": _REQUIRED,
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 0.001,  # None (given): each parameter group's lr, as WarmupLR's
        "warmup_num_steps": 1000,
        "warmup_type": "log",
        "last_batch_iteration": -1,
    },
    "WarmupCosineLR": {
        "total_num_steps": _REQUIRED,
        "warmup_min_ratio": 0.0,
        "warmup_num_steps": 1000,
        "cos_min_ratio": 0.0001,
        "warmup_type": "log",
        "last_batch_iteration": -1,
    },
}
_SCHEDULER_TYPES = {name.lower(): name for name in SCHEDULER_DEFAULTS}
_WARMUP_TYPES = {"log": "log", "linear": "linear"}


def _check_lr_values(path: str, value: Any, *, allow_none: bool) -> Any:
    """A learning rate >= 0, or a list of them (one per parameter group), or None if allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(path, "expected a number or a non-empty list (one per parameter "
                              f"group), {_got(value)}")
        return [_check_number(f"{path}[{i}]", v, lo=0.0) for i, v in enumerate(value)]
    return _check_number(path, value, lo=0.0)


def validate_scheduler_params(type_name: str, params: Mapping[str, Any], *,
                              path: str = "") -> dict[str, Any]:
    """The complete parameters of scheduler ``type_name`` (a canonical name from
    ``SCHEDULER_DEFAULTS``): ``params`` checked, normalised and completed with the defaults.
    Errors name ``<path>.<parameter>``. Used by SchedulerConfig and by the scheduler classes."""
    defaults = SCHEDULER_DEFAULTS[type_name]
    if not isinstance(params, Mapping):
        raise ConfigError(path or "params", f"expected a JSON object, {_got(params)}")
    for key in params:
        if key not in defaults:
            close = difflib.get_close_matches(str(key), sorted(defaults), n=1, cutoff=0.6)
            hint = (f"did you mean {close[0]!r}?" if close
                    else f"{type_name} takes: {', '.join(defaults)}")
            raise ConfigError(_join(path, str(key)), f"unknown key for {type_name}; {hint}")
    out: dict[str, Any] = {}
    for name, default in defaults.items():
        key_path = _join(path, name)
        if name not in params:
            if default is _REQUIRED:
                raise ConfigError(key_path, f"required by {type_name}: the number of optimizer "
                                  "steps of the whole run, at which the schedule ends")
            out[name] = default
            continue
        value = params[name]
        if name in ("warmup_min_lr", "warmup_max_lr"):
            # warmup_max_lr None is each group's lr, for WarmupDecayLR too (it inherits
            # WarmupLR's constructor in DeepSpeed)
            value = _check_lr_values(key_path, value, allow_none=name == "warmup_max_lr")
        elif name in ("warmup_num_steps", "total_num_steps"):
            value = _check_int(key_path, value, lo=1)
        elif name == "last_batch_iteration":
            value = _check_int(key_path, value, lo=-1)
        elif name == "warmup_type":
            value = _check_choice(key_path, value, _WARMUP_TYPES)
            if params[name] != value:
                # DeepSpeed compares the exact spelling: "Linear" would warm up as "log" there
                raise ConfigError(key_path, f"{params[name]!r}: write {value!r} (DeepSpeed "
                                  f"reads only the lower-case spelling and would warm up "
                                  f"logarithmically, with a warning)")
        else:  # warmup_min_ratio, cos_min_ratio
            value = _check_number(key_path, value, lo=0.0, hi=1.0)
        out[name] = value
    if "total_num_steps" in out and out["total_num_steps"] < out["warmup_num_steps"]:
        # DeepSpeed warns and runs: after the warmup the rate is at once the decay's floor
        # (0 for WarmupDecayLR, cos_min_ratio for WarmupCosineLR), as here.
        _warn_keys([f"{_join(path, 'total_num_steps')} = {out['total_num_steps']} is less than "
                    f"warmup_num_steps = {out['warmup_num_steps']}"],
                   headline="the learning rate falls to the end of its decay right after the "
                            "warmup (DeepSpeed warns likewise)")
    return out


@dataclass(kw_only=True)
class SchedulerConfig(_Section):
    """``scheduler``: a DeepSpeed learning-rate schedule, built by
    ``zero_ext.lr_schedules.build_scheduler`` and stepped once per optimizer step."""

    type: str
    """"WarmupLR", "WarmupDecayLR" or "WarmupCosineLR" (any case). For another schedule, pass
    one to ``initialize(lr_scheduler=...)``."""

    params: dict = field(default_factory=dict)
    """The schedule's parameters, with DeepSpeed's names and defaults; after loading it holds
    every parameter, defaults filled in (see ``zero_ext.lr_schedules`` for their meaning)."""

    def __post_init__(self):
        _reject_auto("type", self.type)
        name = _SCHEDULER_TYPES.get(self.type.lower()) if isinstance(self.type, str) else None
        if name is None:
            raise ConfigError(
                "type",
                f"{self.type!r} is not supported; the config can build "
                f"{', '.join(repr(n) for n in SCHEDULER_DEFAULTS)}. For another schedule, drop "
                "the \"scheduler\" section and pass a scheduler to "
                "zero_ext.initialize(..., lr_scheduler=...)")
        self.type = name
        self.params = validate_scheduler_params(name, self.params, path="params")


@dataclass(kw_only=True)
class FP16Config(_Section):
    """``fp16``: mixed precision with fp16 model weights, fp32 master weights and loss scaling."""

    enabled: bool = False
    """Train with fp16 weights, activations and gradients."""

    loss_scale: float = 0.0
    """Static loss scale (> 0), or 0 for dynamic loss scaling."""

    initial_scale_power: int = 16
    """Dynamic scaling starts at a loss scale of ``2**initial_scale_power`` (0..127: the scale
    multiplies the fp32 loss, whose range ends at 2**128)."""

    loss_scale_window: int = 1000
    """Dynamic scaling doubles the scale on the clean step after ``loss_scale_window`` steps
    without overflow (since the last overflow or the start), as DeepSpeed does."""

    hysteresis: int = 2
    """Dynamic scaling halves the scale only at the ``hysteresis``-th overflow (DeepSpeed's
    delayed shift); earlier overflows only skip the step. At stage 0, as in DeepSpeed (whose
    stage 0 uses its FP16_Optimizer), every overflow halves the scale."""

    consecutive_hysteresis: bool = False
    """Refill the hysteresis budget after every step without overflow, not only when the scale
    grows (stages 1-3, as in DeepSpeed)."""

    min_loss_scale: float = 1.0
    """Dynamic scaling never goes below this scale (> 0)."""

    raise_error_at_min_scale: bool = True
    """zero_ext's key (DeepSpeed's loss scaler argument of that name, always true at its stages
    1-3): an overflow with the scale already at ``min_loss_scale`` raises, since every later
    step would be skipped too. False skips such steps with a warning each."""

    auto_cast: bool = False
    """Cast the floating-point tensors among the forward's inputs to fp16 (DeepSpeed's
    ``_cast_inputs_half``: tensors inside lists, tuples and dicts too)."""

    _INERT: ClassVar[dict[str, _Unsupported]] = {
        "fp16_master_weights_and_grads": _Unsupported(
            _is(False), "true is not supported: zero_ext keeps fp32 master weights and "
            "gradients; remove the key"),
    }
    _PYDANTIC: ClassVar[bool] = True

    def __post_init__(self):
        self.enabled = _check_bool("enabled", self.enabled)
        self.loss_scale = _check_number("loss_scale", self.loss_scale, lo=0.0)
        given = self.initial_scale_power
        power = _number_from(given, integer=True)
        if not (_is_number(power) and math.isfinite(power) and float(power).is_integer()
                and 0 <= power <= 127):
            _reject_auto("initial_scale_power", given)
            raise ConfigError(
                "initial_scale_power", f"expected an integer in 0..127, {_got(given)}: the "
                "initial loss scale 2**initial_scale_power multiplies the fp32 loss, whose range "
                "ends at 2**128 (DeepSpeed's default is 16)")
        self.initial_scale_power = int(power)
        self.consecutive_hysteresis = _check_bool("consecutive_hysteresis",
                                                 self.consecutive_hysteresis)
        self.raise_error_at_min_scale = _check_bool("raise_error_at_min_scale",
                                                   self.raise_error_at_min_scale)
        self.auto_cast = _check_bool("auto_cast", self.auto_cast)
        if self.auto_cast and not self.enabled:
            raise ConfigError("auto_cast", "true casts the forward's inputs to fp16, but fp16 is "
                              "not enabled (the model stays in its own dtype); set \"enabled\": "
                              "true or remove auto_cast")
        # As DeepSpeed does, the ranges of the dynamic-scaling knobs are enforced only when
        # dynamic scaling runs, so static-scale configs carrying unused values still load.
        dynamic = self.enabled and self.loss_scale == 0.0
        self.loss_scale_window = _check_int("loss_scale_window", self.loss_scale_window,
                                           lo=1 if dynamic else None)
        self.hysteresis = _check_int("hysteresis", self.hysteresis, lo=1 if dynamic else None)
        if dynamic:
            self.min_loss_scale = _check_number("min_loss_scale", self.min_loss_scale, lo=0.0,
                                               lo_open=True)
        else:
            self.min_loss_scale = _check_number("min_loss_scale", self.min_loss_scale)

    @property
    def dynamic_loss_scale(self) -> bool:
        """True when fp16 is on and the loss scale is adjusted dynamically."""
        return self.enabled and self.loss_scale == 0.0

    @property
    def initial_loss_scale(self) -> float:
        """The loss scale of the first step: ``loss_scale`` if static, else
        ``2**initial_scale_power``."""
        return self.loss_scale if self.loss_scale > 0 else float(2**self.initial_scale_power)


@dataclass(kw_only=True)
class BF16Config(_Section):
    """``bf16`` (also spelled ``bfloat16``): mixed precision with bf16 model weights and fp32
    master weights; no loss scaling."""

    enabled: bool = False
    """Train with bf16 weights, activations and gradients."""

    check_grad_overflow: bool | None = None
    """What a step does when the global gradient norm is inf or nan. True, or unset (DeepSpeed's
    default is true): the step is skipped on every rank (counted in ``skipped_steps``, weights
    and optimizer state unchanged), with a warning each time, as DeepSpeed skips it; false: the
    update is applied (the weights become inf/nan) with a warning each time, as DeepSpeed's
    stage 1-2 optimizer does without the check."""

    _IGNORED: ClassVar[dict[str, str]] = {
        "immediate_grad_update": "when DeepSpeed's bf16 optimizer moves each gradient to fp32; "
        "the result is the same",
    }
    _INERT: ClassVar[dict[str, _Unsupported]] = {
        "bf16_master_weights_and_grads": _Unsupported(
            _is(False), "true is not supported: zero_ext keeps fp32 master weights and "
            "gradients; remove the key"),
        "bf16_optimizer_states": _Unsupported(
            _is(False), "true is not supported: zero_ext keeps optimizer states in fp32; "
            "remove the key"),
    }
    _PYDANTIC: ClassVar[bool] = True

    def __post_init__(self):
        self.enabled = _check_bool("enabled", self.enabled)
        self.check_grad_overflow = _optional(_check_bool, "check_grad_overflow",
                                             self.check_grad_overflow)


_OFFLOAD_DEVICES = {"none": "none", "cpu": "cpu", "nvme": "nvme"}


@dataclass(kw_only=True)
class OffloadConfig(_Section):
    """``zero_optimization.offload_optimizer`` / ``offload_param``: keep optimizer state (and
    run the optimizer step) or stage-3 parameter shards in host memory."""

    device: str = "none"
    """"none" or "cpu". ("nvme" is DeepSpeed's ZeRO-Infinity, which zero_ext does not have.)"""

    pin_memory: bool = True
    """Put the host buffers in page-locked memory: faster, asynchronous copies, at the cost of
    memory the OS cannot swap (DeepSpeed's default, true, since 0.18). Without CUDA there is
    nothing to pin for, and it has no effect, as in DeepSpeed."""

    cpuadam_cores_perc: float = 0.8
    """offload_optimizer: the share (0 <= x <= 1) of this rank's CPU cores (the process's cores
    divided among the node's ranks) that run the CPU AdamW step, never fewer than one (so 0
    leaves it one). torchrun's default of one OpenMP thread per process would otherwise leave
    the step one core."""

    ratio: float = 1.0
    """offload_optimizer: the share (0 <= x <= 1) of this rank's optimizer state kept in host
    memory and stepped there; the rest stays on the device and steps there (DeepSpeed's
    ZeRO-Offload++ "Twin-Flow"). The host takes the buckets backward finishes first, whose CPU
    step has the rest of backward to hide behind, so the split falls on bucket boundaries
    (stage-3 units, reduce_bucket_size otherwise; at least one bucket above 0). Lower it while
    device memory allows: each parameter moved back costs 12 bytes of device memory (16 when
    gradients are accumulated in fp32) and takes its step off the CPU. 0 keeps all of it on the
    device, as DeepSpeed's 0 steps every sub-group there: the same as no optimizer offload."""

    _IGNORED: ClassVar[dict[str, str]] = {
        "nvme_path": "used only with device 'nvme'",
        "buffer_count": "used only with device 'nvme'",
        "buffer_size": "used only with device 'nvme'",
        "max_in_cpu": "used only with device 'nvme'",
        "fast_init": "used only with device 'nvme'",
        "pipeline_read": "used only with device 'nvme'",
        "pipeline_write": "used only with device 'nvme'",
    }
    _INERT: ClassVar[dict[str, _Unsupported]] = {
        "super_offload": _Unsupported(_is(False), "true is not supported; remove the key"),
    }
    _PYDANTIC: ClassVar[bool] = True

    def __post_init__(self):
        self.device = _check_choice("device", self.device, _OFFLOAD_DEVICES)
        if self.device == "nvme":
            raise ConfigError("device", "'nvme' is not supported (zero_ext offloads to host "
                              "memory only); use \"device\": \"cpu\"")
        self.pin_memory = _check_bool("pin_memory", self.pin_memory)
        self.cpuadam_cores_perc = _check_number("cpuadam_cores_perc", self.cpuadam_cores_perc,
                                                lo=0, hi=1)
        self.ratio = _check_number("ratio", self.ratio, lo=0, hi=1)

    @property
    def enabled(self) -> bool:
        """True when something is offloaded: device "cpu", with a ratio above 0 (at ratio 0
        offload_optimizer keeps every bucket's state on the device)."""
        return self.device != "none" and self.ratio > 0


# DeepSpeed's default leaf classes (its runtime/zero/leaf_module_config.py): transformers'
# sparse MoE blocks, whose experts run only where tokens are routed to them.
DEEPSPEED_LEAF_MODULE_CLASSES = (
    "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
    "transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
)


@dataclass(kw_only=True)
class LeafModuleConfig(_Section):
    """``zero_optimization.leaf_module`` (DeepSpeed's section): stage 3's leaf modules, gathered
    whole when they run and never split into units of their own (zero_ext.set_z3_leaf_modules
    and DeepSpeed's deepspeed.utils.set_z3_leaf_modules mark more). For modules whose inner
    modules run on some ranks only: a mixture of experts running only the experts its tokens
    were routed to. A leaf's backward is over once its inputs' gradients are computed; its
    parameters that got no gradient then count as zero, on every rank alike. Entries that match
    no module are warned about, as in DeepSpeed."""

    classes: list[str] = field(default_factory=lambda: list(DEEPSPEED_LEAF_MODULE_CLASSES))
    """Class names, plain (``"MixtralSparseMoeBlock"``) or with their module
    (``"transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock"``). Default:
    DeepSpeed's, transformers' Mixtral, Qwen2-MoE and Qwen3-MoE sparse blocks."""

    names: list[str] = field(default_factory=list)
    """Module names as ``model.named_modules()`` gives them (``"model.layers.0.mlp"``)."""

    name_suffixes: list[str] = field(default_factory=list)
    """Endings of module names (``"mlp"``, ``"block_sparse_moe"``)."""

    _PYDANTIC: ClassVar[bool] = True

    def __post_init__(self):
        for name in ("classes", "names", "name_suffixes"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]  # DeepSpeed reads one string as a list of one
            _reject_auto(name, value)
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, str) and v for v in value):
                raise ConfigError(name, f"expected a list of non-empty strings, {_got(value)}")
            setattr(self, name, list(dict.fromkeys(value)))


@dataclass(kw_only=True)
class ZeroOptimizationConfig(_Section):
    """``zero_optimization``: which ZeRO stage shards what, and the bucket sizes of its
    collectives. Sizes count elements, not bytes."""

    stage: int = 0
    """0: plain data parallel (all-reduce); 1: shard optimizer state; 2: also gradients;
    3: also parameters."""

    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduction (all-reduce or reduce-scatter) bucket (> 0)."""

    allgather_bucket_size: int = 500_000_000
    """Elements per all-gather of updated parameters after the step (stages 1 and 2)."""

    overlap_comm: bool | None = None
    """Overlap gradient reduction with the backward pass. None (the default) means DeepSpeed's
    stage default: on for stage 3, off otherwise; ``overlap`` gives the effective value."""

    contiguous_gradients: bool = True
    """DeepSpeed: copy gradients into a contiguous buffer as they are produced. No effect here:
    zero_ext always does (each bucket's gradients are flattened into one buffer); the values
    trained are the same either way."""

    reduce_scatter: bool = True
    """DeepSpeed: reduce gradients with reduce-scatter rather than all-reduce (stages 1-2). No
    effect here: zero_ext always reduce-scatters at stages 1-3; the average is the same."""

    allgather_partitions: bool = True
    """DeepSpeed: gather updated parameters with all-gather rather than per-rank broadcasts. No
    effect here: zero_ext always all-gathers; the values are the same."""

    offload_optimizer: OffloadConfig = field(default_factory=OffloadConfig)
    """Keep optimizer state in host memory and step it there (stages 1-3)."""

    offload_param: OffloadConfig = field(default_factory=OffloadConfig)
    """Keep parameter shards in host memory (stage 3; below it DeepSpeed ignores the section,
    and zero_ext warns and keeps the parameters on the device)."""

    leaf_module: LeafModuleConfig = field(default_factory=LeafModuleConfig)
    """Stage 3 (DeepSpeed's section): modules gathered whole, whose parameters without a
    gradient count as zero once their backward is over (mixtures of experts); see
    :class:`LeafModuleConfig`."""

    stage3_prefetch_bucket_size: int = 50_000_000
    """Stage 3: elements of parameters gathered ahead of their use."""

    stage3_param_persistence_threshold: int = 100_000
    """Stage 3: parameters of at most this many elements stay unpartitioned on every rank
    (DeepSpeed's ``numel <= threshold``)."""

    stage3_max_live_parameters: int = 1_000_000_000
    """Stage 3: at most this many gathered parameter elements are kept before releasing."""

    stage3_max_reuse_distance: int = 1_000_000_000
    """Stage 3: a parameter needed again within this many elements is not released."""

    stage3_gather_16bit_weights_on_model_save: bool = False
    """Stage 3: gather the full 16-bit weights when saving the model (old key:
    ``stage3_gather_fp16_weights_on_model_save``)."""

    stage3_unit_classes: list[str] | None = None
    """Stage 3 (zero_ext's key): class names of the modules whose parameters are gathered
    together, e.g. ``["LlamaDecoderLayer"]``; parameters outside them stay whole. None picks
    the units automatically (container blocks and the model's other parameter-holding
    children)."""

    zero_hpz_partition_size: int = 1
    """Stage 3, ZeRO++ hpZ (DeepSpeed's key): ranks per secondary partition group. Above 1,
    each unit also keeps a copy of its parameters sharded over blocks of this many ranks of a
    node (compute dtype, refreshed by each forward's gather), and backward gathers from it
    within the block, never across nodes. Must be the ranks per node or a divisor of it; 0 and
    1 turn it off."""

    hierarchical_allgather: bool = False
    """Stages 1-3 (zero_ext's key, after MiCS's ``mics_hierarchical_params_gather``): gather
    parameters in two hops, across nodes among the ranks of one local index, then within each
    node; over the slow link a node receives (M-1)/M of the parameters instead of (N-1)/N
    (M nodes, N ranks). The values are the flat all-gather's, bit for bit."""

    zero_quantized_gradients: bool = False
    """Stage 3, ZeRO++ qgZ (DeepSpeed's key): reduce gradients as int4 blockwise-quantized
    chunks moved by all-to-all and summed in fp32, within each node first and then across
    nodes, as DeepSpeed does; no error feedback (DeepSpeed has none). DeepSpeed reads it only
    at stage 3, and so does zero_ext (below stage 3 it warns and has no effect): to compress at
    stages 1-3 with int8, int4 or error feedback, or top-k at stages 0-2, use
    ``zero_ext.compression.gradients``."""

    zero_quantized_weights: bool = False
    """Stage 3, ZeRO++ qwZ (DeepSpeed's key): all-gather parameters as int8 blockwise-quantized
    chunks (bf16 read as bf16); the fp32 master weights stay exact. Same as
    ``zero_ext.compression.weights.method = "int8"``; no effect below stage 3 (warned)."""

    sub_group_size: int = 1_000_000_000
    """DeepSpeed: elements of the optimizer state stepped at a time (bounds its temporary
    memory). No effect here: zero_ext steps per bucket (``reduce_bucket_size``, stage-3 units);
    the result is the same."""

    round_robin_gradients: bool = False
    """DeepSpeed's stage 1/2 CPU-offload gradient copy ordering. No effect here (performance
    only in DeepSpeed; the result is the same)."""

    ignore_unused_parameters: bool = True
    """False: a step raises, on every rank, when a trainable parameter got no gradient on some
    rank during the accumulation window, naming the parameter(s) and rank(s). True tolerates
    them (their gradient counts as zero). DeepSpeed checks this only with CPU offload at
    stages 1-2; zero_ext at every stage."""

    elastic_checkpoint: bool = False
    """DeepSpeed's checkpoint layout that can be loaded at another data-parallel size. No effect
    here: zero_ext checkpoints always load at any world size and stage."""

    _NO_EFFECT: ClassVar[dict[str, str]] = {
        "contiguous_gradients": "zero_ext always flattens each bucket's gradients into one "
        "buffer",
        "reduce_scatter": "zero_ext always reduce-scatters at stages 1-3; the same average",
        "allgather_partitions": "zero_ext always all-gathers; the same values",
        "sub_group_size": "zero_ext steps the optimizer per bucket; the same result",
        "round_robin_gradients": "a DeepSpeed CPU-offload copy order; the same result",
    }
    _ALIASES: ClassVar[dict[str, str]] = {
        "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
        # DeepSpeed also accepts its pydantic field names for the stage-3 keys.
        "prefetch_bucket_size": "stage3_prefetch_bucket_size",
        "param_persistence_threshold": "stage3_param_persistence_threshold",
        "max_live_parameters": "stage3_max_live_parameters",
        "max_reuse_distance": "stage3_max_reuse_distance",
        "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    }
    _SECTIONS: ClassVar[dict[str, type]] = {
        "offload_optimizer": OffloadConfig,
        "offload_param": OffloadConfig,
        "leaf_module": LeafModuleConfig,
    }
    _IGNORED: ClassVar[dict[str, str]] = {
        "use_multi_rank_bucket_allreduce": "",
        "compute_grad_norm": "zero_ext always computes the global gradient norm",
        "stage3_model_persistence_threshold": "",
        "model_persistence_threshold": "",
        "stage3_module_granularity_threshold": "",
        "module_granularity_threshold": "",
        "stage3_use_all_reduce_for_fetch_params": "",
        "use_all_reduce_for_fetch_params": "",
        "stage3_allgather_sequential": "",
        "allgather_sequential": "",
        "parameter_alignment": "",
        "log_trace_cache_warnings": "",
        "enable_sanity_checks": "DeepSpeed's debugging checks: the same stage-3 buckets on "
        "every rank, which zero_ext fixes at initialize, and no change inside "
        "GatheredParameters(modifier_rank=None), which zero_ext does not check",
        "memory_efficient_linear": "",
        "override_module_apply": "",
        "pipeline_loading_checkpoint": "",
        "save_muon_momentum_buffer_in_memory": "",
    }
    _INERT: ClassVar[dict[str, _Unsupported]] = {
        "load_from_fp32_weights": _Unsupported(
            _is(True),
            "false is not supported: zero_ext always restores the fp32 master weights from the "
            "checkpoint; remove the key"),
        "legacy_stage1": _Unsupported(_is(False), "true is not supported; remove the key"),
        "zero_quantized_nontrainable_weights": _Unsupported(
            _is(False),
            "quantized frozen weights (ZeRO++) are not supported; remove the key or set it to "
            "false (zero_quantized_weights quantizes every stage-3 gather)"),
        "zenflow": _Unsupported(_is(None), "ZenFlow is not supported; remove the key"),
    }
    _PYDANTIC: ClassVar[bool] = True
    # DeepSpeed's deprecated offload switches, read as the offload sections.
    _LEGACY_OFFLOAD: ClassVar[dict[str, str]] = {
        "cpu_offload": "offload_optimizer",
        "cpu_offload_param": "offload_param",
    }

    @classmethod
    def _parse(cls, data: Any, path: str, notes: list[str]):
        if isinstance(data, Mapping) and (
                set(cls._LEGACY_OFFLOAD) | {"cpu_offload_use_pin_memory"}) & set(data):
            data = cls._rewrite_legacy_offload(data, path, notes)
        return super()._parse(data, path, notes)

    @classmethod
    def _rewrite_legacy_offload(cls, data: Mapping[str, Any], path: str,
                                notes: list[str]) -> dict[str, Any]:
        """The legacy switches as DeepSpeed reads them: true is the section with its defaults
        (device "cpu", pin_memory true); cpu_offload_use_pin_memory is checked and ignored
        (its field's set_new_param is false: it sets nothing)."""
        data = dict(data)  # never modify the caller's dict
        pin_path = _join(path, "cpu_offload_use_pin_memory")
        pin = _optional(_check_bool, pin_path, data.pop("cpu_offload_use_pin_memory", None))
        for legacy, section in cls._LEGACY_OFFLOAD.items():
            if legacy not in data:
                continue
            legacy_path = _join(path, legacy)
            if not _optional(_check_bool, legacy_path, data.pop(legacy)):
                continue
            if section in data:
                raise ConfigError(legacy_path, f"given together with {section}; {legacy} is "
                                  f"DeepSpeed's deprecated spelling of {section}, keep only "
                                  f"{section}")
            data[section] = {"device": "cpu"}
            # Applied, so not among the ignored keys' notes: a warning of its own.
            read_as = json.dumps({"device": "cpu", "pin_memory": True})
            _warn_keys([f"{legacy_path} is read as {section}: {read_as}"],
                       headline="DeepSpeed's deprecated offload switch, applied; write the "
                                "section instead")
        if pin is not None:
            notes.append(f"{pin_path} (DeepSpeed sets nothing with it: the legacy switches "
                         "pin host memory, the sections' default; set pin_memory in "
                         "offload_optimizer / offload_param)")
        return data

    def __post_init__(self):
        self.stage = _check_int("stage", self.stage, lo=0, hi=3)
        self.reduce_bucket_size = _check_int("reduce_bucket_size", self.reduce_bucket_size, lo=1)
        for name in ("allgather_bucket_size", "stage3_prefetch_bucket_size",
                     "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                     "stage3_max_reuse_distance", "sub_group_size"):
            setattr(self, name, _check_int(name, getattr(self, name), lo=0))
        self.overlap_comm = _optional(_check_bool, "overlap_comm", self.overlap_comm)
        self.zero_hpz_partition_size = _check_int(
            "zero_hpz_partition_size", self.zero_hpz_partition_size, lo=0)
        self.hierarchical_allgather = _check_bool("hierarchical_allgather",
                                                  self.hierarchical_allgather)
        if self.zero_hpz_partition_size > 1 and self.stage != 3:
            raise ConfigError("zero_hpz_partition_size", f"hpZ partitions stage-3 parameters, "
                              f"the stage is {self.stage}; set \"stage\": 3 or set "
                              "zero_hpz_partition_size to 1")
        if self.stage3_unit_classes is not None:
            names = self.stage3_unit_classes
            if not isinstance(names, (list, tuple)) or not names or not all(
                    isinstance(n, str) and n for n in names):
                raise ConfigError("stage3_unit_classes", f"expected a non-empty list of module "
                                  f"class names, {_got(names)}")
            self.stage3_unit_classes = list(names)
        for name in ("contiguous_gradients", "reduce_scatter", "allgather_partitions",
                     "stage3_gather_16bit_weights_on_model_save", "round_robin_gradients",
                     "ignore_unused_parameters", "elastic_checkpoint",
                     "zero_quantized_gradients", "zero_quantized_weights"):
            setattr(self, name, _check_bool(name, getattr(self, name)))
        if self.stage != 3:
            why = {"zero_quantized_gradients": "zero_ext.compression.gradients compresses "
                   "the reduction at stages 1-3 (top-k at 0-2)",
                   "zero_quantized_weights": "only stage 3 gathers parameters while training"}
            _warn_keys([f"zero_optimization.{name} (DeepSpeed reads it only at stage 3, "
                        f"the stage is {self.stage}; {detail})"
                        for name, detail in why.items() if getattr(self, name)])
        # A null section is no offload, as in DeepSpeed (so is an empty one: device "none").
        self.offload_optimizer = _section("offload_optimizer", self.offload_optimizer,
                                          OffloadConfig, optional=True) or OffloadConfig()
        self.offload_param = _section("offload_param", self.offload_param, OffloadConfig,
                                      optional=True) or OffloadConfig()
        self.leaf_module = _section("leaf_module", self.leaf_module, LeafModuleConfig,
                                    optional=True) or LeafModuleConfig()
        if self.offload_param.ratio != 1.0:
            raise ConfigError("offload_param.ratio", "ratio splits the optimizer state between "
                              "host and device; it belongs under offload_optimizer")
        if self.offload_param.enabled and self.stage != 3:
            # DeepSpeed's stage 1-2 optimizers never read it.
            _warn_keys([(f"zero_optimization.offload_param (DeepSpeed reads it only at stage "
                         f"3, the stage is {self.stage}; the parameters stay on the device)")])
            self.offload_param = OffloadConfig()
        if self.offload_optimizer.enabled and self.stage == 0:
            # DeepSpeed trains stage 0 with the torch optimizer and never reads it.
            _warn_keys(["zero_optimization.offload_optimizer (DeepSpeed reads it only at stages "
                        "1-3, the stage is 0; the optimizer state stays on the device)"])
            self.offload_optimizer = OffloadConfig()
        if (self.offload_optimizer.enabled and self.offload_optimizer.ratio != 1.0
                and self.offload_param.enabled):
            raise ConfigError(
                "offload_optimizer.ratio", f"{self.offload_optimizer.ratio:g} keeps part of the "
                "optimizer on the device, but offload_param keeps the weights it would update "
                "on the host; use one of them (ratio 1, or no offload_param)")

    @property
    def overlap(self) -> bool:
        """Whether gradient reduction overlaps backward: ``overlap_comm``, or the stage default
        (True for stage 3, else False) when it is None."""
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm


@dataclass(kw_only=True)
class ActivationCheckpointingConfig(_Section):
    """``activation_checkpointing``: options of ``zero_ext.checkpointing`` (``initialize``
    passes the section, when the config has one, to ``zero_ext.checkpointing.configure``;
    DeepSpeed's initialize leaves the section to the script's own ``configure`` call)."""

    partition_activations: bool = False
    """Split checkpointed activations across model-parallel ranks (DeepSpeed's option for
    model parallelism). Accepted with one notice and no effect: zero_ext is data-parallel
    only, with nothing to split."""

    cpu_checkpointing: bool = False
    """Keep the saved inputs of checkpointed segments in (pinned) host memory between their
    forward and their backward; copied on side streams, the copy back started when the next
    segment's backward starts."""

    contiguous_memory_optimization: bool = False
    """Copy partitioned activations into one preallocated buffer (DeepSpeed; needs
    ``number_checkpoints``). Accepted with one notice and no effect, as nothing is
    partitioned."""

    number_checkpoints: int | None = None
    """How many blocks ``zero_ext.checkpointing.apply`` checkpoints, counted from the first
    (>= 1; unset: every block). A meaning of zero_ext's: DeepSpeed reads it only to size the
    contiguous buffers of ``contiguous_memory_optimization``, where it is usually the number of
    layers (then every block here too); a smaller value checkpoints fewer blocks here
    (docs/deepspeed-compat.md)."""

    synchronize_checkpoint_boundary: bool = False
    """Synchronize the device at each checkpoint boundary (for debugging and timing)."""

    profile: bool = False
    """Time the forward and backward of each checkpointed segment
    (``zero_ext.checkpointing.profile_report()``)."""

    _UNKNOWN_IGNORED: ClassVar[bool] = True

    def __post_init__(self):
        for name in ("partition_activations", "cpu_checkpointing",
                     "contiguous_memory_optimization", "synchronize_checkpoint_boundary",
                     "profile"):
            # DeepSpeed reads these as given (a string there is true, null false).
            value = getattr(self, name)
            setattr(self, name, False if value is None else
                    _check_bool(name, value, strings=False))
        self.number_checkpoints = _optional(_check_int, "number_checkpoints",
                                            self.number_checkpoints, lo=1)


@dataclass(kw_only=True)
class DataTypesConfig(_Section):
    """``data_types``: DeepSpeed's per-purpose data types."""

    grad_accum_dtype: str | None = None
    """The dtype gradients are summed in over an accumulation window's micro-steps: "fp32",
    "bf16" or "fp16" (DeepSpeed's spellings). None (DeepSpeed's default): the training dtype
    at stages 0-1; stages 2-3 always sum their reduced shards in fp32 (whatever is set here,
    so a 16-bit value there is more precise than asked). "fp32" at stages 0-1 keeps an fp32
    copy of the window's gradients (4 bytes per parameter) instead of 16-bit ``.grad``
    (DeepSpeed's BF16_Optimizer with fp32 accumulation). A 16-bit value other than the
    training dtype is refused, as DeepSpeed refuses the mix."""

    param_dtype: str | None = None
    """The parameters' dtype under fp16/bf16: accepted when it names the training dtype (the
    fp16/bf16 sections decide it), refused otherwise, as DeepSpeed refuses the mismatch."""

    buffer_dtype: str | None = None
    """Under fp16/bf16, the dtype every floating buffer is cast to at initialize (except those
    kept in fp32, below). None (DeepSpeed's default): buffers keep the dtype they came in, so
    rotary ``inv_freq`` or BatchNorm statistics stay fp32 while the parameters train in 16 bits.
    No effect under fp32 training."""

    keep_in_fp32_modules: str | list[str] = "auto"
    """Under fp16/bf16, the buffers held in fp32 whatever ``buffer_dtype`` says (and brought
    back to fp32 if they came in 16 bits): "auto" (default) the ones a transformers model lists
    in ``_keep_in_fp32_modules_strict`` (and ``_keep_in_fp32_modules`` under fp16), e.g. MoE
    routing biases; or a list of name patterns (``*`` any characters, matched anywhere in a
    buffer's dotted name); ``[]`` none. Parameters always train in the training dtype."""

    _UNKNOWN_IGNORED: ClassVar[bool] = True

    def __post_init__(self):
        self.grad_accum_dtype = _optional(_check_choice, "grad_accum_dtype",
                                          self.grad_accum_dtype, spellings=_COMM_DTYPES)
        self.param_dtype = _optional(_check_choice, "param_dtype", self.param_dtype,
                                     spellings=_COMM_DTYPES)
        self.buffer_dtype = _optional(_check_choice, "buffer_dtype", self.buffer_dtype,
                                      spellings=_COMM_DTYPES)
        keep = self.keep_in_fp32_modules
        if keep != "auto" and not (isinstance(keep, list)
                                   and all(isinstance(name, str) for name in keep)):
            raise ConfigError("keep_in_fp32_modules",
                              f'expected "auto" or a list of name patterns, {_got(keep)}')


@dataclass(kw_only=True)
class MonitorConfig(_Section):
    """``tensorboard`` and ``csv_monitor``: DeepSpeed's monitors. Rank 0 writes the engine's
    events (``Train/Samples/lr`` and, under fp16, ``Train/Samples/loss_scale`` after every
    optimizer step, at the samples trained so far) and the script's own
    (``engine.monitor.write_events``) to ``<output_path>/<job_name>/``: a TensorBoard event
    file, or one CSV file per event name (zero_ext/monitor_events.py)."""

    enabled: bool = False
    """Write the events."""

    output_path: str = ""
    """The directory of the job's folder ("": the working directory, as DeepSpeed's)."""

    job_name: str = "DeepSpeedJobName"
    """The job's folder under ``output_path``."""

    _PYDANTIC: ClassVar[bool] = True

    def __post_init__(self):
        self.enabled = _check_bool("enabled", self.enabled)
        for name in ("output_path", "job_name"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(name, f"expected a path (a string), {_got(getattr(self, name))}")


@dataclass(kw_only=True)
class BatchSizes:
    """The batch-size triple resolved for a world size (see ``ZeroConfig.resolve_batch``)."""

    train_batch_size: int
    """Samples per optimizer step, over all ranks."""

    train_micro_batch_size_per_gpu: int
    """Samples per forward/backward on one rank."""

    gradient_accumulation_steps: int
    """Micro-batches accumulated on each rank before an optimizer step."""


@dataclass(kw_only=True)
class PeriodicCheckpointSettings(_Section):
    """``zero_ext.checkpoint``: periodic checkpoints and auto-resume (zero_ext/elastic.py), for
    jobs under ``torchrun --max-restarts=N``: ``{"dir": "ckpt", "every_n_steps": 100,
    "auto_resume": true, "keep_last": 2}``."""

    dir: str | None = None
    """The directory checkpoints are saved to and resumed from (every rank must see the same
    one: a shared filesystem across nodes)."""

    every_n_steps: int | None = None
    """Save a checkpoint after every this many optimizer steps (>= 1); None: only when the
    script calls engine.save_checkpoint."""

    auto_resume: bool = False
    """``initialize`` loads the newest complete checkpoint in ``dir`` (the one ``latest``
    names), at whatever world size the job now has; none there: training starts fresh."""

    keep_last: int | None = None
    """After each periodic save, delete all but this many newest ``global_step<N>`` checkpoints
    (>= 1); None keeps them all."""

    def __post_init__(self):
        if self.dir is not None and (not isinstance(self.dir, str) or not self.dir):
            raise ConfigError("dir", f"expected a directory path, {_got(self.dir)}")
        self.every_n_steps = _optional(_check_int, "every_n_steps", self.every_n_steps, lo=1)
        self.auto_resume = _check_bool("auto_resume", self.auto_resume)
        self.keep_last = _optional(_check_int, "keep_last", self.keep_last, lo=1)
        if self.keep_last is not None and self.every_n_steps is None:
            raise ConfigError("keep_last", "applies to periodic checkpoints; also set "
                              "every_n_steps, or remove keep_last")
        if self.dir is None and (self.every_n_steps is not None or self.auto_resume):
            raise ConfigError("dir", "missing: every_n_steps and auto_resume need the "
                              "directory to save to and resume from")


_GRADIENT_METHODS = {"none": "none", "int8": "int8", "int4": "int4", "topk": "topk",
                     "top-k": "topk", "top_k": "topk"}
_WEIGHT_METHODS = {"none": "none", "int8": "int8"}


@dataclass(kw_only=True)
class GradientCompressionSettings(_Section):
    """``zero_ext.compression.gradients``: how the gradient reduction is compressed
    (zero_ext/comm/compressed.py; docs/compression.md)."""

    method: str = "none"
    """"none"; "int8" or "int4": blockwise-quantized chunks moved by all-to-all and summed in
    fp32 on the receiving rank (stages 1-3; ZeRO++'s qgZ); "topk": each rank sends the largest
    ``density`` share of every chunk as (index, value) pairs, the rest stays in its residual
    (stages 0-2; Deep Gradient Compression)."""

    block_size: int = 256
    """Elements per quantization block, each with one fp32 scale (a multiple of 8): smaller
    blocks follow the gradient's local range more closely and cost 4 bytes per block."""

    error_feedback: bool = False
    """int8/int4: keep the rounding error of what this rank sent (1 byte per element, fp8) and
    add it to its next send, so no part of a gradient is lost for good. Always on for topk."""

    two_hop: bool = True
    """int8/int4 on several nodes of several ranks: reduce within each node first, then across
    nodes, so the slow link carries 1/(ranks per node) of the data."""

    density: float = 0.01
    """topk: the share of each chunk's elements sent per reduction, in (0, 1]."""

    momentum: float = 0.0
    """topk: momentum correction (DGC): the residual accumulates an exponential moving average
    of the gradient with this factor instead of the gradient, in [0, 1). DGC uses 0.9 with
    momentum SGD; with Adam (its own momentum) and DGC's momentum masking it measured worse
    than none (benchmarks/RESULTS.md), hence 0: every gradient is then delivered exactly once."""

    warmup_steps: int = 0
    """topk: optimizer steps over which the density falls exponentially from 1 (dense) to
    ``density``, as DGC's warm-up; with ``freeze_variance``, dense steps before the sparse
    ones. 0 starts at ``density``."""

    freeze_variance: bool = False
    """topk with zero_ext's AdamW: dense reductions for ``warmup_steps``, then Adam's second
    moment is frozen (1-bit Adam's remedy) and the reductions go sparse. Adam normalises each
    coordinate, so an entry that arrives as one accumulated burst every ~1/density steps would
    otherwise move about sqrt(density) as far as with dense gradients (docs/compression.md).
    Needs warmup_steps >= 1 (the second moment comes from the dense steps)."""

    compress_momentum: bool = False
    """topk with ``freeze_variance``: once sparse, what is sent is Adam's momentum instead of the
    gradient (1-bit Adam's scheme, with top-k where 1-bit Adam sends signs): each rank's
    residual takes (1 - beta1) of its gradient and keeps beta1 of what it delivered, the
    delivered sum is the step's first moment, and the optimizer steps lr * m / sqrt(v). With
    the variance frozen the update is linear in m, so error feedback delivers every part of
    the momentum, late rather than never; sending the gradient, an entry's accumulated burst
    passes through Adam's momentum again (benchmarks/RESULTS.md measures both)."""

    def __post_init__(self):
        self.method = _check_choice("method", self.method, _GRADIENT_METHODS)
        self.block_size = _check_int("block_size", self.block_size, lo=8)
        if self.block_size % 8:
            raise ConfigError("block_size", f"expected a multiple of 8, got {self.block_size}")
        self.error_feedback = _check_bool("error_feedback", self.error_feedback)
        self.two_hop = _check_bool("two_hop", self.two_hop)
        self.density = _check_number("density", self.density, lo=0.0, hi=1.0, lo_open=True)
        self.momentum = _check_number("momentum", self.momentum, lo=0.0, hi=1.0, hi_open=True)
        self.warmup_steps = _check_int("warmup_steps", self.warmup_steps, lo=0)
        self.freeze_variance = _check_bool("freeze_variance", self.freeze_variance)
        if self.freeze_variance and self.warmup_steps == 0:
            raise ConfigError("freeze_variance", "true needs warmup_steps >= 1: the frozen "
                              "second moment is Adam's after the dense warm-up steps; set "
                              "warmup_steps (e.g. a tenth of the run)")
        self.compress_momentum = _check_bool("compress_momentum", self.compress_momentum)
        if self.compress_momentum and not self.freeze_variance:
            raise ConfigError("compress_momentum", "true needs freeze_variance true: the "
                              "delivered momentum is divided by Adam's frozen second moment "
                              "(with a moving one the update is not linear in what is sent); "
                              "set freeze_variance and warmup_steps")
        if self.compress_momentum and self.momentum > 0:
            raise ConfigError("compress_momentum", f"true and momentum {self.momentum} "
                              "(DGC's momentum correction) both put a momentum into the "
                              "residual; keep one of them (compress_momentum takes Adam's "
                              "beta1)")


@dataclass(kw_only=True)
class WeightCompressionSettings(_Section):
    """``zero_ext.compression.weights``: how stage 3 gathers parameters."""

    method: str = "none"
    """"none", or "int8": every rank's shard is quantized blockwise (bf16 read as bf16) and
    gathered as int8 plus one fp32 scale per block (ZeRO++'s qwZ); every rank computes with
    the same dequantized weights, and the fp32 master weights stay exact."""

    block_size: int = 256
    """Elements per quantization block (a multiple of 8)."""

    def __post_init__(self):
        self.method = _check_choice("method", self.method, _WEIGHT_METHODS)
        self.block_size = _check_int("block_size", self.block_size, lo=8)
        if self.block_size % 8:
            raise ConfigError("block_size", f"expected a multiple of 8, got {self.block_size}")


@dataclass(kw_only=True)
class CompressionSettings(_Section):
    """``zero_ext.compression``: compressed communication (docs/compression.md)."""

    gradients: GradientCompressionSettings = field(
        default_factory=GradientCompressionSettings)
    """The gradient reduction (see GradientCompressionSettings)."""

    weights: WeightCompressionSettings = field(default_factory=WeightCompressionSettings)
    """Stage 3's parameter gathers (see WeightCompressionSettings)."""

    _SECTIONS: ClassVar[dict[str, type]] = {"gradients": GradientCompressionSettings,
                                            "weights": WeightCompressionSettings}

    def __post_init__(self):
        self.gradients = _section("gradients", self.gradients,
                                  GradientCompressionSettings)
        self.weights = _section("weights", self.weights,
                                WeightCompressionSettings)


@dataclass(frozen=True)
class CompressionPlan:
    """What the engine compresses, resolved from ``zero_ext.compression`` and DeepSpeed's
    ZeRO++ keys (``ZeroConfig.compression()``)."""

    gradients: str = "none"      # "none", "int8", "int4" or "topk"
    grad_block: int = 256
    error_feedback: bool = False
    two_hop: bool = True
    density: float = 0.01
    momentum: float = 0.0
    warmup_steps: int = 0
    freeze_variance: bool = False
    compress_momentum: bool = False
    weights: str = "none"        # "none" or "int8"
    weight_block: int = 256

    @property
    def grad_bits(self) -> int | None:
        """8 or 4 for the quantized methods, else None."""
        return {"int8": 8, "int4": 4}.get(self.gradients)

    @property
    def enabled(self) -> bool:
        return self.gradients != "none" or self.weights != "none"


@dataclass(kw_only=True)
class FusedKernelsSettings(_Section):
    """``zero_ext.fused_kernels``: zero_ext's fused training ops (docs/fused.md), swapped into
    the model by ``initialize`` before it builds the engine, through ``zero_ext.fused.apply``:
    ``{"enabled": true}``. DeepSpeed has no such switch (its fused kernels are its inference
    engine's and its optimizers')."""

    enabled: bool = False
    """Swap the fused ops in: transformers' Llama, Mistral, Qwen2, Qwen3 and GPT-2 models (norms,
    MLP activations, the causal-LM loss without logits in training) and torch.nn.LayerNorm.
    Off by default: the swaps change the model's forwards (in training with labels its output
    has no logits), which a script should ask for."""

    cross_entropy: bool = True
    """With ``enabled``: the causal-LM loss from the hidden states and the head, without the
    logits (``zero_ext.fused.linear_cross_entropy``)."""

    norms: bool = True
    """With ``enabled``: RMSNorm and LayerNorm modules on the fused norm kernels."""

    activations: bool = True
    """With ``enabled``: SwiGLU MLPs (Llama family) and GPT-2's bias + GeLU."""

    softmax: bool = True
    """With ``enabled``: a model on transformers' eager attention computes its attention
    probabilities with the fused scaled masked softmax + dropout (``"zero_ext_eager"``); SDPA
    and flash attention, faster still, are left as they are."""

    modules: dict[str, str] = field(default_factory=dict)
    """With ``enabled``: further classes to swap, class name -> kind (``"rms_norm"``,
    ``"layer_norm"``, ``"swiglu_mlp"``, ``"bias_gelu_mlp"`` or ``"causal_lm"``; what each needs:
    ``zero_ext.fused.apply``), swapped whatever the switches say."""

    def __post_init__(self):
        from zero_ext.fused.apply import MODULE_KINDS

        for name in ("enabled", "cross_entropy", "norms", "activations", "softmax"):
            setattr(self, name, _check_bool(name, getattr(self, name)))
        if not isinstance(self.modules, Mapping):
            raise ConfigError("modules", "expected a JSON object of class name -> kind, e.g. "
                              f"{{\"MyRMSNorm\": \"rms_norm\"}}, {_got(self.modules)}")
        for name, kind in self.modules.items():
            if kind not in MODULE_KINDS:
                raise ConfigError(_join("modules", str(name)), "expected one of "
                                  f"{', '.join(map(repr, MODULE_KINDS))}, {_got(kind)}")
        self.modules = dict(self.modules)


@dataclass(kw_only=True)
class ZeroExtSettings(_Section):
    """``zero_ext``: settings of zero_ext's own, with no DeepSpeed counterpart."""

    stall_timeout_s: float = 20.0
    """Seconds a collective may make no progress before every rank raises
    ``zero_ext.comm.CollectiveStallError`` naming the rank and node that did not arrive or
    stopped answering, the collective (op, size, sequence number) and the zero_ext call that
    issued it (> 0); the diagnosis adds 3-6 s, so the default reports within 30 s. Slow collectives
    that every rank has joined, and a rank busy inside a zero_ext call (writing a checkpoint),
    count as progress; a rank in its own code while the others wait does not: raise this when
    one rank legitimately works alone for longer (an evaluation on rank 0)."""

    checkpoint: PeriodicCheckpointSettings = field(default_factory=PeriodicCheckpointSettings)
    """Periodic checkpoints and auto-resume after a restart (see PeriodicCheckpointSettings)."""

    compression: CompressionSettings = field(default_factory=CompressionSettings)
    """Compressed gradient reductions and parameter gathers (see CompressionSettings)."""

    fused_kernels: FusedKernelsSettings = field(default_factory=FusedKernelsSettings)
    """zero_ext's fused training ops swapped into the model (see FusedKernelsSettings)."""

    _SECTIONS: ClassVar[dict[str, type]] = {"checkpoint": PeriodicCheckpointSettings,
                                            "compression": CompressionSettings,
                                            "fused_kernels": FusedKernelsSettings}

    def __post_init__(self):
        self.stall_timeout_s = _check_number("stall_timeout_s", self.stall_timeout_s, lo=0.0,
                                             lo_open=True)
        self.checkpoint = _section("checkpoint", self.checkpoint,
                                   PeriodicCheckpointSettings)
        self.compression = _section("compression", self.compression,
                                    CompressionSettings)
        self.fused_kernels = _section("fused_kernels", self.fused_kernels,
                                      FusedKernelsSettings)


_COMM_DTYPES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
}
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(kw_only=True)
class ZeroConfig(_Section):
    """A whole zero_ext training configuration: DeepSpeed's top-level keys.

    Build one with :meth:`load` (dict, JSON path, or an instance) or directly in Python, where
    sections may be given as dicts. ``train_batch_size = train_micro_batch_size_per_gpu *
    gradient_accumulation_steps * world size``; any two determine the third, see
    :meth:`resolve_batch`.
    """

    train_batch_size: int | None = None
    """Samples per optimizer step over all ranks (>= 1), or None to derive it."""

    train_micro_batch_size_per_gpu: int | None = None
    """Samples per forward/backward on one rank (>= 1), or None to derive it."""

    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step on each rank (>= 1), or None to derive it."""

    sequence_parallel_size: int | None = None
    """DeepSpeed's Ulysses sequence parallelism: N ranks share each sequence, and the
    data-parallel size is the world size / N. zero_ext has none, so only 1 (or unset)."""

    data_parallel_size: int | None = None
    """DeepSpeed reads it only together with ``sequence_parallel_size``, as the data-parallel
    side of the (data, sequence) device mesh, which must then cover every rank: here, where
    every rank is data-parallel, it must be the world size (checked by :meth:`resolve_batch`).
    Alone it has no effect in DeepSpeed, and is warned about here."""

    gradient_clipping: float = 1.0
    """Clip the global gradient norm to this value before each step; 0 or below (DeepSpeed's
    -1 too) turns clipping off, as DeepSpeed clips only above 0. The default, 1.0, is
    DeepSpeed's (``GRADIENT_CLIPPING_DEFAULT``): a config without the key clips."""

    fp16: FP16Config = field(default_factory=FP16Config)
    """fp16 mixed precision and loss scaling."""

    bf16: BF16Config = field(default_factory=BF16Config)
    """bf16 mixed precision (key ``bf16`` or DeepSpeed's older ``bfloat16``, read when ``bf16``
    is absent or null, as DeepSpeed does; null alone is bf16 off)."""

    optimizer: OptimizerConfig | None = None
    """The optimizer to build. None: the engine uses AdamW with ``AdamParams``' defaults, unless
    an optimizer is passed to ``initialize``."""

    scheduler: SchedulerConfig | None = None
    """The learning-rate schedule to build, or None for a constant learning rate (unless a
    scheduler is passed to ``initialize``)."""

    zero_optimization: ZeroOptimizationConfig = field(default_factory=ZeroOptimizationConfig)
    """The ZeRO stage and its communication settings."""

    activation_checkpointing: ActivationCheckpointingConfig | None = None
    """Options of activation checkpointing; None when the config has no such section (or it
    is null): initialize then leaves ``zero_ext.checkpointing``'s settings as they are (set by
    a ``configure()`` before it, or by another engine's config)."""

    communication_data_type: str | None = None
    """Data type of gradient reductions: "fp32", "fp16" or "bf16" (also spelled "float32",
    "bfloat16", ...). None: the model's training dtype. See ``comm_dtype``."""

    data_types: DataTypesConfig = field(default_factory=DataTypesConfig)
    """DeepSpeed's ``data_types`` (``grad_accum_dtype``). See ``fp32_accumulation``."""

    tensorboard: MonitorConfig = field(default_factory=MonitorConfig)
    """DeepSpeed's TensorBoard monitor (see MonitorConfig)."""

    csv_monitor: MonitorConfig = field(default_factory=MonitorConfig)
    """DeepSpeed's CSV monitor (see MonitorConfig)."""

    steps_per_print: int | None = None
    """Print the report line every this many optimizer steps (>= 1); None (DeepSpeed's default)
    prints none."""

    wall_clock_breakdown: bool = False
    """Time forward, backward and step and log the breakdown."""

    zero_force_ds_cpu_optimizer: bool = True
    """With offload_optimizer, refuse an optimizer passed to ``initialize`` other than AdamW /
    Adam (DeepSpeed's key: it asks for its own CPU Adam). False runs torch's element-wise
    optimizers on the host shards (zero/client_optimizer.py)."""

    zero_allow_untested_optimizer: bool = False
    """At stages 1-3, run an optimizer passed to ``initialize`` that is neither AdamW / Adam nor
    one of torch's element-wise optimizers (which zero_ext runs exactly on shards) on flat fp32
    shards anyway, as DeepSpeed's key of this name does (zero/client_optimizer.py)."""

    zero_ext: ZeroExtSettings = field(default_factory=ZeroExtSettings)
    """zero_ext's own settings (not DeepSpeed keys): ``{"zero_ext": {"stall_timeout_s": 20}}``."""

    _ALIASES: ClassVar[dict[str, str]] = {"bfloat16": "bf16"}
    _SECTIONS: ClassVar[dict[str, type]] = {
        "fp16": FP16Config,
        "bf16": BF16Config,
        "optimizer": OptimizerConfig,
        "scheduler": SchedulerConfig,
        "zero_optimization": ZeroOptimizationConfig,
        "activation_checkpointing": ActivationCheckpointingConfig,
        "data_types": DataTypesConfig,
        "tensorboard": MonitorConfig,
        "csv_monitor": MonitorConfig,
        "zero_ext": ZeroExtSettings,
    }
    _IGNORED: ClassVar[dict[str, str]] = {
        "wandb": "",
        "comet": "",
        "comms_logger": "",
        "flops_profiler": "",
        "autotuning": "",
        "memory_breakdown": "",
        "dump_state": "",
        "timers": "",
        "log_level": "",
        "disable_python_gc": "",
        "aio": "used only by NVMe offload",
        "checkpoint": "zero_ext checkpoints need no tag validation and load at any world size",
        "seq_parallel_communication_data_type": "zero_ext has no sequence parallelism",
        "vocabulary_size": "",
        "use_data_before_expert_parallelism": "zero_ext has no expert parallelism",
        "datastates_ckpt": "zero_ext writes its own checkpoints",
        "allgather_size": "read by DeepSpeed only with zero_optimization: true; zero_ext's "
                          "allgather bucket size applies",
    }
    _INERT: ClassVar[dict[str, _Unsupported]] = {
        "prescale_gradients": _Unsupported(
            _is(False), "true is not supported (zero_ext averages gradients in the reduction "
            "itself); remove the key or set it to false"),
        "gradient_predivide_factor": _Unsupported(
            _is(1.0), "values other than 1.0 are not supported (zero_ext averages gradients in "
            "the reduction itself); remove the key or set it to 1.0"),
        "gradient_allreduce_op": _Unsupported(
            lambda value: isinstance(value, str) and value.lower() == "mean",
            "only \"mean\" is supported (gradients are averaged "
            "over ranks); for a sum, scale the loss by the world size"),
        "sparse_gradients": _Unsupported(
            _is(False), "true is not supported (gradients are reduced dense); remove the key or "
            "set it to false"),
        "disable_allgather": _Unsupported(_is(False), "true is not supported; remove the key"),
        "managed_gradient_accumulation": _Unsupported(
            _is(True), "false is not supported: call engine.backward() and engine.step() on "
            "every micro-batch and the engine steps the optimizer at the accumulation boundary; "
            "remove the key"),
        "dataloader_drop_last": _Unsupported(
            _is(False), "true is not supported by initialize()'s dataloader; build your own "
            "torch.utils.data.DataLoader(..., drop_last=True) with a DistributedSampler"),
        "amp": _Unsupported(
            _switched_off(), "NVIDIA Apex AMP is not supported; use \"fp16\": {\"enabled\": "
            "true} or \"bf16\": {\"enabled\": true}"),
        "torch_autocast": _Unsupported(
            _switched_off(), "torch.autocast integration is not supported; use \"bf16\" or "
            "\"fp16\", or wrap the forward in torch.autocast yourself"),
        "tensor_parallel": _Unsupported(
            lambda value: isinstance(value, Mapping) and value.get("autotp_size", 0) in (0, 1),
            "tensor parallelism is not supported; remove the section"),
        "expert_parallel": _Unsupported(
            _switched_off(), "expert parallelism is not supported; remove the section"),
        "pipeline": _Unsupported(
            _never, "pipeline parallelism is not supported; remove the section"),
        "hybrid_engine": _Unsupported(
            _switched_off(), "the hybrid engine is not supported; remove the section"),
        "compile": _Unsupported(
            _switched_off("deepcompile"),
            "DeepCompile is not supported; remove the section (torch.compile the model "
            "yourself if you like)"),
        "data_efficiency": _Unsupported(
            _switched_off(), "the data efficiency library is not supported; remove the section"),
        "curriculum_learning": _Unsupported(
            _switched_off(), "curriculum learning is not supported; remove the section"),
        "progressive_layer_drop": _Unsupported(
            _switched_off(), "progressive layer drop is not supported; remove the section"),
        "elasticity": _Unsupported(
            _switched_off(), "DeepSpeed's elasticity (choosing batch sizes for a range of GPU "
            "counts) is not supported; remove the section. For restarts at another world size "
            "give train_batch_size and train_micro_batch_size_per_gpu (the accumulation is "
            "derived) and see zero_ext.checkpoint's auto_resume"),
        "nebula": _Unsupported(
            _switched_off(), "Nebula checkpointing is not supported; remove the section"),
        "sparse_attention": _Unsupported(
            _never, "DeepSpeed sparse attention is not supported; remove the section"),
        "compression_training": _Unsupported(
            _never, "DeepSpeed compression is not supported; remove the section"),
        "quantize_training": _Unsupported(
            _never, "quantized training (MoQ) is not supported; remove the section"),
        "weight_quantization": _Unsupported(
            _never, "weight quantization is not supported; remove the section"),
        "eigenvalue": _Unsupported(
            _never, "eigenvalue-based MoQ is not supported; remove the section"),
    }

    @classmethod
    def _parse(cls, data: Any, path: str, notes: list[str]):
        # DeepSpeed reads "bfloat16" only where "bf16" is absent or null (get_bfloat16_config).
        if isinstance(data, Mapping) and "bf16" in data and "bfloat16" in data:
            data = dict(data)  # never modify the caller's dict
            if data["bf16"] is None:
                del data["bf16"]
            else:
                del data["bfloat16"]
                notes.append("bfloat16 (DeepSpeed reads bf16 when both are given)")
        return super()._parse(data, path, notes)

    def __post_init__(self):
        for name in ("train_batch_size", "train_micro_batch_size_per_gpu",
                     "gradient_accumulation_steps", "sequence_parallel_size",
                     "data_parallel_size"):
            setattr(self, name, _optional(_check_int, name, getattr(self, name), lo=1))
        if self.sequence_parallel_size is not None and self.sequence_parallel_size > 1:
            raise ConfigError(
                "sequence_parallel_size", f"{self.sequence_parallel_size} splits each sequence "
                f"over {self.sequence_parallel_size} ranks (DeepSpeed-Ulysses), which zero_ext "
                "does not have: every rank is data-parallel here. Remove the key or set it to 1")
        if self.data_parallel_size is not None and self.sequence_parallel_size is None:
            _warn_keys([(f"data_parallel_size = {self.data_parallel_size} (DeepSpeed reads it "
                         "only together with sequence_parallel_size; the data-parallel size is "
                         "the world size)")])
        self.gradient_clipping = _check_number("gradient_clipping", self.gradient_clipping)
        self.fp16 = _section("fp16", self.fp16, FP16Config)
        # null is bf16 off, as DeepSpeed reads it (fp16 null fails there, and here)
        self.bf16 = _section("bf16", self.bf16, BF16Config, optional=True) or BF16Config()
        self.optimizer = _section("optimizer", self.optimizer, OptimizerConfig, optional=True)
        self.scheduler = _section("scheduler", self.scheduler, SchedulerConfig, optional=True)
        if isinstance(self.zero_optimization, bool):
            # DeepSpeed's deprecated form: true is stage 1, false stage 0
            stage = int(self.zero_optimization)
            _warn_keys([f"zero_optimization = {json.dumps(self.zero_optimization)} is read as "
                        f"{{\"stage\": {stage}}}"],
                       headline="DeepSpeed's deprecated ZeRO switch, applied; write the section "
                       "instead")
            self.zero_optimization = {"stage": stage}
        self.zero_optimization = _section("zero_optimization", self.zero_optimization,
                                          ZeroOptimizationConfig)
        self.activation_checkpointing = _section(
            "activation_checkpointing", self.activation_checkpointing,
            ActivationCheckpointingConfig, optional=True)
        self.communication_data_type = _optional(
            _check_choice, "communication_data_type", self.communication_data_type,
            spellings=_COMM_DTYPES)
        self.data_types = _section("data_types", self.data_types, DataTypesConfig)
        self.steps_per_print = _optional(_check_int, "steps_per_print", self.steps_per_print,
                                         lo=1)
        # DeepSpeed reads it as given (a string there is true)
        self.wall_clock_breakdown = _check_bool("wall_clock_breakdown", self.wall_clock_breakdown,
                                                strings=False)
        self.zero_ext = _section("zero_ext", self.zero_ext, ZeroExtSettings)
        if self.fp16.enabled and self.bf16.enabled:
            raise ConfigError("fp16.enabled", "fp16 and bf16 are both enabled; enable at most "
                              "one of them")
        accum, training = self.data_types.grad_accum_dtype, self.training_dtype_name
        if self.data_types.param_dtype not in (None, training):
            raise ConfigError(
                "data_types.param_dtype",
                f"{self.data_types.param_dtype} conflicts with {training} training (the fp16 / "
                f"bf16 sections set the parameters' dtype); enable the matching section or "
                f"remove the key")
        if accum is not None and accum not in ("fp32", training):
            also = "" if training == "fp32" else f" or \"{training}\""
            raise ConfigError(
                "data_types.grad_accum_dtype",
                f"{accum} with {training} training is not supported (DeepSpeed refuses the mix "
                f"at stage 0 and ignores it above); use \"fp32\"{also}, or remove the key")
        _warn_inert_compression_keys(self.compression(), self.zero_ext.compression.gradients)

    @classmethod
    def load(cls, config: dict | str | os.PathLike | ZeroConfig) -> ZeroConfig:
        """The configuration from a dict (not modified), a path to a JSON file, or a ZeroConfig
        (returned as is). Warns once about DeepSpeed keys that have no effect here."""
        if isinstance(config, ZeroConfig):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if isinstance(config, (str, os.PathLike)):
            return cls.from_dict(read_json_config(config))
        raise TypeError(
            "ZeroConfig.load: expected a dict, a path to a JSON file or a ZeroConfig, got "
            f"{type(config).__name__}")

    def resolve_batch(self, world_size: int) -> BatchSizes:
        """The full batch-size triple for ``world_size`` data-parallel ranks.

        ``train_batch_size = micro * accumulation * world_size``. Given all three, they must
        agree; given two, the third is derived (and must come out whole); given only
        ``train_batch_size``, accumulation is 1 and the micro batch is ``train_batch_size /
        world_size``; given only the micro batch, accumulation is 1; given none, micro batch and
        accumulation are 1. Accumulation alone is an error (it fixes no batch size).
        """
        world_size = _check_int("world_size", world_size, lo=1)
        if (self.data_parallel_size is not None and self.sequence_parallel_size is not None
                and self.data_parallel_size != world_size):
            raise ConfigError(
                "data_parallel_size", f"{self.data_parallel_size} with sequence_parallel_size "
                f"{self.sequence_parallel_size}, but the world size is {world_size}: the "
                "data-parallel size is the world size (DeepSpeed's data x sequence mesh must "
                f"cover every rank too); set it to {world_size} or remove it")
        tbs = self.train_batch_size
        micro = self.train_micro_batch_size_per_gpu
        gas = self.gradient_accumulation_steps
        if tbs is not None and micro is not None and gas is not None:
            if tbs != micro * gas * world_size:
                raise ValueError(
                    f"train_batch_size ({tbs}) != train_micro_batch_size_per_gpu ({micro}) * "
                    f"gradient_accumulation_steps ({gas}) * world size ({world_size}) = "
                    f"{micro * gas * world_size}; fix one of the three or drop train_batch_size "
                    "to have it derived")
        elif tbs is not None and micro is not None:
            gas = _divide_exactly(
                tbs, micro * world_size, "gradient_accumulation_steps",
                f"train_batch_size ({tbs}) / (train_micro_batch_size_per_gpu ({micro}) * "
                f"world size ({world_size}))")
        elif tbs is not None and gas is not None:
            micro = _divide_exactly(
                tbs, gas * world_size, "train_micro_batch_size_per_gpu",
                f"train_batch_size ({tbs}) / (gradient_accumulation_steps ({gas}) * "
                f"world size ({world_size}))")
        elif micro is not None and gas is not None:
            tbs = micro * gas * world_size
        elif tbs is not None:
            gas = 1
            micro = _divide_exactly(tbs, world_size, "train_micro_batch_size_per_gpu",
                                    f"train_batch_size ({tbs}) / world size ({world_size})")
        elif micro is not None:
            gas = 1
            tbs = micro * world_size
        elif gas is not None:
            raise ValueError(
                "gradient_accumulation_steps: given without a batch size; also give "
                "train_micro_batch_size_per_gpu or train_batch_size")
        else:
            micro, gas = 1, 1
            tbs = world_size
        return BatchSizes(train_batch_size=tbs, train_micro_batch_size_per_gpu=micro,
                          gradient_accumulation_steps=gas)

    @property
    def mixed_precision(self) -> torch.dtype | None:
        """The 16-bit training dtype: torch.float16 (fp16), torch.bfloat16 (bf16) or None."""
        if self.fp16.enabled:
            return torch.float16
        if self.bf16.enabled:
            return torch.bfloat16
        return None

    @property
    def nonfinite_gradients(self) -> str:
        """What a step does with an inf/nan global gradient norm: "apply" where
        bf16.check_grad_overflow is false (warned about each time), else "skip" (fp16, where
        the loss scale is lowered; bf16 and fp32, warned about each time), as DeepSpeed's ZeRO
        optimizers do (its fp32 stage 0 applies the update; zero_ext skips it there too)."""
        if self.bf16.enabled and self.bf16.check_grad_overflow is False and \
                not self.fp16.enabled:
            return "apply"
        return "skip"

    @property
    def training_dtype_name(self) -> str:
        """"fp16", "bf16" or "fp32": the dtype the model trains in."""
        return "fp16" if self.fp16.enabled else "bf16" if self.bf16.enabled else "fp32"

    @property
    def buffer_dtype(self) -> torch.dtype | None:
        """data_types.buffer_dtype under fp16/bf16 (None: buffers keep the dtype they came
        in; under fp32 training always None, as in DeepSpeed)."""
        name = self.data_types.buffer_dtype
        return None if name is None or self.mixed_precision is None else _TORCH_DTYPES[name]

    @property
    def fp32_accumulation(self) -> bool:
        """Whether stages 0-1 sum a window's gradients in fp32 (data_types.grad_accum_dtype
        "fp32" with 16-bit training); stages 2-3 always do."""
        return self.data_types.grad_accum_dtype == "fp32" and self.training_dtype_name != "fp32"

    @property
    def comm_dtype(self) -> torch.dtype | None:
        """``communication_data_type`` as a torch dtype, or None if not set."""
        if self.communication_data_type is None:
            return None
        return _TORCH_DTYPES[self.communication_data_type]

    def compression(self) -> CompressionPlan:
        """What to compress (``zero_ext.compression`` and DeepSpeed's ZeRO++ keys, resolved);
        raises ConfigError for a combination that cannot run (checked at load)."""
        zero = self.zero_optimization
        grads, weights = self.zero_ext.compression.gradients, self.zero_ext.compression.weights
        stage = zero.stage
        plan = {"gradients": grads.method, "grad_block": grads.block_size,
                "error_feedback": grads.error_feedback or grads.method == "topk",
                "two_hop": grads.two_hop, "density": grads.density, "momentum": grads.momentum,
                "warmup_steps": grads.warmup_steps,
                "freeze_variance": grads.freeze_variance and grads.method == "topk",
                "compress_momentum": grads.compress_momentum and grads.method == "topk",
                "weights": weights.method,
                "weight_block": weights.block_size}
        if stage == 3 and zero.zero_quantized_gradients:
            if grads.method != "none":
                raise ConfigError(
                    "zero_ext.compression.gradients.method",
                    f"{grads.method!r} and zero_optimization.zero_quantized_gradients (DeepSpeed's "
                    "qgZ: int4) both say how gradients are compressed; keep one of them (with "
                    "qgZ, zero_ext.compression.gradients.error_feedback true adds error "
                    "feedback)")
            plan.update(gradients="int4", error_feedback=grads.error_feedback)
        if stage == 3 and zero.zero_quantized_weights:
            if weights.method != "none":
                raise ConfigError(
                    "zero_ext.compression.weights.method",
                    f"{weights.method!r} and zero_optimization.zero_quantized_weights (DeepSpeed's "
                    "qwZ: int8) both say how weights are compressed; keep one of them")
            plan["weights"] = "int8"
        if plan["gradients"] in ("int8", "int4") and stage == 0:
            raise ConfigError(
                "zero_ext.compression.gradients.method",
                f"{plan['gradients']!r} quantizes the reduce-scatter of stages 1-3; stage 0 "
                "all-reduces whole buckets: set zero_optimization.stage to 1-3, or use \"topk\" "
                "at stage 0")
        if plan["gradients"] == "topk" and stage == 3:
            raise ConfigError(
                "zero_ext.compression.gradients.method",
                "\"topk\" keeps a full-size fp32 residual (and momentum) of every gradient on "
                "every rank, the memory stage 3 partitions gradients to save: use \"int8\" or "
                "\"int4\" (with error_feedback) at stage 3, or top-k at stages 0-2")
        if plan["weights"] != "none" and stage != 3:
            raise ConfigError(
                "zero_ext.compression.weights.method",
                f"{plan['weights']!r} compresses stage 3's parameter gathers and the stage is "
                f"{stage} (stages 0-2 keep every parameter on every rank): set "
                "zero_optimization.stage to 3, or the method to \"none\"")
        return CompressionPlan(**plan)


_TOPK_ONLY = ("density", "momentum", "warmup_steps", "freeze_variance", "compress_momentum")


def _warn_inert_compression_keys(plan: CompressionPlan,
                                 grads: GradientCompressionSettings) -> None:
    """At load (its errors are the plan's): one warning naming the gradient-compression keys
    set away from their defaults that the method in use does not read."""
    defaults = GradientCompressionSettings()
    inert = [name for name in _TOPK_ONLY if plan.gradients != "topk"
             and getattr(grads, name) != getattr(defaults, name)]
    if plan.gradients == "none" and grads.error_feedback:
        inert.append("error_feedback")
    _warn_keys([f"zero_ext.compression.gradients.{name} = {json.dumps(getattr(grads, name))}"
                for name in inert],
               headline=f"these keys belong to another compression method than the gradients' "
                        f"{plan.gradients!r} and have no effect")


def _divide_exactly(numerator: int, denominator: int, derived: str, arithmetic: str) -> int:
    quotient, remainder = divmod(numerator, denominator)
    if remainder or quotient < 1:
        raise ValueError(
            f"{derived}: cannot be derived, {arithmetic} = {numerator / denominator:g} is not a "
            "positive whole number; change the batch sizes or give all three consistently")
    return quotient


def read_json_config(path: str | os.PathLike) -> dict:
    """A JSON config file as a dict; a key given twice in one object, or invalid JSON, is a
    ValueError naming the file and the place."""
    def no_duplicates(pairs):
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError(f"zero_ext config {os.fspath(path)!r}: key {key!r} appears "
                                 "twice in one JSON object; keep one")
            seen[key] = value
        return seen

    if not os.path.exists(path):
        raise FileNotFoundError(
            f"zero_ext config {os.fspath(path)!r}: no such file; pass the path of a DeepSpeed "
            "JSON config file, or the config as a dict")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"zero_ext config {os.fspath(path)!r} is a directory; pass the path of a DeepSpeed "
            "JSON config file inside it (e.g. ds_config.json), or the config as a dict")
    with open(path, encoding="utf-8") as file:
        text = file.read()
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as error:
        problem = f"line {error.lineno}, column {error.colno}: {error.msg}"
    # DeepSpeed reads its config files as Hjson (comments, trailing commas, unquoted keys),
    # with the hjson package it depends on.
    try:
        import hjson
    except ImportError:
        raise ValueError(f"zero_ext config {os.fspath(path)!r} is not valid JSON: {problem} "
                         f"(DeepSpeed reads Hjson, with comments and trailing commas: "
                         f"`pip install hjson` to read it as DeepSpeed does)") from None
    try:
        return hjson.loads(text, object_pairs_hook=no_duplicates)
    except hjson.HjsonDecodeError as error:
        raise ValueError(f"zero_ext config {os.fspath(path)!r} is neither valid JSON ({problem}) "
                         f"nor Hjson (line {error.lineno}, column {error.colno}: "
                         f"{error.msg})") from None
