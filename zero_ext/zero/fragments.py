"""One parameter's values as the engine holds them in pieces: fp32 master weights, Adam's
moments and the reduced gradient, read or written whole or as this rank's fragment.

zero_ext/utils.py's `safe_get_full_*` / `safe_set_full_*` / `safe_*_local_*` functions
(DeepSpeed's deepspeed.utils names) call these. A trainable parameter lives in one bucket
(zero/partition.py) at a slot; this rank's tensors of that bucket (the optimizer's shard, the
reduced gradient) cover [0, padded) at stage 0 and the rank's shard range at stages 1-3, so
the rank's fragment of the parameter is the overlap of the slot with that range. Reading a
whole parameter at stages 1-3 on several ranks is a collective: each rank puts its fragment
into a zero buffer and an all-reduce sums them (every element is owned by exactly one rank,
so the sum is exact). Writing a whole parameter is not: every rank is given the same value and
keeps its own fragment of it. The model's 16-bit weights follow the master weights at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zero_ext import comm
from zero_ext.zero.buckets import fp32_norm
from zero_ext.zero.optimizer import ShardState
from zero_ext.zero.partition import BucketLayout, ParamSlot

__all__ = ["STATE_KEYS", "Fragment", "fragment_of", "read", "write"]

# What a parameter's values can be asked for: the fp32 weights, Adam's two moments (the keys
# torch.optim.AdamW's state uses), the reduced gradient.
STATE_KEYS = ("exp_avg", "exp_avg_sq")
WHAT = ("fp32",) + STATE_KEYS + ("grad",)


@dataclass(frozen=True)
class Fragment:
    """Where one parameter's elements on this rank are."""

    layout: BucketLayout
    slot: ParamSlot
    start: int          # first element of the parameter (flattened) this rank holds
    end: int            # one past the last; start == end where this rank holds none of it
    tensor_start: int   # where `start` is in this rank's tensors of the bucket

    @property
    def numel(self) -> int:
        return self.end - self.start


def fragment_of(engine, param: torch.nn.Parameter) -> Fragment:
    """The fragment of `param` (a trainable parameter of `engine`) this rank holds."""
    layout = engine.layouts[param._zero_ext_layout]
    slot = next(s for s in layout.slots if engine._params[s.param_index] is param)
    first, last = (0, layout.padded_numel) if engine.stage == 0 else \
        layout.shard_range(engine.rank)
    start = min(max(first, slot.offset), slot.offset + slot.numel)
    end = max(min(last, slot.offset + slot.numel), start)
    return Fragment(layout, slot, start - slot.offset, end - slot.offset, start - first)


def _collective(engine) -> bool:
    return engine.stage >= 1 and engine.world_size > 1


def _shard(engine, layout: BucketLayout) -> ShardState:
    return next(s for s in engine.optimizer.shards if s.layout.index == layout.index)


def _check_what(engine, what: str) -> None:
    client = getattr(engine.optimizer, "client", None)
    if client is not None and what not in ("fp32", "grad"):
        keys = sorted({k for s in client.shards for k in client.elementwise_state(s)})
        if what not in keys:
            raise ValueError(
                f"zero_ext: no optimizer state {what!r}: the {type(client.client).__name__} "
                f"given to initialize keeps {', '.join(map(repr, keys)) or 'none yet'} per "
                f"element (torch optimizers create their state at their first step)")
    elif what not in WHAT:
        raise ValueError(f"zero_ext: no optimizer state {what!r}: zero_ext's AdamW keeps "
                         f"{', '.join(map(repr, STATE_KEYS))} per parameter")


