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
any world size like the master weights) and each scalar (a step count) that a parameter
group's shards share. State that depends on the sharding (a blockwise quantized moment's
scales, a per-tensor statistic, which is one per shard here) is kept as each rank holds it
instead, and such a checkpoint resumes at the same world size and buckets only; state that is
neither tensors nor numbers is refused at save, naming it.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections import OrderedDict, defaultdict

import torch

__all__ = ["ELEMENTWISE", "ClientShards", "check_client_optimizer", "runs_as",
           "setting_differs", "state_bytes_per_element"]

# torch.optim classes whose update is element by element: exact on shards.
ELEMENTWISE = (torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.Adamax,
               torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Rprop,
               torch.optim.ASGD, torch.optim.Adam, torch.optim.AdamW)
_REFUSED = {
    torch.optim.LBFGS: "it re-evaluates the loss through a closure, which engine.step() "
                       "does not take",
    torch.optim.SparseAdam: "it takes sparse gradients, and ZeRO reduces dense buckets",
}


def runs_as(optimizer: torch.optim.Optimizer, classes: tuple[type, ...]) -> bool:
    """Whether `optimizer` steps as one of `classes` does: an instance whose `step` is that
    class's own (a subclass that overrides step, as LARS over SGD, computes something else;
    torch wraps each class's step for profiling, hence the unwrapping)."""
    step = inspect.unwrap(type(optimizer).step)
    return any(isinstance(optimizer, cls) and step is inspect.unwrap(cls.step)
               for cls in classes)


def check_client_optimizer(optimizer: torch.optim.Optimizer, stage: int,
                           allow_untested: bool, offload_optimizer: bool,
                           force_ds_cpu_optimizer: bool = True) -> None:
    """Refuses, naming the fix, a client optimizer the sharded path cannot run as asked."""
    name = type(optimizer).__name__
    for cls, why in _REFUSED.items():
        if isinstance(optimizer, cls):
            raise TypeError(f"zero_ext.initialize: optimizer={name} cannot run under ZeRO: "
                            f"{why}. Pass another optimizer")
    if callable(getattr(optimizer, "train", None)) or callable(getattr(optimizer, "eval", None)):
        raise TypeError(
            f"zero_ext.initialize: optimizer={name} has train()/eval() (a schedule-free "
            f"optimizer, whose evaluation weights differ from its training ones): zero_ext "
            f"cannot switch the model's sharded weights with it. Pass another optimizer")
    amsgrad = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and any(
        g.get("amsgrad") for g in optimizer.param_groups)
    if offload_optimizer and not force_ds_cpu_optimizer and not runs_as(optimizer, ELEMENTWISE):
        raise ValueError(
            f"zero_ext.initialize: offload_optimizer steps each bucket's host shard as its "
            f"gradients arrive, calling the optimizer once per shard: exact for torch's "
            f"element-wise optimizers only, and {name} is not one of them. Train it without "
            f"offload_optimizer, or offload with one of those")
    if offload_optimizer and force_ds_cpu_optimizer:
        fix = ("set amsgrad=False (zero_ext's AdamW has no amsgrad)" if amsgrad else
               "use AdamW / Adam (passed or configured)")
        raise ValueError(
            f"zero_ext.initialize: offload_optimizer steps zero_ext's AdamW on the host, and "
            f"the {name}{' with amsgrad' if amsgrad else ''} given is not it. "
            f"DeepSpeed refuses a client optimizer with offload too while "
            f"zero_force_ds_cpu_optimizer is true (its default). To offload, {fix}; set "
            f"\"zero_force_ds_cpu_optimizer\": false to step the {name} on the host shards "
            f"(torch's element-wise optimizers); or train without offload_optimizer")
    if not runs_as(optimizer, ELEMENTWISE) and not allow_untested:
        raise ValueError(
            f"zero_ext.initialize: optimizer={name} at stage {stage} would run on flat fp32 "
            f"shards of the parameters, and zero_ext knows it to be exact there only for "
            f"torch's element-wise optimizers ({', '.join(c.__name__ for c in ELEMENTWISE)}; "
            f"a subclass overriding step() is not one of them). Set "
            f"\"zero_allow_untested_optimizer\": true to run it anyway (DeepSpeed's key, with "
            f"its meaning), or use stage 0, which runs any optimizer on whole parameters")


