"""DeepSpeed's memory estimators under their own names and signatures, answered with zero_ext's
figures (zero_ext.estimate: the bytes the engine allocates, not DeepSpeed's formulas).

    from zero_ext.estimate_deepspeed import estimate_zero3_model_states_mem_needs_all_live
    estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=8, num_nodes=1)

prints DeepSpeed's table (per CPU | per GPU | Options) for every offload choice, as
deepspeed.runtime.zero.stage3 / stage_1_and_2 do. The model states are counted as DeepSpeed
counts them, in fp16 with Adam: per GPU what zero_ext.estimate says one rank's device holds
(parameters, gradients, optimizer state, stage 3's gathered units); per CPU (one node) the
offloaded state of the node's ranks or, when larger, the fp32 model each of them builds before
initialize (none under zero_init, where zero_ext.Init builds shards), times
additional_buffer_factor, as DeepSpeed applies it. The figures differ from DeepSpeed's (its
formulas count 4 bytes per parameter of the largest layer on the GPU and a few other things
zero_ext does not keep); docs/deepspeed-compat.md.
"""

from __future__ import annotations

from torch import nn

from zero_ext.estimate import MemoryEstimate, estimate

__all__ = [
    "estimate_zero2_model_states_mem_needs",
    "estimate_zero2_model_states_mem_needs_all_cold",
    "estimate_zero2_model_states_mem_needs_all_live",
    "estimate_zero3_model_states_mem_needs",
    "estimate_zero3_model_states_mem_needs_all_cold",
    "estimate_zero3_model_states_mem_needs_all_live",
]


def _cpu_per_node(e: MemoryEstimate, total_params: int, num_gpus_per_node: int,
                  zero_init: bool, factor: float) -> int:
    built = 0 if zero_init else 4 * total_params * num_gpus_per_node
    return int(max(e.host.total * num_gpus_per_node, built) * factor)


def estimate_zero2_model_states_mem_needs(total_params: int, num_gpus_per_node: int = 1,
                                          num_nodes: int = 1, cpu_offload: bool = True,
                                          additional_buffer_factor: float = 1.5
                                          ) -> tuple[int, int]:
    """(bytes per CPU node, bytes per GPU) of ZeRO stage 2 on num_nodes x num_gpus_per_node
    ranks, optimizer state on the host with `cpu_offload`."""
    e = estimate(total_params, stage=2, world_size=num_nodes * num_gpus_per_node,
                 dtype="fp16", offload_optimizer=cpu_offload)
    return (_cpu_per_node(e, total_params, num_gpus_per_node, False, additional_buffer_factor),
            e.device.total)


def estimate_zero3_model_states_mem_needs(total_params: int, largest_layer_params: int,
                                          num_gpus_per_node: int = 1, num_nodes: int = 1,
                                          cpu_offload: bool = True,
                                          cpu_offload_params: bool = True,
                                          zero_init: bool = True,
                                          additional_buffer_factor: float = 1.5
                                          ) -> tuple[int, int, int]:
    """(bytes per CPU node, bytes per GPU, bytes of the largest layer gathered with what
    prefetch may have in flight) of ZeRO stage 3; `cpu_offload`: optimizer state on the host,
    `cpu_offload_params`: parameter shards too."""
    return _zero3(total_params, total_params, largest_layer_params, num_gpus_per_node,
                  num_nodes, cpu_offload, cpu_offload_params, zero_init,
                  additional_buffer_factor)


def _zero3(model: nn.Module | int, total_params: int, largest_layer_params: int | None,
           num_gpus_per_node: int, num_nodes: int, cpu_offload: bool,
           cpu_offload_params: bool, zero_init: bool, factor: float) -> tuple[int, int, int]:
    e = estimate(model, stage=3, world_size=num_nodes * num_gpus_per_node, dtype="fp16",
                 offload_optimizer=cpu_offload, offload_param=cpu_offload_params,
                 largest_unit=None if isinstance(model, nn.Module) else largest_layer_params)
    return (_cpu_per_node(e, total_params, num_gpus_per_node, zero_init, factor),
            e.device.total, e.device.gathered)


def _model_to_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, a tied one once; the most any one module holds directly), as DeepSpeed
    counts them (by identity: a meta-device model's have no storage to tell them apart)."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False))
                   for m in model.modules()), default=0)
    return total, largest


def _header(num_gpus_per_node: int, num_nodes: int, software: str) -> None:
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    print("Estimated memory needed for params, optim states and gradients for a:\n"
          f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n"
          f"SW: {software}")
    print("  per CPU  |  per GPU |   Options")


def _row(cpu: int, gpu: int, options: str) -> None:
    print(f" {cpu / 2**30:7.2f}GB | {gpu / 2**30:6.2f}GB | {options}")


def estimate_zero2_model_states_mem_needs_all_live(model: nn.Module, num_gpus_per_node: int = 1,
                                                   num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5
                                                   ) -> None:
    """Prints the stage-2 table for `model` (its parameters counted, a tied one once)."""
    total, _ = _model_to_params(model)
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node, num_nodes,
                                                   additional_buffer_factor)


def estimate_zero2_model_states_mem_needs_all_cold(total_params: int, num_gpus_per_node: int = 1,
                                                   num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5
                                                   ) -> None:
    """Prints the stage-2 table for a model of `total_params` parameters."""
    _header(num_gpus_per_node, num_nodes, f"Model with {int(total_params / 1e6)}M total params.")
    for cpu_offload in (True, False):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node, num_nodes, cpu_offload, additional_buffer_factor)
        _row(cpu, gpu, f"offload_optimizer={'cpu' if cpu_offload else 'none'}")


def estimate_zero3_model_states_mem_needs_all_live(model: nn.Module, num_gpus_per_node: int = 1,
                                                   num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5
                                                   ) -> None:
    """Prints the stage-3 table for `model`, laid out as the engine would (its gather units,
    not only its largest module, decide what is gathered)."""
    total, largest = _model_to_params(model)
    _zero3_table(model, total, largest, num_gpus_per_node, num_nodes, additional_buffer_factor)


def estimate_zero3_model_states_mem_needs_all_cold(total_params: int, largest_layer_params: int,
                                                   num_gpus_per_node: int = 1,
                                                   num_nodes: int = 1,
                                                   additional_buffer_factor: float = 1.5
                                                   ) -> None:
    """Prints the stage-3 table for a model of `total_params` parameters whose largest layer
    (gather unit) holds `largest_layer_params`."""
    _zero3_table(total_params, total_params, largest_layer_params, num_gpus_per_node,
                 num_nodes, additional_buffer_factor)


def _zero3_table(model: nn.Module | int, total: int, largest: int, num_gpus_per_node: int,
                 num_nodes: int, factor: float) -> None:
    _header(num_gpus_per_node, num_nodes, f"Model with {int(total / 1e6)}M total params, "
                                          f"{int(largest / 1e6)}M largest layer params.")
    for cpu_offload, cpu_offload_params in ((True, True), (True, False), (False, False)):
        for zero_init in (True, False):
            cpu, gpu, _ = _zero3(model, total, largest, num_gpus_per_node, num_nodes,
                                 cpu_offload, cpu_offload_params, zero_init, factor)
            _row(cpu, gpu, f"offload_param={'cpu' if cpu_offload_params else 'none'}, "
                           f"offload_optimizer={'cpu' if cpu_offload else 'none'}, "
                           f"zero_init={int(zero_init)}")
