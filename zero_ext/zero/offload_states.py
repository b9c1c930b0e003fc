"""engine.offload_states() / engine.reload_states(), DeepSpeed's: the engine's device-resident
training state moved to host memory while something else needs the accelerator (an RLHF
framework's colocated inference engine generating), and back before training goes on.

ZeroEngine's methods of those names (engine_api.py, and the optimizer's, which RLHF frameworks
call) come here. What can be moved is named by DeepSpeed's OffloadStateTypeEnum:
  optim_states            Adam's moments of the shards stepped on the device
  hp_params               the fp32 master weights, where they are not the model's own weights
                          (a 16-bit model; in fp32 the masters are views of lp_params)
  lp_params               the model's weights: the flat buffers the parameters view (and the
                          optimizer's views of them), stage 3's shards and hpZ's copies
  lp_grads                the reduced (or accumulating) gradients a window holds, and .grad
  contiguous_grad_buffer  the buckets' communication buffers (held only inside backward)
State already in host memory (offload_optimizer's host-stepped buckets) stays where it is.

A buffer is moved whole: a host copy of its storage is made and every tensor the engine holds
on it (a flat buffer, the parameters viewing it, the optimizer's views) is re-pointed there with
`tensor.data = ...`, so every holder keeps its object and sees the move, and the device storage,
no longer referenced, is freed. Reloading copies into fresh device storage the same way, so
the values come back bit for bit. While anything is away the engine refuses what would read it
(`OffloadedStates.check`): a forward needs lp_params only, so generation and log-probs may run
while the optimizer's state is on the host; everything else waits for reload_states().
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import torch

from zero_ext.zero.offload import host_buffer

__all__ = ["OffloadDeviceEnum", "OffloadStateTypeEnum", "OffloadedStates", "move_back",
           "move_to_host"]


class OffloadStateTypeEnum(str, enum.Enum):
    """DeepSpeed's names (deepspeed.runtime.zero.offload_config), which compare equal to the
    plain strings; DeepSpeed's own members are accepted too."""

    optim_states = "optim_states"
    hp_params = "hp_params"
    lp_params = "lp_params"
    lp_grads = "lp_grads"
    contiguous_grad_buffer = "contiguous_grad_buffer"


class OffloadDeviceEnum(str, enum.Enum):
    """DeepSpeed's target devices; offload_states moves to "cpu" only, as DeepSpeed's does."""

    none = "none"
    cpu = "cpu"
    nvme = "nvme"


KINDS = tuple(kind.value for kind in OffloadStateTypeEnum)


@dataclass(eq=False)
class _Moved:
    buffer: torch.Tensor        # the storage's bytes where they are now (uint8, 1-D)
    tensors: list[torch.Tensor]  # every tensor the engine holds on that storage


class OffloadedStates:
    """What offload_states() moved to the host, per kind, until reload_states()."""

    def __init__(self):
        self.moved: dict[str, list[_Moved]] = {}

    def check(self, action: str, needs: Collection[str] = KINDS) -> None:
        """Refuses `action` while a kind it reads is offloaded."""
        if not self.moved:
            return
        away = [kind for kind in KINDS if kind in self.moved and kind in needs]
        if away:
            raise RuntimeError(
                f"zero_ext: {action} while the engine's {', '.join(away)} are offloaded "
                f"(engine.offload_states()); call engine.reload_states() first, on every rank. "
                "A forward (generation, log-probs) may run while everything but lp_params is "
                "offloaded")

    def nbytes(self) -> int:
        """Bytes moved to host memory (memory_by_location counts them as "host")."""
        return sum(m.buffer.numel() for moved in self.moved.values() for m in moved)