class ClientShards:
    """The user's optimizer over the master shards (`shards`, ShardState in bucket order).
    Its parameter groups and the engine's hold the same hyperparameters: before each step,
    what changed on the engine's side (an LR scheduler) goes to the optimizer's; after it,
    the optimizer's groups (what it or the user wrote there: Prodigy's `d`, a new lr) come
    back."""

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
        self._synced = [_settings(g) for g in client.param_groups]  # as of the last step
        if rank == 0 and not runs_as(client, ELEMENTWISE):
            warnings.warn(
                f"zero_ext: {type(client).__name__} runs on flat fp32 shards of the parameters "
                f"(zero_allow_untested_optimizer): an update that reads a parameter as a whole "
                f"(its shape, its norm, factored moments) sees a shard of its bucket instead",
                UserWarning, stacklevel=4)

    @torch.no_grad()
    def step(self, shards: list, grads: list[torch.Tensor], inv_scale: torch.Tensor | None,
             groups: list[dict]) -> None:
        """One update of `shards` from their reduced gradients (`grads`, any float dtype),
        each multiplied by `inv_scale` (the loss scale's and clipping's factor); `groups`: the
        engine's parameter groups."""
        for group, inner, synced in zip(groups, self.client.param_groups, self._synced):
            for key, value in _settings(group).items():
                if key in synced and not setting_differs(value, synced[key]):
                    continue
                mine = inner.get(key)
                if torch.is_tensor(value) and torch.is_tensor(mine):
                    value = value.to(mine.device, mine.dtype)  # a capturable optimizer's lr
                inner[key] = value
        before = [set(inner) for inner in self.client.param_groups]
        for shard, grad in zip(shards, grads):
            # The reduced gradient is the engine's, dropped after the step: scaled in place
            # (no second fp32 copy of this rank's gradients); a 16-bit one becomes fp32.
            grad = grad.float() if grad.dtype != torch.float32 else grad
            if inv_scale is not None:
                grad.mul_(inv_scale.to(grad.device))
            shard.master.grad = grad
        # Its groups hold only these shards during the step: offload steps one bucket's at a
        # time, and a torch optimizer visits every parameter of its groups at each call.
        everyone = [inner["params"] for inner in self.client.param_groups]
        stepping: dict[int, list[torch.Tensor]] = defaultdict(list)
        for shard in shards:
            stepping[shard.layout.group].append(shard.master)
        for index, inner in enumerate(self.client.param_groups):
            inner["params"] = stepping.get(index, [])
        try:
            self.client.step()
        finally:
            for inner, params in zip(self.client.param_groups, everyone):
                inner["params"] = params
            for shard in shards:
                shard.master.grad = None
        self._synced = [_settings(g) for g in self.client.param_groups]
        for group, settings, keys in zip(groups, self._synced, before):
            group.update(settings)
            for gone in keys - set(settings) - {"params"}:  # removed by its step
                group.pop(gone, None)
        for shard in shards:
            shard.step += 1
            if shard.weights_16bit is not None:
                shard.weights_16bit.copy_(shard.master)
        if not self._stepped and all(self.state_of(s) for s in self.shards):
            # Its state exists now (offload steps one shard at a time: once all have stepped):
            # said at once, not at the first save.
            self._stepped = True
            _, _, bound, unsaved = self.saved_state()
            name = type(self.client).__name__
            if unsaved is not None and self._rank == 0:
                warnings.warn(
                    f"zero_ext: save_checkpoint will refuse this {name}'s state: {unsaved}. "
                    f"save_16bit_model() keeps the weights", UserWarning, stacklevel=5)
            elif bound and self._rank == 0:
                warnings.warn(
                    f"zero_ext: this {name}'s state depends on how the parameters are sharded "
                    f"(per-block or per-shard values): its checkpoints resume at this world "
                    f"size and bucket layout only", UserWarning, stacklevel=5)

    def state_of(self, shard) -> dict:
        """The optimizer's state of one shard, as the optimizer keeps it (empty before its
        first step)."""
        return self.client.state.get(shard.master, {})

    def elementwise_state(self, shard) -> dict[str, torch.Tensor]:
        """The state tensors of one shard with a value per element."""
        numel = shard.master.numel()
        return {k: v for k, v in self.state_of(shard).items()
                if torch.is_tensor(v) and v.dim() > 0 and v.numel() == numel}

    def saved_state(self) -> tuple[list[dict], list[dict], bool, str | None]:
        """What a checkpoint keeps of this rank's shards: each group's per-element state, names
        with their dtypes (saved in them; the groups of one optimizer may keep different
        state, as SGD with and without momentum); each group's scalars ({name: [value, dtype, on the
        shard's device, ndim]}); whether some state is bound to these shards (a tensor neither
        per element nor a scalar, as blockwise-quantized moments' scales are, or a scalar
        that differs between the group's shards, as a per-tensor statistic does: then the
        checkpoint holds each rank's state as it is, and resumes at the same world size and
        buckets only); and the reason it cannot be saved at all (None)."""
        kinds: list[dict | None] = [None for _ in self.client.param_groups]
        seen: list[dict] = [{} for _ in self.client.param_groups]
        bound = False
        for shard in self.shards:
            state, group = self.state_of(shard), shard.layout.group
            per_element = self.elementwise_state(shard)
            mine = {k: str(v.dtype).removeprefix("torch.") for k, v in sorted(
                per_element.items())}
            if kinds[group] is not None and kinds[group] != mine:
                bound = True  # its shards keep different state: kept as they are
            kinds[group] = mine
            for key, value in state.items():
                if key in per_element:
                    continue
                if not torch.is_tensor(value) and _scalar(value, shard.master.device) is None:
                    return [], [], False, (f"its state {key!r} is a {type(value).__name__}, "
                                           f"neither a tensor nor a number")
                scalar = _scalar(value, shard.master.device)
                if scalar is None or (key in seen[group] and seen[group][key] != scalar):
                    bound = True
                elif scalar is not None:
                    seen[group][key] = scalar
        scalars = [{k: list(v) for k, v in values.items()} for values in seen]
        return [k or {} for k in kinds], scalars, bound, None

    def bound_state(self) -> dict[int, dict]:
        """Each shard's whole state as the optimizer keeps it (layout index -> key -> value),
        for a checkpoint bound to this rank's shards."""
        return {shard.layout.index: dict(self.state_of(shard)) for shard in self.shards}

    def staged_state(self, kinds: list[dict]) -> dict[int, dict[str, torch.Tensor]]:
        """Per-element state for every shard (layout index -> kind -> tensor; `kinds`, per
        group, naming each one's dtype) for a load to fill before `install` puts it in place:
        the optimizer's own tensor where it has one of that dtype (filled in place, as the
        AdamW moments are: no second copy of the state), else a new zeroed one."""
        staged = {}
        for shard in self.shards:
            live = self.elementwise_state(shard)
            staged[shard.layout.index] = {
                k: live[k] if k in live and live[k].dtype == getattr(torch, d)
                else torch.zeros_like(shard.master, dtype=getattr(torch, d))
                for k, d in kinds[shard.layout.group].items()}
        return staged

    def install(self, staged: dict[int, dict], scalars: list[dict]) -> None:
        """A loaded state in place of the optimizer's own: per-element tensors from `staged`
        (or, from a checkpoint bound to the shards, each shard's whole state), each group's
        scalars from `scalars` (as saved_state gave them)."""
        self.client.state = defaultdict(dict)
        for shard in self.shards:
            state = dict(staged.get(shard.layout.index, {}))
            for key, (value, dtype, on_param, ndim) in scalars[shard.layout.group].items():
                if dtype.startswith("python."):
                    state[key] = python_scalar(dtype.removeprefix("python."), value)
                else:
                    state[key] = torch.tensor(value, dtype=getattr(torch, dtype),
                                              device=shard.master.device if on_param else "cpu"
                                              ).reshape((1,) * ndim)
            if state:
                self.client.state[shard.master] = state

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for shard in self.shards
                   for v in self.state_of(shard).values() if torch.is_tensor(v))