def _grad_tensor(engine, fragment: Fragment) -> torch.Tensor:
    """This rank's reduced gradient of the fragment's bucket (where the step will read it)."""
    compression = engine.compression
    if compression.compresses_momentum and compression.variance_settled:
        raise ValueError(
            "zero_ext: no gradient to read or write: top-k compression with "
            "compress_momentum sends Adam's momentum in place of the gradient once the "
            "variance is frozen, so what was reduced is the first moment, not a gradient")
    bucket = engine.grad_buckets.buckets[fragment.layout.index]
    if bucket.norm is None:
        raise ValueError(
            "zero_ext: gradients are only available after the backward that ends an "
            "accumulation window and before engine.step() (is_gradient_accumulation_boundary() "
            "was False, the backward ran inside engine.no_sync(), or step() already used them)")
    if engine.offload is not None:
        host = engine.offload.host_grad(fragment.layout.index)
        if host is not None:
            return host
    return bucket.accumulated if bucket.accumulated is not None else bucket.grad


def _local_tensor(engine, fragment: Fragment, what: str) -> torch.Tensor:
    """The view of this rank's tensor (of `what`) that holds the fragment."""
    if what == "grad":
        whole = _grad_tensor(engine, fragment)
    else:
        shard = _shard(engine, fragment.layout)
        client = getattr(engine.optimizer, "client", None)
        if what == "fp32" or client is None:
            whole = shard.master if what == "fp32" else getattr(shard, what)
        else:
            state = client.elementwise_state(shard)
            if what not in state:
                raise ValueError(
                    f"zero_ext: the {type(client.client).__name__} keeps no {what!r} for this "
                    f"parameter's group (it has {sorted(state) or 'none'}: its groups differ, "
                    f"or it has not stepped yet)")
            whole = state[what]
    return whole[fragment.tensor_start:fragment.tensor_start + fragment.numel]


def _grad_scale(engine) -> float:
    """What the reduced gradient is multiplied by: the fp16 loss scale of its backward."""
    return engine.loss_scaler.scale if engine.loss_scaler is not None else 1.0


@torch.no_grad()
def read(engine, param: torch.nn.Parameter, what: str, local: bool = False) -> torch.Tensor:
    """`param`'s fp32 weights, moment or reduced gradient (fp32, on the training device):
    whole and shaped as the parameter (a collective at stages 1-3 on several ranks), or this
    rank's fragment, flat (`local`)."""
    _check_what(engine, what)
    _check_local(engine, param, local, writes_weights=False)
    engine._settle_step()
    if engine.replicated_optimizer is not None and what != "grad":
        return _replicated(engine, param, what).detach().to(engine.device, torch.float32,
                                                             copy=True)
    fragment = fragment_of(engine, param)
    values = _local_tensor(engine, fragment, what).to(engine.device, torch.float32, copy=True)
    if what == "grad":
        values.div_(_grad_scale(engine))
    if local:
        return values
    full = torch.zeros(fragment.slot.numel, dtype=torch.float32, device=engine.device)
    full[fragment.start:fragment.end] = values
    if _collective(engine):
        comm.all_reduce(full, bucket=fragment.layout.index)
    return full.view(fragment.slot.shape)