def move_to_host(engine, include, device, pin_memory: bool, non_blocking: bool) -> None:
    """engine.offload_states(): see its docstring."""
    device = str(getattr(device, "value", device))
    if device == "none":
        warnings.warn("zero_ext: engine.offload_states(device='none'): nothing is moved "
                      "(DeepSpeed warns the same)", stacklevel=3)
        return
    if device == "nvme":
        raise ValueError("zero_ext: engine.offload_states(device='nvme'): NVMe is not supported "
                         "for offloading states (nor in DeepSpeed); use device='cpu'")
    if device != "cpu":
        raise ValueError(f"zero_ext: engine.offload_states(device={device!r}): states go to "
                         "'cpu' (OffloadDeviceEnum.cpu)")
    if isinstance(include, str):  # one state (DeepSpeed's enum members are strings too)
        include = [include]
    kinds = KINDS if include is None else [str(getattr(k, "value", k)) for k in include]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"zero_ext: engine.offload_states(include=...): no state {unknown}; "
                         f"the states are {list(KINDS)} (OffloadStateTypeEnum)")
    if engine.offload_param:
        raise RuntimeError(
            "zero_ext: engine.offload_states() with zero_optimization.offload_param: the "
            "parameter shards already live in host memory, and moving states across devices "
            "is not supported with offloaded parameters (DeepSpeed refuses it too). Turn "
            "offload_param off to use offload_states")
    if engine.grad_buckets._active:
        raise RuntimeError("zero_ext: engine.offload_states() inside backward; call it "
                           "between steps (or between a backward and its step)")
    engine._settle_step()  # a deferred CPU step still writes the weights and moments
    if engine.partitioned is not None:
        engine.partitioned.release_all()  # DeepSpeed's empty_partition_cache() first
    if engine.device.type == "cuda":
        # Side streams (offload's gradient copies and uploads) done with what moves: a copy
        # still reading a gradient holds the only reference that keeps its memory alive.
        torch.cuda.synchronize(engine.device)
    record = engine._offloaded_states
    for kind in kinds:
        if kind in record.moved:
            continue
        moved = record.moved[kind] = []
        # Recorded as each storage moves: a failure part-way (host memory exhausted) leaves
        # what moved refused and reloadable, not re-pointed and forgotten.
        try:
            for group in _storages(_tensors(engine, kind)):
                moved.append(_move(group, host_buffer(group.buffer.numel(), torch.uint8,
                                                      pin_memory), non_blocking))
        except BaseException:
            if not moved:
                del record.moved[kind]
            raise
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()  # the freed blocks go back to the driver, for others to use


def move_back(engine, non_blocking: bool) -> None:
    """engine.reload_states(): everything offload_states() moved, back on the device."""
    record = engine._offloaded_states
    for kind in list(record.moved):
        for group in record.moved.pop(kind):
            _move(group, torch.empty(group.buffer.numel(), dtype=torch.uint8,
                                     device=engine.device), non_blocking)


def _move(group: _Moved, to: torch.Tensor, non_blocking: bool) -> _Moved:
    """Copies the group's storage into `to` and re-points each of its tensors at the same
    place there; the old storage is then the caller's last reference."""
    to.copy_(group.buffer, non_blocking=non_blocking)
    for tensor in group.tensors:
        typed = to.view(tensor.dtype)
        at = (tensor.storage_offset() * tensor.element_size()
              - group.buffer.storage_offset()) // tensor.element_size()
        tensor.data = typed.as_strided(tensor.shape, tensor.stride(),
                                       typed.storage_offset() + at)
    group.buffer = to
    return group


def _storages(tensors: list[torch.Tensor]) -> list[_Moved]:
    """The tensors grouped by the storage they are on, each with all of that storage's bytes."""
    groups: dict[int, _Moved] = {}
    seen: set[int] = set()
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if id(tensor) in seen or storage.nbytes() == 0:
            continue
        seen.add(id(tensor))
        key = storage.data_ptr()
        if key not in groups:
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            groups[key] = _Moved(whole, [])
        groups[key].tensors.append(tensor)
    return list(groups.values())


def _tensors(engine, kind: str) -> list[torch.Tensor]:
    """The engine's tensors of `kind` on its device, with every view it holds of them."""
    replicated = engine.replicated_optimizer is not None
    shards = [] if replicated else engine.optimizer.shards
    on_host = {id(s) for s in engine.offload.shards} if engine.offload is not None else set()
    stepped_here = [s for s in shards if id(s) not in on_host]
    if kind == "optim_states":
        user = engine.optimizer if replicated else getattr(engine.optimizer, "optimizer", None)
        if user is not None:  # a torch optimizer's own state (client_optimizer.py's too)
            found = [t for state in user.state.values() for t in state.values()
                     if torch.is_tensor(t)]
        else:
            found = [t for s in stepped_here for t in (s.exp_avg, s.exp_avg_sq)]
    elif kind == "hp_params":  # masters that are not views of the model's weights
        found = [s.master for s in stepped_here
                 if s.weights_16bit is not None or s.model_weights is not None]
    elif kind == "lp_params":
        found = list(engine.flat_params)
        if engine.partitioned is not None:
            found += [t for unit in engine.partitioned.units for t in unit.shards]
            if engine.partitioned.secondary is not None:
                found += list(engine.partitioned.secondary.shards.values())
        stored = {t.untyped_storage().data_ptr() for t in found}
        views = list(engine.module.parameters()) + [
            t for s in shards for t in (s.master, s.weights_16bit, s.model_weights)
            if t is not None]
        found += [t for t in views if t.untyped_storage().data_ptr() in stored]
    else:
        buckets = engine.grad_buckets.buckets
        if kind == "contiguous_grad_buffer":
            found = [b.flat for b in buckets if b.flat is not None]
        else:
            found = [t for b in buckets for t in (b.grad, b.accumulated, b.window,
                                                  *(p.grad for p in b.params))
                     if t is not None]
    return [t for t in found if t.device == engine.device]
