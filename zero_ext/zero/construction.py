"""zero_ext.Init: a model built with each module's parameters partitioned as its constructor ends.

As in DeepSpeed's zero.Init, every module's constructor runs on real tensors (so its own
initialization, random draws included, happens exactly as in a plain build), and when the
outermost constructor call of an object returns, the parameters of its subtree that are still
whole take rank 0's values and keep only this rank's slice: an "Init shard" of the flattened
parameter, padded to a multiple of the world size. The Parameter object itself then holds a
meta tensor of its full shape, so shapes, names and optimizer groups stay what they were.

Initialization that touches a parameter after its module was partitioned (a parent's
`nn.init.normal_(self.child.weight)`, `self.apply(init_fn)`, transformers' `post_init`) goes
through a TorchFunctionMode active for the whole `with Init():` block: the operation runs on
the gathered full values on the device the parameter was built on (the same random draws as a
plain build), and what it wrote becomes rank 0's values again, re-sliced. An operation that
returns a view of the values (`p.data`, `p[i]`) keeps them gathered until the constructor (or
`apply` function) that took the view returns, since writes through the view may follow.

zero_ext.initialize later turns Init shards into the engine's own layout one gather unit at a
time (`materialize`), so no rank ever holds more than one module's full parameters beyond its
shards. Callers: zero_ext.Init users, engine.py and params.py (materialize,
check_initializers), GatheredParameters (gather_init_params / release_init_params).
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from zero_ext import comm
from zero_ext.zero.conversions import conversion_target

__all__ = [
    "METADATA_FUNCTIONS",
    "VALUE_ATTRIBUTES",
    "Init",
    "check_initializers",
    "gather_init_params",
    "is_init_partitioned",
    "materialize",
    "outside_init",
    "partitionable_class",
    "reads_metadata",
    "release_init_params",
    "swap_tensor",
    "tensor_attribute",
    "tensors_in",
]

_SHARD = "_zero_ext_init"  # attribute of a parameter partitioned by Init: its _InitShard


@dataclass(eq=False)
class _InitShard:
    shard: torch.Tensor   # this rank's slice of the flattened values, padded (build dtype)
    home: torch.device    # where the parameter was built: gathered values are computed there
    gathered: bool = False  # inside GatheredParameters: the parameter holds its full values


def is_init_partitioned(tensor) -> bool:
    """Whether `tensor` is a parameter Init partitioned that holds no values now."""
    init = tensor.__dict__.get(_SHARD) if isinstance(tensor, nn.Parameter) else None
    return init is not None and not init.gathered


def swap_tensor(param: torch.Tensor, replacement: torch.Tensor) -> None:
    """Gives the live object `param` (the one the model, tied modules and optimizer groups hold)
    the tensor of `replacement`, keeping param's Python class and attributes: swap_tensors alone
    would move those (zero_ext's tags among them) onto the discarded object."""
    cls, attrs = type(param), dict(param.__dict__)
    torch.utils.swap_tensors(param, replacement)
    param.__class__ = cls
    param.__dict__ = attrs


def _comm_ready(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on a device the process group's backend can move (NCCL: the current GPU)."""
    if tensor.device.type == "cpu" and comm.backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def _shard_range(numel: int) -> tuple[int, int, int]:
    """(shard size, start, end) of this rank's slice of `numel` elements."""
    size = math.ceil(numel / comm.world_size())
    start = min(comm.rank() * size, numel)
    return size, start, min(start + size, numel)


@torch.no_grad()
def _take_rank0_slice(values: torch.Tensor, shard: torch.Tensor | None) -> torch.Tensor:
    """Broadcasts rank 0's `values` and returns this rank's padded slice (written into `shard`
    when given)."""
    moved = _comm_ready(values.detach().contiguous())
    comm.broadcast(moved, src=0)
    size, start, end = _shard_range(moved.numel())
    if shard is None:
        shard = torch.zeros(size, dtype=values.dtype, device=values.device)
    shard[:end - start].copy_(moved.reshape(-1)[start:end])
    return shard


class _PartitionedByInit(nn.Parameter):
    """The class of a parameter Init partitioned while it holds no values (between its
    module's constructor and initialize, outside GatheredParameters). Inside the Init block
    _InitMode computes on its gathered values; anywhere else a use of the values (e.g.
    `model.load_state_dict(...)`, which would copy into the meta placeholder and change
    nothing) is an error that says what to do. Metadata (shape, dtype, requires_grad) reads
    pass."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        attribute = tensor_attribute(func)
        if reads_metadata(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        target = conversion_target(func, args, kwargs)
        if target is not None:
            return _converted_placeholder(args[0], *target)
        if attribute == "data" and getattr(func, "__name__", "") == "__set__":
            if args[1] is args[0]:
                return None
            if isinstance(args[1], _Converted):
                return _apply_conversion(args[0], args[1])
        raise RuntimeError(
            f"zero_ext.Init: {getattr(func, '__name__', func)} on a parameter built under "
            "zero_ext.Init, which holds no values until zero_ext.initialize (each rank keeps "
            "a shard); read or write it inside `with zero_ext.GatheredParameters(params, "
            "modifier_rank=0):` (writes from that rank), or load weights with "
            "engine.load_weights / engine.load_checkpoint after initialize")


class _Converted(torch.Tensor):
    """What a conversion (`.to(...)`, `.half()`, ...) of an Init placeholder returns: a meta
    tensor of the new dtype, carrying the target device; `param.data = it` (nn.Module.to's next
    move) converts the parameter's Init shard. It holds no values: any other use is an error."""

    target: torch.device | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if reads_metadata(func):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs or {})
        raise RuntimeError(
            f"zero_ext.Init: {getattr(func, '__name__', func)} on a conversion of a parameter "
            "built under zero_ext.Init, which holds no values until zero_ext.initialize: "
            "convert the module (`model.to(...)`, whose parameters take the conversion), or "
            "read the values inside `with zero_ext.GatheredParameters(params):`")


def _converted_placeholder(param: nn.Parameter, device: torch.device | None,
                           dtype: torch.dtype | None) -> torch.Tensor:
    """The result of converting an Init placeholder: itself when nothing changes (as
    Tensor.to), else a _Converted."""
    init = param.__dict__[_SHARD]
    dtype = dtype or param.dtype
    if dtype == param.dtype and (device is None or device == init.home):
        return param
    with torch._C.DisableTorchFunctionSubclass():
        out = torch.empty(param.shape, dtype=dtype, device="meta").as_subclass(_Converted)
    out.target = device
    return out


@torch.no_grad()
def _apply_conversion(param: nn.Parameter, converted: _Converted) -> None:
    """`param.data = converted`: the Init shard takes the dtype (its values rounded as the
    whole tensor's would be) and the parameter's home the device; the placeholder the dtype.
    zero_ext.initialize then trains in the config's dtype on its own device, as after a
    conversion of a plain model."""
    init = param.__dict__[_SHARD]
    init.shard = init.shard.to(converted.dtype)
    if converted.target is not None:
        init.home = converted.target
    with torch._C.DisableTorchFunctionSubclass():
        param.data = torch.empty(param.shape, dtype=converted.dtype, device="meta")


def partitionable_class(param: nn.Parameter) -> bool:
    """Whether stage 3 may keep `param` as shards of a flat buffer: a plain nn.Parameter (or
    one Init holds). Subclasses carry state of their own beside the values (bitsandbytes'
    quantized weights) that a flat buffer would not."""
    return type(param) in (nn.Parameter, _PartitionedByInit)


def _set_partitioned(param: nn.Parameter, partitioned: bool) -> None:
    """Parameters of subclasses keep their class (and go unchecked)."""
    if partitioned and type(param) is nn.Parameter:
        param.__class__ = _PartitionedByInit
    elif not partitioned and type(param) is _PartitionedByInit:
        param.__class__ = nn.Parameter


@torch.no_grad()
def _partition(param: nn.Parameter, dtype: torch.dtype | None = None,
               remote: torch.device | None = None) -> None:
    """A whole parameter becomes an Init shard (in `dtype` if floating point, in host memory
    with `remote`) and a meta placeholder of its shape."""
    values = param.data
    if dtype is not None and values.is_floating_point():
        values = values.to(dtype)
    shard = _take_rank0_slice(values, None)
    if remote is not None:
        shard = shard.to(remote)
    placeholder = nn.Parameter(torch.empty(param.shape, dtype=values.dtype, device="meta"),
                               requires_grad=param.requires_grad)
    param.__dict__[_SHARD] = _InitShard(shard, param.device)
    swap_tensor(param, placeholder)
    _set_partitioned(param, True)


@torch.no_grad()
def _gather(param: nn.Parameter, device: torch.device | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full values of an Init-partitioned parameter (collective), on its home device unless
    `device` is given."""
    init = param.__dict__[_SHARD]
    shard = _comm_ready(init.shard)
    out = torch.empty(shard.numel() * comm.world_size(), dtype=shard.dtype, device=shard.device)
    comm.all_gather(out, shard)
    full = out[:param.numel()].view(param.shape)
    return full.to(device=device or init.home, dtype=dtype or full.dtype, copy=True)


def check_initializers(model: nn.Module) -> None:
    """Every meta tensor of a model built under zero_ext.Init must have values to take: a
    parameter its Init shard; a buffer or parameter put on the meta device by other means has
    none, and training it would start from garbage."""
    for name, param in model.named_parameters():
        if param.is_meta and _SHARD not in param.__dict__:
            raise ValueError(
                f"zero_ext.Init: parameter {name} is on the meta device without values (it was "
                "not created inside zero_ext.Init, e.g. built under torch.device('meta')); "
                "build the model inside `with zero_ext.Init():` or outside any meta context")
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise ValueError(
                f"zero_ext.Init: buffer {name} is on the meta device and has no values; "
                "create it on a real device (zero_ext.Init builds buffers whole)")


@torch.no_grad()
def materialize(model: nn.Module, modules: list[nn.Module], keep_meta: set[int],
                device: torch.device, dtype: torch.dtype) -> None:
    """Gives the Init-partitioned parameters directly owned by `modules` (except those whose id
    is in `keep_meta`) their full values on `device` (floating point ones in `dtype`), in the
    same Parameter objects; moves those modules' buffers there, in their dtype (the engine then
    sets buffers' dtypes: zero_ext/zero/precision.py). Collective:
    every rank calls it with the same modules."""
    for module in modules:
        for param in module._parameters.values():
            if param is None or id(param) in keep_meta or not is_init_partitioned(param):
                continue
            target = dtype if param.is_floating_point() else param.dtype
            full = nn.Parameter(_gather(param, device, target), requires_grad=param.requires_grad)
            del param.__dict__[_SHARD]
            swap_tensor(param, full)
            _set_partitioned(param, False)
        for key, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[key] = buffer.to(device=device)


def gather_init_params(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """GatheredParameters before initialize: the Init-partitioned ones among `params` hold their
    full values (on the device they were built on) until release_init_params. Collective."""
    gathered = []
    for param in params:
        if is_init_partitioned(param):
            full = nn.Parameter(_gather(param), requires_grad=param.requires_grad)
            swap_tensor(param, full)
            _set_partitioned(param, False)
            param.__dict__[_SHARD].gathered = True
            gathered.append(param)
    return gathered


@torch.no_grad()
def release_init_params(params: list[nn.Parameter], modifier_rank: int | None) -> None:
    """Back to Init shards; with `modifier_rank`, that rank's values become everyone's."""
    for param in params:
        init = param.__dict__[_SHARD]
        if modifier_rank is not None:
            values = _comm_ready(param.data.contiguous())
            comm.broadcast(values, src=modifier_rank)
            _, start, end = _shard_range(values.numel())
            init.shard[:end - start].copy_(values.reshape(-1)[start:end])
        placeholder = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                   requires_grad=param.requires_grad)
        try:
            swap_tensor(param, placeholder)
            _set_partitioned(param, True)
            init.gathered = False
        except RuntimeError as error:
            raise RuntimeError(
                "zero_ext.GatheredParameters: a view of a parameter gathered inside the context "
                "is still alive at its end, so the parameter cannot go back to its shard; drop "
                f"views (e.g. of `p.data`) before leaving the context ({error})") from None


# -- the context ------------------------------------------------------------------------------

# Tensor methods that read only metadata: allowed on a parameter that holds no values.
METADATA_FUNCTIONS = frozenset({
    "__hash__", "__repr__", "__format__", "size", "dim", "numel", "nelement", "ndimension",
    "element_size", "is_floating_point", "is_complex", "is_contiguous", "requires_grad_",
    "get_device", "__reduce_ex__", "__deepcopy__", "__setstate__", "register_hook",
    "register_post_accumulate_grad_hook", "is_pinned", "is_shared", "stride", "storage_offset",
    "data_ptr", "untyped_storage", "_is_view", "_has_compatible_shallow_copy_type"})
# Attributes whose value is (a view of) the values: computed on the gathered tensor.
VALUE_ATTRIBUTES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})


def reads_metadata(func) -> bool:
    """Whether the Tensor function `func` reads only metadata (shape, dtype, identity), which a
    parameter holding no values (Init's placeholders, released stage-3 ones) can answer."""
    attribute = tensor_attribute(func)
    return getattr(func, "__name__", "") in METADATA_FUNCTIONS or func is torch.Tensor.__eq__ \
        or (attribute is not None and attribute not in VALUE_ATTRIBUTES)


def tensor_attribute(func) -> str | None:
    """The attribute name when `func` is a tensor attribute's getter or setter."""
    if getattr(func, "__name__", "") in ("__get__", "__set__"):
        return getattr(getattr(func, "__self__", None), "__name__", "")
    return None


def tensors_in(value):
    """The tensors in `value` and in the lists, tuples and dicts it nests."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def _substitute(value, fulls: dict[int, torch.Tensor]):
    """`value` with the partitioned parameters in it replaced by their gathered values (plain
    lists, tuples and dicts are rebuilt; anything else is passed as it is)."""
    if isinstance(value, torch.Tensor):
        return fulls.get(id(value), value)
    if type(value) in (list, tuple):
        return type(value)(_substitute(v, fulls) for v in value)
    if type(value) is dict:
        return {k: _substitute(v, fulls) for k, v in value.items()}
    return value


def _storage_key(tensor: torch.Tensor):
    return tensor.untyped_storage().data_ptr() if tensor.numel() else None


class _InitMode(torch.overrides.TorchFunctionMode):
    """Runs each operation that touches an Init-partitioned parameter on its gathered values,
    and re-partitions what the operation wrote (see the module docstring)."""

    def __init__(self, state: _InitState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        params = [t for t in tensors_in((args, kwargs)) if is_init_partitioned(t)]
        attribute = tensor_attribute(func)
        if params and attribute in ("is_meta", "device"):
            # What a plain build would see: initialization code skips meta tensors
            # (nn.init.trunc_normal_) and places new tensors by a parameter's device.
            home = params[0].__dict__[_SHARD].home
            return False if attribute == "is_meta" else home
        if not params or getattr(func, "__name__", "") in METADATA_FUNCTIONS or (
                attribute is not None and attribute not in VALUE_ATTRIBUTES):
            return func(*args, **kwargs)
        if attribute is not None and getattr(func, "__name__", "") == "__set__":
            # `p.data = values`: the values become the parameter's (rank 0's, re-sliced).
            param, values = args[0], args[1]
            self.state.settle(param)
            _take_rank0_slice(values.to(param.__dict__[_SHARD].home),
                              param.__dict__[_SHARD].shard)
            return None
        fulls, versions = {}, {}
        for param in dict.fromkeys(params):  # each once, in argument order on every rank
            full = self.state.held_values(param)
            if full is None:
                full = nn.Parameter(_gather(param), requires_grad=param.requires_grad)
            fulls[id(param)], versions[id(param)] = full, full._version
        result = func(*_substitute(args, fulls), **_substitute(kwargs, fulls))
        by_full = {id(full): param for param, full in
                   ((p, fulls[id(p)]) for p in dict.fromkeys(params))}
        escaped = {_storage_key(t) for t in tensors_in(result) if id(t) not in by_full}
        for param in dict.fromkeys(params):
            full = fulls[id(param)]
            if _storage_key(full) in escaped or self.state.is_held(param):
                # A view of the values went back to the caller: writes through it may follow.
                self.state.hold(param, full)
            elif full._version != versions[id(param)]:
                _take_rank0_slice(full.data, param.__dict__[_SHARD].shard)
        if isinstance(result, torch.Tensor) and id(result) in by_full:
            return by_full[id(result)]  # an in-place operation returns its input
        return result


class _InitState:
    """What one `with zero_ext.Init():` block tracks: constructors running, views held."""

    def __init__(self, dtype: torch.dtype | None = None, remote: torch.device | None = None):
        self.dtype, self.remote = dtype, remote  # Init's dtype and remote_device
        self.constructing: set[int] = set()  # ids of objects inside their outermost __init__
        self.depth = 0                       # constructors and apply() functions running
        self.held: dict[int, tuple[nn.Parameter, torch.Tensor, int]] = {}

    def held_values(self, param) -> torch.Tensor | None:
        entry = self.held.get(id(param))
        return entry[1] if entry is not None else None

    def is_held(self, param) -> bool:
        return id(param) in self.held

    def hold(self, param: nn.Parameter, full: torch.Tensor) -> None:
        entry = self.held.get(id(param))
        self.held[id(param)] = (param, full, entry[2] if entry is not None else self.depth)

    def settle(self, param) -> None:
        """Writes through held views of `param` become its values now."""
        entry = self.held.pop(id(param), None)
        if entry is not None:
            _take_rank0_slice(entry[1].data, entry[0].__dict__[_SHARD].shard)

    def release_held(self, depth: int) -> None:
        """The views taken at `depth` or deeper end with the call that took them; in the same
        order on every rank (taken in program order)."""
        for key in [k for k, (_, _, d) in self.held.items() if d >= depth]:
            self.settle(self.held[key][0])

    def enter_call(self) -> int:
        self.depth += 1
        return self.depth

    def exit_call(self, depth: int) -> None:
        self.release_held(depth)
        self.depth = depth - 1

    def partition_subtree(self, module: nn.Module) -> None:
        with torch._C.DisableTorchFunction():  # is_meta as it is, not as _InitMode shows it
            for param in module.parameters():
                if not param.is_meta and _SHARD not in param.__dict__:
                    _partition(param, self.dtype, self.remote)


_active: list[tuple[_InitState, _InitMode]] = []  # the outermost Init block's state, if any


def _all_module_classes() -> list[type]:
    found, stack = [nn.Module], [nn.Module]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                stack.append(sub)
    return found


# The constructors _wrap_init made, known by identity: functools.wraps copies a function's
# attributes, so a class decorator that wraps one (transformers' use_experts_implementation, for a
# class first defined inside an Init block) carries any marker it has without being one of ours.
_INIT_WRAPPERS: weakref.WeakSet = weakref.WeakSet()


def _wrap_init(cls: type) -> None:
    original = cls.__dict__.get("__init__")
    if original is None or original in _INIT_WRAPPERS:
        return

    @functools.wraps(original)
    def __init__(module, *args, **kwargs):
        state = _active[0][0] if _active else None
        if state is None or id(module) in state.constructing:
            return original(module, *args, **kwargs)  # a super().__init__ inside
        state.constructing.add(id(module))
        depth = state.enter_call()
        try:
            original(module, *args, **kwargs)
        except BaseException:
            state.depth = depth - 1
            raise
        finally:
            state.constructing.discard(id(module))
        state.exit_call(depth)
        state.partition_subtree(module)

    _INIT_WRAPPERS.add(__init__)
    cls.__init__ = __init__


def _unwrap_init(cls: type) -> None:
    """Restores the constructor _wrap_init replaced. One wrapped since by a decorator stays: the
    decorator's wrapper is the class's constructor now, and ours inside it passes calls through
    outside an Init block."""
    wrapped = cls.__dict__.get("__init__")
    if wrapped in _INIT_WRAPPERS:
        cls.__init__ = wrapped.__wrapped__


def _apply_one_call_at_a_time(original_apply):
    """Module.apply under Init: views that `fn(module)` takes of partitioned parameters are
    settled when that call returns, so one module's parameters are held at a time."""

    @functools.wraps(original_apply)
    def apply(self, fn):
        state = _active[0][0] if _active else None
        if state is None or hasattr(fn, "_zero_ext_settles"):
            return original_apply(self, fn)  # children's apply: fn is already wrapped

        def one_module(module):
            depth = state.enter_call()
            fn(module)
            state.exit_call(depth)

        one_module._zero_ext_settles = True
        return original_apply(self, one_module)

    apply._zero_ext_original = original_apply
    return apply


class Init:
    """`with zero_ext.Init(): model = build()` builds a model for stage 3 with each module's
    parameters partitioned across the ranks as soon as its constructor returns (DeepSpeed's
    zero.Init). The model's values are those of a plain build under the same seed (rank 0's),
    whatever initialization its constructors do; zero_ext.initialize then lays the shards out
    for training one gather unit at a time. Inside the block, and until initialize,
    `zero_ext.GatheredParameters` gives the full values (and with `modifier_rank`, takes that
    rank's changes). Every rank must run the same construction (it issues collectives).
    """

    def __init__(self, module: nn.Module | None = None, data_parallel_group=None,
                 mem_efficient_linear: bool = True, remote_device: str | None = None,
                 pin_memory: bool = False, config_dict_or_path=None, config=None,
                 enabled: bool = True, dtype: torch.dtype | None = None, mpu=None,
                 zero_param_parallel_group=None, zero_quantized_weights: bool = False,
                 zero_quantized_nontrainable_weights: bool = False,
                 sequence_data_parallel_group=None, param_swapper=None):
        """DeepSpeed's arguments. `config` / `config_dict_or_path`: its fp16 / bf16 switch
        decides the default `dtype` (bf16, fp16, else fp32; the engine reads the rest at
        initialize). `dtype`: floating-point parameters are kept (and rounded) in it from
        construction on, as DeepSpeed builds them; without it and a config they keep the
        dtype they are built in. `remote_device` "cpu": the shards are kept in host memory
        (None / "none": where each parameter was built). `module`: an already-built model
        whose parameters are partitioned now, in their dtype (as DeepSpeed's conversion).
        Without effect: `mem_efficient_linear`, `pin_memory`. Refused: the process-group arguments and `mpu`
        (zero_ext partitions over the default group), `remote_device` "nvme",
        `param_swapper`, and the quantized-weights switches (the config's
        zero_quantized_weights drives qwZ)."""
        _refuse_init_arguments(data_parallel_group=data_parallel_group, mpu=mpu,
                               zero_param_parallel_group=zero_param_parallel_group,
                               sequence_data_parallel_group=sequence_data_parallel_group,
                               param_swapper=param_swapper,
                               zero_quantized_weights=zero_quantized_weights or None,
                               zero_quantized_nontrainable_weights=(
                                   zero_quantized_nontrainable_weights or None))
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(
                f"zero_ext.Init: the first argument is DeepSpeed's module= (a model to "
                f"partition), got a {type(module).__name__}; pass a config as config=...")
        if config is not None and config_dict_or_path is not None:
            raise ValueError("zero_ext.Init: config and config_dict_or_path are the same "
                             "argument (DeepSpeed's two names for it); pass one")
        if remote_device not in (None, "none", "cpu"):
            raise ValueError(f"zero_ext.Init(remote_device={remote_device!r}): zero_ext keeps "
                             "shards where the parameters are built, or with \"cpu\" in host "
                             "memory; NVMe is not supported")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"zero_ext.Init(dtype={dtype!r}): expected a floating-point "
                            "torch.dtype")
        self.enabled = enabled
        self._outermost = False
        self._remote = torch.device("cpu") if remote_device == "cpu" else None
        if module is not None and enabled:
            # As DeepSpeed's conversion of a built model: partitioned as it is, not cast.
            _ensure_distributed()
            _InitState(None, self._remote).partition_subtree(module)
        if dtype is None and (config or config_dict_or_path) is not None:
            dtype = _config_dtype(config or config_dict_or_path)
        self._dtype = dtype

    def __enter__(self):
        if not self.enabled:
            return self
        _ensure_distributed()
        if not _active:
            self._outermost = True
            state = _InitState(self._dtype, self._remote)
            _patch(state, _InitMode(state))
        return self

    def __exit__(self, *exc):
        if not self._outermost:
            return False
        self._outermost = False
        state, _ = _active[0]
        try:
            if exc[0] is None:
                state.release_held(0)
        finally:
            _unpatch()
        return False


def _config_dtype(config) -> torch.dtype | None:
    """The dtype DeepSpeed's Init builds in for `config` (a dict, a path or a ZeroConfig):
    bf16 or fp16 where its section is enabled, else fp32. Only those switches are read (the
    rest is initialize's): an "auto" one (filled in later by the HF / accelerate integration)
    decides nothing, and the model keeps the dtype it is built in."""
    from zero_ext.config import ZeroConfig, read_json_config

    if isinstance(config, ZeroConfig):
        return config.mixed_precision or torch.float32
    if isinstance(config, (str, os.PathLike)):
        config = read_json_config(config)

    def enabled(*keys):
        sections = [config[key] for key in keys if isinstance(config.get(key), dict)]
        return sections[0].get("enabled", False) if sections else False

    bf16, fp16 = enabled("bf16", "bfloat16"), enabled("fp16")
    if "auto" in (bf16, fp16):
        return None
    return torch.bfloat16 if bf16 is True else torch.float16 if fp16 is True else torch.float32


def _ensure_distributed() -> None:
    from zero_ext.comm.launchers import launched_by

    if "RANK" in os.environ or "WORLD_SIZE" in os.environ or launched_by() is not None:
        comm.init_distributed()  # partitioning needs the other ranks, as in DeepSpeed


def _refuse_init_arguments(**given) -> None:
    named = [name for name, value in given.items() if value is not None]
    if named:
        raise ValueError(
            f"zero_ext.Init: {', '.join(named)} not supported: zero_ext partitions over the "
            "default process group without model parallelism or parameter swapping (qwZ is "
            "the config's zero_optimization.zero_quantized_weights, applied at initialize); "
            "leave them out")


def _patch(state: _InitState, mode: _InitMode) -> None:
    _active.append((state, mode))
    for cls in _all_module_classes():
        _wrap_init(cls)
    nn.Module.__init_subclass__ = classmethod(_init_subclass)
    nn.Module.apply = _apply_one_call_at_a_time(nn.Module.apply)
    mode.__enter__()


def _unpatch() -> tuple[_InitState, _InitMode]:
    entry = _active.pop()
    entry[1].__exit__(None, None, None)
    nn.Module.apply = nn.Module.apply._zero_ext_original
    del nn.Module.__init_subclass__  # nn.Module defines none of its own
    for cls in _all_module_classes():
        _unwrap_init(cls)
    return entry


def outside_init(fn):
    """Runs `fn` (zero_ext.initialize) with an open Init block suspended, as DeepSpeed's engine
    does: the engine's own modules and tensors are built plainly, and parameters show what they
    are (meta placeholders) to the code that materializes them."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not _active:
            return fn(*args, **kwargs)
        entry = _unpatch()
        try:
            return fn(*args, **kwargs)
        finally:
            _patch(*entry)

    return run


def _init_subclass(cls, **kwargs):
    """Classes defined inside an Init block are partitioned like the others."""
    super(nn.Module, cls).__init_subclass__(**kwargs)
    _wrap_init(cls)