@torch.no_grad()
def write(engine, param: torch.nn.Parameter, value: torch.Tensor, what: str,
          local: bool = False) -> None:
    """Sets `param`'s fp32 weights, moment or reduced gradient: `value` whole (the same on
    every rank; each keeps its fragment), or this rank's fragment (`local`, flat). Not a
    collective. The model's weights follow fp32 weights at once; a gradient's bucket norm
    (clipping, the overflow check) is taken again."""
    _check_what(engine, what)
    _check_local(engine, param, local, writes_weights=what == "fp32")
    engine._settle_step()
    if engine.replicated_optimizer is not None and what != "grad":
        target = param.data if what == "fp32" else _replicated(engine, param, what)
        target.copy_(_checked(value, target.shape, what, local))
        return
    fragment = fragment_of(engine, param)
    index = fragment.layout.index
    given = _checked(value, torch.Size([fragment.numel]) if local else fragment.slot.shape,
                     what, local)
    piece = given if local else given.reshape(-1)[fragment.start:fragment.end]
    # Host buffers written below are no longer read or written by a copy in flight.
    host_grad = engine.offload.before_host_write(index) if engine.offload is not None else None
    partitioned = engine.partitioned is not None and engine.partitioned.owns(index)
    if partitioned:
        engine.partitioned.wait_host_reads(index)
    target = _local_tensor(engine, fragment, what)
    if what == "grad":
        scale = _grad_scale(engine)
        scaled = given.to(torch.float32) * scale
        # Checked whole: a full value is the same on every rank, so they all raise alike.
        if not torch.isfinite(scaled.to(target.dtype)).all():
            held = f", times the fp16 loss scale ({scale:g})," if scale != 1.0 else ""
            raise ValueError(
                f"zero_ext: the gradient given{held} is not finite in the {target.dtype} it is "
                f"held in (largest {torch.finfo(target.dtype).max:g}); the step would be "
                f"skipped as an overflow or its weights made inf/nan. Give a finite, smaller "
                f"gradient{', or lower fp16.initial_scale_power' if held else ''}")
        target.copy_(scaled if local else scaled.reshape(-1)[fragment.start:fragment.end])
        _renorm(engine, fragment)
        return
    target.copy_(piece)
    if what != "fp32":
        return
    shard = _shard(engine, fragment.layout)
    start, end = fragment.tensor_start, fragment.tensor_start + fragment.numel
    if host_grad is not None and host_grad is shard.weights_16bit:
        # The 16-bit staging buffer holds this step's gradient now: the model's weights are
        # written from the master directly.
        shard.model_weights[start:end].copy_(shard.master[start:end])
    else:
        shard.write_model_weights(start, end)
    if partitioned:
        engine.partitioned.weights_changed(index)
    else:
        param.data.copy_(given)  # every rank holds the whole parameter (stages 0-2)


def _renorm(engine, fragment: Fragment) -> None:
    """The bucket's gradient norm again, after one of its gradients was written."""
    bucket = engine.grad_buckets.buckets[fragment.layout.index]
    bucket.norm = fp32_norm(_grad_tensor(engine, fragment)).to(bucket.norm.device)


def _replicated(engine, param: torch.nn.Parameter, what: str) -> torch.Tensor:
    """A parameter's value or state under the torch optimizer given to initialize (stage 0)."""
    if what == "fp32":
        return param.data
    state = engine.replicated_optimizer.state.get(param, {})
    if what not in state:
        raise ValueError(
            f"zero_ext: the {type(engine.replicated_optimizer).__name__} given to initialize "
            f"has no {what!r} for this parameter (yet: torch optimizers create their state at "
            f"their first step; it has {sorted(state) or 'none'})")
    return state[what]


def _check_local(engine, param: torch.nn.Parameter, local: bool, writes_weights: bool) -> None:
    """The local functions are stage 3's, as in DeepSpeed. A stage-3 parameter kept whole
    (below stage3_param_persistence_threshold) is held by every rank, as below stage 3: its
    weights written as one rank's fragment would leave the ranks' copies apart."""
    if not local:
        return
    if engine.stage != 3:
        raise ValueError("zero_ext: the safe_*_local_* functions are for ZeRO stage 3 (this "
                         f"engine is at stage {engine.stage}); use the safe_*_full_* ones")
    if writes_weights and not (engine.partitioned is not None
                               and engine.partitioned.owns(param._zero_ext_layout)):
        raise ValueError(
            "zero_ext: safe_set_local_fp32_param: this parameter is kept whole on every rank "
            "(below stage3_param_persistence_threshold), so a fragment set on one rank would "
            "leave the ranks' copies apart; use safe_set_full_fp32_param")


def _checked(value: torch.Tensor, shape: torch.Size, what: str, local: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        kind = "this rank's fragment (flat)" if local else "the whole parameter"
        raise ValueError(f"zero_ext: setting {what!r} of a parameter takes {kind}, shaped "
                         f"{tuple(shape)}; got {got}")
    return value
