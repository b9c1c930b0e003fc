"""A torch optimizer other than AdamW, run on this rank's fp32 master shards (stages 1-3).

DeepSpeed's ZeRO optimizers take the user's optimizer and give it flat fp32 partitions in place
of the model's parameters; so does zero_ext. The optimizer passed to `initialize` keeps its
class, its hyperparameters and its parameter groups, but its parameters become this rank's
fp32 master shards (one per bucket of each group), and its state is created, as torch
optimizers create it, at its first step. An optimizer whose update of an element reads only
that element's gradient and state (SGD, Adagrad, RMSprop, Adam with amsgrad, ...: `ELEMENTWISE`)
then trains exactly as it would on the whole parameters, at any world size. One that reads a
tensor as a whole (Adafactor's factored moments, LAMB's trust ratio, Muon) would see flat
shards, whose boundaries depend on the world size: DeepSpeed runs such optimizers anyway once
`zero_allow_untested_optimizer` is true, and zero_ext asks for the same key (and says what it
means once). LBFGS (a closure re-evaluating the loss) and SparseAdam (sparse gradients) are
refused.

Checkpoints keep, per bucket shard, each state tensor with one value per element (resharded at
any world size like the master weights) and each scalar (a step count), which must be equal
over a parameter group's shards; any other state (a blockwise quantized moment's scales) is
refused at save, naming it.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch

__all__ = ["ELEMENTWISE", "ClientShards", "check_client_optimizer"]

# torch.optim classes whose update is element by element: exact on shards.
ELEMENTWISE = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.Adamax,
               torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop,
               torch.optim.ASGD, torch.optim.Adam, torch.optim.AdamW)
_REFUSED = {
    torch.optim.LBFGS: "it re-evaluates the loss through a closure, which engine.step() "
                       "does not take",
    torch.optim.SparseAdam: "it takes sparse gradients, and ZeRO reduces dense buckets",
}


def check_client_optimizer(optimizer: torch.optim.Optimizer, stage: int,
                           allow_untested: bool, offload_optimizer: bool) -> None:
    """Refuses, naming the fix, a client optimizer the sharded path cannot run as asked."""
    name = type(optimizer).__name__
    for cls, why in _REFUSED.items():
        if isinstance(optimizer, cls):
            raise TypeError(f"zero_ext.initialize: optimizer={name} cannot run under ZeRO: "
                            f"{why}. Pass another optimizer")
    if offload_optimizer:
        raise ValueError(
            f"zero_ext.initialize: offload_optimizer steps zero_ext's AdamW on the host, and "
            f"does not run the {name} given there. DeepSpeed refuses a client optimizer with "
            f"offload too (unless zero_force_ds_cpu_optimizer is false, which zero_ext does not "
            f"take). Use AdamW / Adam (passed or configured) with offload_optimizer, or train "
            f"the {name} without offload_optimizer")
    if not isinstance(optimizer, ELEMENTWISE) and not allow_untested:
        raise ValueError(
            f"zero_ext.initialize: optimizer={name} at stage {stage} would run on flat fp32 "
            f"shards of the parameters, and zero_ext knows it to be exact there only for "
            f"torch's element-wise optimizers ({', '.join(c.__name__ for c in ELEMENTWISE)}). "
            f"Set \"zero_allow_untested_optimizer\": true to run it anyway (DeepSpeed's key, "
            f"with its meaning), or use stage 0, which runs any optimizer on whole parameters")


class ClientShards:
    """The user's optimizer over the master shards (`shards`, ShardState in bucket order):
    its parameter groups follow the engine's (`groups`: the hyperparameters a scheduler sets
    there reach it before every step)."""

    def __init__(self, client: torch.optim.Optimizer, shards: list, rank: int):
        self.client = client
        self.shards = shards
        self._rank, self._stepped = rank, False
        by_group: dict[int, list[torch.Tensor]] = defaultdict(list)
        for shard in shards:
            by_group[shard.layout.group].append(shard.master)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in client.param_groups]
        client.state = defaultdict(dict)  # created again, for the shards, at the first step
        client.param_groups = []
        for index, settings in enumerate(hyper):
            client.add_param_group({**settings, "params": by_group.get(index, [])})
        if rank == 0 and not isinstance(client, ELEMENTWISE):
            warnings.warn(
                f"zero_ext: {type(client).__name__} runs on flat fp32 shards of the parameters "
                f"(zero_allow_untested_optimizer): an update that reads a parameter as a whole "
                f"(its shape, its norm, factored moments) sees a shard of its bucket instead",
                UserWarning, stacklevel=4)

    @torch.no_grad()
    def step(self, shards: list, grads: list[torch.Tensor], inv_scale: torch.Tensor | None,
             groups: list[dict]) -> None:
        """One update of `shards` from their reduced gradients (`grads`, any float dtype),
        each multiplied by `inv_scale` (the loss scale's and clipping's factor)."""
        for group, inner in zip(groups, self.client.param_groups):
            inner.update({k: v for k, v in group.items() if k != "params"})
        for shard, grad in zip(shards, grads):
            grad = grad.float() if grad.dtype != torch.float32 else grad.clone()
            if inv_scale is not None:
                grad.mul_(inv_scale.to(grad.device))
            shard.master.grad = grad
        try:
            self.client.step()
        finally:
            for shard in shards:
                shard.master.grad = None
        for shard in shards:
            shard.step += 1
            if shard.weights_16bit is not None:
                shard.weights_16bit.copy_(shard.master)
        if not self._stepped:  # its state exists now: said at once, not at the first save
            self._stepped = True
            unsaved = self.saved_state()[2]
            if unsaved is not None and self._rank == 0:
                warnings.warn(
                    f"zero_ext: save_checkpoint will refuse this {type(self.client).__name__}'s "
                    f"state: {unsaved}. save_16bit_model() keeps the weights", UserWarning,
                    stacklevel=5)

    def state_of(self, shard) -> dict:
        """The optimizer's state of one shard, as the optimizer keeps it (empty before its
        first step)."""
        return self.client.state.get(shard.master, {})

    def elementwise_state(self, shard) -> dict[str, torch.Tensor]:
        """The state tensors of one shard with a value per element."""
        numel = shard.master.numel()
        return {k: v for k, v in self.state_of(shard).items()
                if torch.is_tensor(v) and v.dim() > 0 and v.numel() == numel}

    def saved_state(self) -> tuple[dict[str, str], list[dict], str | None]:
        """What a checkpoint keeps: the per-element state's names with their dtypes (saved as
        fp32, which holds any of them exactly), each group's scalars ({name: [value, dtype, on
        the shard's device]}), and the reason the state cannot be saved (None)."""
        kinds: dict[str, str] = {}
        scalars: list[dict] = [{} for _ in self.client.param_groups]
        seen: list[dict] = [{} for _ in self.client.param_groups]
        for shard in self.shards:
            state, group = self.state_of(shard), shard.layout.group
            per_element = self.elementwise_state(shard)
            kinds.update({k: str(v.dtype).removeprefix("torch.")
                          for k, v in per_element.items()})
            for key, value in state.items():
                if key in per_element:
                    continue
                scalar = _scalar(value, shard.master.device)
                if scalar is None:
                    shape = tuple(value.shape) if torch.is_tensor(value) else type(value)
                    return {}, [], (f"its state {key!r} ({shape}) is neither one value per "
                                    f"element of a shard nor a scalar, so it cannot be "
                                    f"resharded")
                if key in seen[group] and seen[group][key] != scalar:
                    return {}, [], (f"its scalar state {key!r} differs between the shards of "
                                    f"parameter group {group} ({seen[group][key][0]} and "
                                    f"{scalar[0]})")
                seen[group][key] = scalar
        for group, values in enumerate(seen):
            scalars[group] = {k: list(v) for k, v in values.items()}
        return dict(sorted(kinds.items())), scalars, None

    def staged_state(self, kinds: dict[str, str]) -> dict[int, dict[str, torch.Tensor]]:
        """Zeroed per-element state for every shard (layout index -> kind -> tensor, `kinds`
        naming each one's dtype), for a load to fill before `install` puts it in place."""
        return {shard.layout.index: {k: torch.zeros_like(shard.master, dtype=getattr(torch, d))
                                     for k, d in kinds.items()}
                for shard in self.shards}

    def install(self, staged: dict[int, dict[str, torch.Tensor]],
                scalars: list[dict]) -> None:
        """A loaded state in place of the optimizer's own: per-element tensors from `staged`,
        each group's scalars from `scalars` (as saved_state gave them)."""
        self.client.state = defaultdict(dict)
        for shard in self.shards:
            state = dict(staged.get(shard.layout.index, {}))
            for key, (value, dtype, on_param) in scalars[shard.layout.group].items():
                if dtype in ("int", "float"):
                    state[key] = int(value) if dtype == "int" else value
                else:
                    state[key] = torch.tensor(value, dtype=getattr(torch, dtype),
                                              device=shard.master.device if on_param else "cpu")
            if state:
                self.client.state[shard.master] = state

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for shard in self.shards
                   for v in self.state_of(shard).values() if torch.is_tensor(v))


def _scalar(value, device: torch.device) -> tuple[float, str, bool] | None:
    """(value, its torch dtype's name or "int" / "float", whether a tensor on the shard's
    `device` rather than the host) of a scalar state entry, else None."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dim() > 1:
            return None
        return (float(value.item()), str(value.dtype).removeprefix("torch."),
                value.device == device and device.type != "cpu")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), type(value).__name__, False
    return None
