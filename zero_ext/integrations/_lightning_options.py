"""Lightning's DeepSpeedStrategy keyword arguments, as ZeroStrategy takes them.

`DeepSpeedStrategy(stage=3, offload_optimizer=True, reduce_bucket_size=5e8, ...)` becomes
`ZeroStrategy(...)` with the same arguments. Each sets the zero_ext (DeepSpeed) config key that
Lightning's strategy writes for it (lightning/pytorch/strategies/deepspeed.py,
`_create_default_config` and `_format_precision_config`); an argument not passed leaves the key
to the config, or to DeepSpeed's default. Where Lightning's strategy ignores its arguments
because a config was given, ZeroStrategy applies them and refuses a config that says otherwise
(docs/integrations/lightning.md). No Lightning import: the table is plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# argument -> the config key it sets (dotted), for the arguments that are one key each
_KEYS = {
    **{name: f"zero_optimization.{name}" for name in (
        "sub_group_size", "contiguous_gradients", "overlap_comm", "allgather_partitions",
        "reduce_scatter", "allgather_bucket_size", "reduce_bucket_size")},
    **{name: f"activation_checkpointing.{name}" for name in (
        "partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
        "synchronize_checkpoint_boundary")},
    **{name: f"aio.{name}" for name in (
        "block_size", "queue_depth", "single_submit", "overlap_events", "thread_count")},
    **{name: f"fp16.{name}" for name in (
        "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
        "min_loss_scale")},
    "zero_allow_untested_optimizer": "zero_allow_untested_optimizer",
}
# arguments that configure an offload section, used (as in Lightning) only with its switch on
# (their device arguments: offload_device below)
_OFFLOAD_OPTIMIZER = {"optimizer_buffer_count": "buffer_count", "nvme_path": "nvme_path",
                      "pin_memory": "pin_memory"}
_OFFLOAD_PARAM = {"params_buffer_count": "buffer_count", "params_buffer_size": "buffer_size",
                  "max_in_cpu": "max_in_cpu", "nvme_path": "nvme_path",
                  "pin_memory": "pin_memory"}
_DEVICES = {"offload_optimizer": "offload_optimizer_device", "offload_param":
            "offload_params_device"}
# arguments the strategy itself keeps (not config keys)
STRATEGY_OWN = ("logging_level", "exclude_frozen_parameters", "load_full_weights",
                "remote_device")  # remote_device: None only (check_names)
ACCEPTED = frozenset(_KEYS) | frozenset(_OFFLOAD_OPTIMIZER) | frozenset(_OFFLOAD_PARAM) | \
    frozenset(_DEVICES.values()) | frozenset(STRATEGY_OWN) | \
    {"zero_optimization", "logging_batch_size_per_gpu"}


def check_names(options: Mapping[str, Any]) -> None:
    """A TypeError naming any argument neither strategy takes, as Python's own would."""
    unknown = sorted(set(options) - ACCEPTED)
    if unknown:
        raise TypeError(f"ZeroStrategy() got unexpected keyword arguments {unknown}; it takes "
                        f"Lightning's DeepSpeedStrategy arguments ({sorted(ACCEPTED)}) besides "
                        "its own")
    if options.get("remote_device") is not None:
        raise ValueError(f"ZeroStrategy(remote_device={options['remote_device']!r}) is not "
                         "supported: zero_ext.Init keeps each shard where its parameter was "
                         "built; for the shards in host memory while training, pass "
                         "offload_parameters=True")


def offload_device(options: Mapping[str, Any], section: str) -> str:
    """The device of an offload section the strategy switches on: its device argument, else
    "cpu" (Lightning's default)."""
    return options.get(_DEVICES[section], "cpu")


def logging_batch_size(options: Mapping[str, Any]) -> int | None:
    """logging_batch_size_per_gpu, None for "auto": in Lightning's strategy it only stands in
    for the micro-batch size in DeepSpeed's throughput figures, so it is used where the train
    DataLoader gives none."""
    value = options.get("logging_batch_size_per_gpu", "auto")
    return None if value == "auto" else value


def config_fills(options: Mapping[str, Any], offload_optimizer: bool,
                 offload_parameters: bool) -> list[tuple[str, Any, str]]:
    """(dotted config key, value, the argument that set it) for the given DeepSpeedStrategy
    arguments."""
    fills = []
    for name, value in options.items():
        if name in _KEYS:
            fills.append((_KEYS[name], value, name))
    for switched, table, section in ((offload_optimizer, _OFFLOAD_OPTIMIZER, "offload_optimizer"),
                                     (offload_parameters, _OFFLOAD_PARAM, "offload_param")):
        if switched:
            fills += [(f"zero_optimization.{section}.{key}", options[name], name)
                      for name, key in table.items() if name in options]
    return fills