_PROBE_NUMEL = 1 << 16  # past bitsandbytes' min_8bit_size, so that 8-bit state shows as such


def state_bytes_per_element(client: torch.optim.Optimizer) -> list[float]:
    """Host bytes per parameter element the state of each of `client`'s parameter groups will
    take once stepped (SGD with momentum 4, Adam with amsgrad 12, ...): found by stepping a
    copy of it, with the group's settings, once on a flat fp32 host tensor, which is what a
    shard is; the optimizer itself, its state and its hooks are left as they were."""
    widths = []
    for group in client.param_groups:
        probe_param = torch.zeros(_PROBE_NUMEL)
        probe_param.grad = torch.full_like(probe_param, 1e-3)
        probe = copy.copy(client)
        probe.state = defaultdict(dict)
        probe.param_groups = [{**group, "params": [probe_param]}]
        probe._optimizer_step_pre_hooks = OrderedDict()
        probe._optimizer_step_post_hooks = OrderedDict()
        with torch.no_grad():
            probe.step()
        widths.append(sum(v.numel() * v.element_size() for v in probe.state[probe_param].values()
                          if torch.is_tensor(v)) / _PROBE_NUMEL)
    return widths


def _scalar(value, device: torch.device) -> tuple[float, str, bool, int] | None:
    """(value, its torch dtype's name or "python.<kind>" (PYTHON_SCALARS), whether a tensor
    on the shard's `device` rather than the host, its number of dimensions) of a scalar state
    entry, else None."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dim() > 1:
            return None
        return (value.item(), str(value.dtype).removeprefix("torch."),
                value.device == device and device.type != "cpu", value.dim())
    kind = python_scalar_kind(value)  # named apart from a tensor's dtype ("bool")
    return None if kind is None else (value if kind != "float" else float(value),
                                      f"python.{kind}", False, 0)


# A Python scalar's kind -> its type, and the dtype of the 0-d tensor that holds it exactly
# (a checkpoint's shard-bound state). None is held as a 0.
PYTHON_SCALARS = {"bool": (bool, torch.bool), "int": (int, torch.int64),
                  "float": (float, torch.float64), "NoneType": (type(None), torch.float64)}


def python_scalar_kind(value) -> str | None:
    """A key of PYTHON_SCALARS for a Python (or numpy) scalar, else None; bool before int (a
    bool is an int)."""
    return next((kind for kind, (cls, _) in PYTHON_SCALARS.items() if isinstance(value, cls)),
                None)


def python_scalar(kind: str, value):
    """The Python scalar of `kind` from `value` (a number, or a 0-d tensor holding it)."""
    value = value.item() if torch.is_tensor(value) else value
    return None if kind == "NoneType" else PYTHON_SCALARS[kind][0](value)


def _settings(group: dict) -> dict:
    """A parameter group's hyperparameters (all but its parameters), a shallow copy."""
    return {k: v for k, v in group.items() if k != "params"}


def setting_differs(a, b) -> bool:
    """Whether two values of a hyperparameter (or of a scheduler's state) differ: tensors by
    value wherever they live, lists and tuples element by element; incomparable ones differ."""
    if a is b:
        return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(setting_differs(x, y) for x, y in zip(a, b))
    try:
        if torch.is_tensor(a) or torch.is_tensor(b):  # compared on the host (a device lr)
            a, b = torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()
            return a.shape != b.shape or not torch.equal(a, b.to(a.dtype))
        return bool(a != b)
    except (TypeError, ValueError, RuntimeError):
        return True