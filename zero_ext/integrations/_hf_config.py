"""The zero_ext config of a Hugging Face Trainer run, completed from its TrainingArguments.

The TrainingArguments are the single source of truth for what the Trainer's loop depends on:
"auto" values (and batch sizes, clipping, precision and AdamW hyperparameters the config leaves
out) are taken from the arguments, and explicit values that contradict them are refused
together, in one error. Used by zero_ext.integrations.transformers (re-exported there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from transformers import TrainingArguments

from zero_ext.config import read_json_config
from zero_ext.integrations.config_fill import ConfigFiller, hidden_size_defaults

__all__ = ["config_dict", "fill_config", "fused_kernels_from_liger"]

def _optim_name(args: TrainingArguments) -> str:
    return str(getattr(args.optim, "value", args.optim))


# Liger-Kernel's switches (TrainingArguments.liger_kernel_config, the keyword arguments of its
# _apply_liger_kernel_to_instance) and zero_ext's fused_kernels keys taking their place. Liger
# switches RMSNorm and LayerNorm (SwiGLU and GeGLU) apart; zero_ext's `norms` (`activations`)
# covers both, so the two must agree. "rope" has no zero_ext kernel: rotary embeddings stay
# eager whatever it says.
_LIGER_KEYS = {"fused_linear_cross_entropy": "cross_entropy", "rms_norm": "norms",
               "layer_norm": "norms", "swiglu": "activations", "geglu": "activations"}
_LIGER_DEFAULTS = {"fused_linear_cross_entropy": True, "rms_norm": True, "layer_norm": True,
                   "swiglu": True, "geglu": True, "rope": True, "cross_entropy": False}


def fused_kernels_from_liger(liger_config: Mapping | None) -> dict:
    """zero_ext's `zero_ext.fused_kernels` section for TrainingArguments(use_liger_kernel=True,
    liger_kernel_config=`liger_config`): zero_ext's kernels take Liger's place (Liger needs
    Triton, and its fused head reads lm_head.weight past ZeRO-3's gather)."""
    given = dict(liger_config or {})
    unknown = sorted(set(given) - set(_LIGER_DEFAULTS))
    if unknown:
        raise ValueError(f"ZeroTrainer: liger_kernel_config has {unknown}, which zero_ext's "
                         f"kernels do not provide; its keys are {sorted(_LIGER_DEFAULTS)}")
    if given.get("cross_entropy"):
        raise ValueError("ZeroTrainer: liger_kernel_config cross_entropy=True asks for a "
                         "cross-entropy over materialised logits, which zero_ext does not "
                         "provide; use fused_linear_cross_entropy=True (the default) instead")
    switches = {**_LIGER_DEFAULTS, **given}
    section = {"enabled": True}
    for liger, ours in _LIGER_KEYS.items():
        if section.setdefault(ours, bool(switches[liger])) != bool(switches[liger]):
            pair = [k for k, v in _LIGER_KEYS.items() if v == ours]
            raise ValueError(f"ZeroTrainer: liger_kernel_config sets {pair[0]} and {pair[1]} "
                             f"differently, but zero_ext switches them together "
                             f"(fused_kernels.{ours}); give both the same value")
    return section


def config_dict(config: Mapping | str | os.PathLike) -> Mapping:
    """A Trainer's zero_ext config as given: the dict, or the JSON file's."""
    raw = read_json_config(config) if isinstance(config, (str, os.PathLike)) else config
    if not isinstance(raw, Mapping):
        raise TypeError(f"ZeroTrainer: zero_config must be a dict or a path to a JSON file, got "
                        f"{type(config).__name__}")
    return raw


def fill_config(config: Mapping | str | os.PathLike, args: TrainingArguments, *,
                world_size: int, max_steps: int | None = None,
                hidden_size: int | None = None, own_optimizer: bool = False) -> dict:
    """The zero_ext config (dict or JSON path) completed from `args`, as a new dict.

    Filled from the arguments when "auto" or absent (an explicit value must agree):
    train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size (with
    `world_size`), gradient_clipping (max_grad_norm), fp16/bf16.enabled, and the AdamW
    hyperparameters optimizer.params.lr/betas/eps/weight_decay (an absent optimizer section
    becomes AdamW when args.optim is the Trainer's torch AdamW and the Trainer was given no
    optimizer of its own (`own_optimizer`); otherwise it stays absent, and the Trainer's
    optimizer runs on the shards, as under transformers' DeepSpeed integration), and with
    use_liger_kernel
    the zero_ext.fused_kernels section (:func:`fused_kernels_from_liger`). Filled only when
    "auto": the scheduler's warmup_min_lr (0), warmup_max_lr (lr), warmup_num_steps and
    total_num_steps (from `max_steps`), and, from the model's `hidden_size`, DeepSpeed's
    bucket-size heuristics. Raises one ValueError listing every contradiction and every "auto"
    that has no counterpart among the arguments.
    """
    raw = config_dict(config)
    filler = ConfigFiller(raw)
    cfg = filler.config
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    filler.fill("train_micro_batch_size_per_gpu", micro,
                "TrainingArguments.per_device_train_batch_size")
    filler.fill("gradient_accumulation_steps", gas,
                "TrainingArguments.gradient_accumulation_steps")
    filler.fill("train_batch_size", micro * gas * world_size,
                f"per_device_train_batch_size * gradient_accumulation_steps * world size "
                f"({micro} * {gas} * {world_size})")
    filler.fill("gradient_clipping", float(max(args.max_grad_norm or 0.0, 0.0)),
                "TrainingArguments.max_grad_norm")
    # "auto" as transformers fills it (fp16 or fp16_full_eval: the engine evaluates in the
    # dtype it trains in); an absent section only from fp16 / bf16 themselves
    filler.fill("fp16.enabled", bool(args.fp16 or args.fp16_full_eval),
                "TrainingArguments.fp16|fp16_full_eval", fill_absent=bool(args.fp16))
    bf16_key = "bfloat16" if "bfloat16" in cfg and "bf16" not in cfg else "bf16"
    filler.fill(f"{bf16_key}.enabled", bool(args.bf16 or args.bf16_full_eval),
                "TrainingArguments.bf16|bf16_full_eval", fill_absent=bool(args.bf16))

    if cfg.get("optimizer") is None and not own_optimizer and \
            _optim_name(args) in ("adamw_torch", "adamw_torch_fused"):
        # The Trainer's torch AdamW variants; zero_ext's sharded AdamW computes the same update.
        cfg["optimizer"] = {"type": "AdamW", "params": {}}
    if cfg.get("optimizer") is not None:
        filler.fill("optimizer.params.lr", args.learning_rate, "TrainingArguments.learning_rate")
        filler.fill("optimizer.params.betas", [args.adam_beta1, args.adam_beta2],
                    "[TrainingArguments.adam_beta1, adam_beta2]")
        filler.fill("optimizer.params.eps", args.adam_epsilon, "TrainingArguments.adam_epsilon")
        filler.fill("optimizer.params.weight_decay", args.weight_decay,
                    "TrainingArguments.weight_decay")

    if isinstance(cfg.get("scheduler"), dict) and max_steps is not None:
        auto_only = {"fill_absent": False}
        filler.fill("scheduler.params.warmup_min_lr", 0.0, "the Trainer's schedules (0)",
                    must_match=False, **auto_only)
        filler.fill("scheduler.params.warmup_max_lr", args.learning_rate,
                    "TrainingArguments.learning_rate", **auto_only)
        # DeepSpeed's schedules warm up over max(2, warmup_num_steps) steps, so 0 and 1 give
        # the same schedule; the config requires >= 1.
        filler.fill("scheduler.params.warmup_num_steps", max(args.get_warmup_steps(max_steps), 1),
                    "TrainingArguments.warmup_steps (for max_steps "
                    f"{max_steps})", **auto_only)
        filler.fill("scheduler.params.total_num_steps", max_steps,
                    "the Trainer's max_steps", **auto_only)
    if args.use_liger_kernel:
        for key, value in fused_kernels_from_liger(args.liger_kernel_config).items():
            filler.fill(f"zero_ext.fused_kernels.{key}", value,
                        "TrainingArguments.use_liger_kernel / liger_kernel_config")
    if hidden_size:
        # DeepSpeed's Trainer integration sizes buckets from the model's width the same way.
        for path, value, source in hidden_size_defaults(hidden_size):
            filler.fill(path, value, source, fill_absent=False, must_match=False)

    return filler.finish("ZeroTrainer", "the TrainingArguments")
