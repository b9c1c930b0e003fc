"""Activation checkpointing: a block keeps only its inputs in forward and recomputes the rest in
backward.

Models call `checkpoint(fn, *args, **kwargs)` around a block, or `apply(model)` once to
checkpoint every block; `zero_ext.initialize` calls `configure()` with the config's
`activation_checkpointing` section (a user may call it too, afterwards, to change a setting).
Built on torch.utils.checkpoint's non-reentrant mode, which keeps a segment's inputs as tensors
saved for backward (through the saved-tensor hooks in force when it is called) and replays the
segment from them when backward first needs one of its activations. What this module adds:

  cpu_checkpointing   the saved inputs go to (pinned) host memory while forward goes on, and
                      come back ahead of the segment's backward: the copy back of segment k is
                      started when segment k+1's backward starts
  profile             per-segment forward and backward wall times (`profile_report()`)
  apply(model)        every block of a model checkpointed, HF models through their own switch
                      (which also turns their KV cache off, as a recomputed forward must not
                      append to it a second time)

One rule between apply() and transformers' own switch (`model.gradient_checkpointing_enable()`,
`activation_checkpointing_enable()`, TrainingArguments.gradient_checkpointing=True, which the
Trainer turns into that call at train()): the switch called LAST wins, and when it replaces the
other it warns, naming both and what no longer applies. apply() after HF's switch puts this
module's checkpoint in place of torch's (HF's checkpoint arguments, offload and every_n_layers
are dropped); HF's switch after apply() puts torch's back (the activation_checkpointing
section's cpu_checkpointing, number_checkpoints and profile no longer apply) and undoes the
block wrappers of apply(block_classes=...), so that no block is checkpointed twice.

Stage 3 needs nothing from here: its gather hooks tell a recomputation in backward apart from a
forward (zero_ext/zero/params.py).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils import _pytree as pytree

from zero_ext.config import ActivationCheckpointingConfig, ZeroConfig, read_json_config

__all__ = ["OffloadCounters", "SegmentTiming", "apply", "checkpoint", "configure", "counters",
           "is_configured", "non_reentrant_checkpoint", "partition_activations_in_checkpoint",
           "profile_report", "reset", "set_num_layers"]

_config = ActivationCheckpointingConfig()
_configured = False  # configure() called (is_configured)
_noticed: set[str] = set()  # notices given in this process (each once)
_CONTAINERS = (nn.ModuleList, nn.Sequential)


def configure(config=None, deepspeed_config=None, *,
              partition_activations: bool | None = None,
              cpu_checkpointing: bool | None = None,
              contiguous_memory_optimization: bool | None = None,
              number_checkpoints: int | None = None,
              synchronize_checkpoint_boundary: bool | None = None,
              profile: bool | None = None,
              checkpoint_in_cpu: bool | None = None,
              contiguous_checkpointing: bool | None = None,
              num_checkpoints: int | None = None,
              synchronize: bool | None = None) -> ActivationCheckpointingConfig:
    """Sets how `checkpoint` works from now on, as DeepSpeed's
    `deepspeed.checkpointing.configure`: the defaults, then the `activation_checkpointing`
    section of `config` or `deepspeed_config`, then single keys. `config` is an
    ActivationCheckpointingConfig, the section's JSON object, a ZeroConfig or a whole config
    dict (its section, the defaults without one), or None; DeepSpeed's form
    `configure(mpu, deepspeed_config=dict or JSON path, checkpoint_in_cpu=..., num_checkpoints=
    ..., contiguous_checkpointing=..., synchronize=..., profile=...)` works as written (an mpu
    of one model-parallel rank is all zero_ext runs with). Returns the settings now in force."""
    if _is_mpu(config):
        _check_mpu(config)
        config = None
    if config is not None and deepspeed_config is not None:
        raise TypeError("zero_ext.checkpointing.configure: got both a config and "
                        "deepspeed_config; pass one of them")
    if isinstance(deepspeed_config, (str, os.PathLike)):
        deepspeed_config = read_json_config(deepspeed_config)
    section = _section_of(config if deepspeed_config is None else deepspeed_config)
    # (key, our keyword's value, DeepSpeed's keyword and its value)
    keys = (("partition_activations", partition_activations, None, None),
            ("cpu_checkpointing", cpu_checkpointing, "checkpoint_in_cpu", checkpoint_in_cpu),
            ("contiguous_memory_optimization", contiguous_memory_optimization,
             "contiguous_checkpointing", contiguous_checkpointing),
            ("number_checkpoints", number_checkpoints, "num_checkpoints", num_checkpoints),
            ("synchronize_checkpoint_boundary", synchronize_checkpoint_boundary, "synchronize",
             synchronize),
            ("profile", profile, None, None))
    overrides = {}
    for key, ours, alias, theirs in keys:
        if ours is not None and theirs is not None and ours != theirs:
            raise TypeError(f"zero_ext.checkpointing.configure: {key}={ours!r} and "
                            f"{alias}={theirs!r} (DeepSpeed's name for it) disagree; pass one")
        value = ours if ours is not None else theirs
        if value is not None:
            overrides[key] = value
    section = dataclasses.replace(section, **overrides)  # a copy, validated again
    if section.partition_activations:
        _notice("partition_activations",
                "activation_checkpointing.partition_activations: DeepSpeed splits checkpointed "
                "activations across tensor-parallel ranks; zero_ext is data-parallel only, so "
                "there is nothing to split and the option has no effect (each rank keeps its "
                "own micro-batch's activations; cpu_checkpointing moves them off the device)")
    if section.contiguous_memory_optimization:
        _notice("contiguous_memory_optimization",
                "activation_checkpointing.contiguous_memory_optimization: DeepSpeed lays out "
                "partitioned activations in one buffer; with nothing partitioned (data "
                "parallelism only) the option has no effect")
    global _config, _offloaded, _configured
    _config, _configured = section, True
    if section.cpu_checkpointing and _offloaded is None:
        # Made here rather than at import: torch.compiler.disable imports torch._dynamo (~1 s).
        _offloaded = torch.compiler.disable(_offload_segment)
    return section


def _section_of(config) -> ActivationCheckpointingConfig:
    """The activation_checkpointing settings `config` (see configure) gives."""
    if config is None:
        return ActivationCheckpointingConfig()
    if isinstance(config, ActivationCheckpointingConfig):
        return config
    if isinstance(config, ZeroConfig):
        return config.activation_checkpointing or ActivationCheckpointingConfig()
    if isinstance(config, Mapping):
        if "activation_checkpointing" in config:
            data = config["activation_checkpointing"]
            if data is None:
                return ActivationCheckpointingConfig()
        elif set(config) & _WHOLE_CONFIG_KEYS:
            return ActivationCheckpointingConfig()  # a whole config without the section
        else:
            data = config
        return ActivationCheckpointingConfig._parse(data, "activation_checkpointing", [])
    raise TypeError("zero_ext.checkpointing.configure: config must be an "
                    "ActivationCheckpointingConfig, a dict, a ZeroConfig or None (or, as "
                    "DeepSpeed's first argument, an mpu), got " + type(config).__name__)


# Keys of a whole config, none of them a key of the activation_checkpointing section.
_WHOLE_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(ZeroConfig)) | \
    frozenset(ZeroConfig._IGNORED) | frozenset(ZeroConfig._ALIASES)


def _is_mpu(value) -> bool:
    """Whether `value` is a Megatron-style model-parallel unit (DeepSpeed's `mpu_`)."""
    return any(hasattr(value, name) for name in ("get_model_parallel_world_size",
                                                 "get_tensor_model_parallel_world_size"))


def _check_mpu(mpu) -> None:
    get = getattr(mpu, "get_tensor_model_parallel_world_size", None) or \
        mpu.get_model_parallel_world_size
    if get() != 1:
        raise ValueError(
            f"zero_ext.checkpointing.configure: the mpu has {get()} model-parallel ranks; "
            "zero_ext is data-parallel only (DeepSpeed partitions checkpointed activations "
            "across them); run with model-parallel size 1")


def is_configured() -> bool:
    """Whether configure() has been called in this process (DeepSpeed's is_configured;
    zero_ext.initialize calls it when its config has an activation_checkpointing section)."""
    return _configured


def reset() -> None:
    """DeepSpeed's reset(), for evaluation loops that run forwards without backward: copies of
    saved inputs still in flight to the host are finished and let go. zero_ext keeps no
    contiguous buffers to free (nothing is partitioned)."""
    _finish_copies_to_host()


def set_num_layers(layers: int) -> None:
    """DeepSpeed's set_num_layers: number_checkpoints from now on."""
    configure(_config, number_checkpoints=layers)


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """DeepSpeed's switch for partition_activations (accepted with no effect, see configure)."""
    configure(_config, partition_activations=partition_activation)


def _notice(key: str, message: str) -> None:
    if key not in _noticed:
        _noticed.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


# -- counters and profile ---------------------------------------------------------------------
@dataclass
class OffloadCounters:
    """What checkpointing ran and cpu_checkpointing moved since the last reset(), for tests,
    benchmarks and the engine's FLOP estimate (a recomputed forward costs a forward again)."""

    segments: int = 0  # outermost checkpointed segments run with gradients
    tensors_to_host: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    prefetches: int = 0  # segments whose copy back was started by the next segment's backward

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, 0)


counters = OffloadCounters()


@dataclass
class SegmentTiming:
    """One checkpointed segment's times (with `profile`), in seconds; backward_s is None until
    its backward has run, or when no input of the segment needs a gradient."""

    name: str
    forward_s: float
    backward_s: float | None = None
    _backward_start: float | None = dataclasses.field(default=None, repr=False)

    def __str__(self) -> str:
        backward = "-" if self.backward_s is None else f"{self.backward_s * 1e3:.3f} ms"
        return f"{self.name}: forward {self.forward_s * 1e3:.3f} ms, backward {backward}"


# The most recent segments' timings (bounded: profile may stay on for a whole training run).
_timings: collections.deque[SegmentTiming] = collections.deque(maxlen=4096)


def profile_report(reset: bool = True) -> list[SegmentTiming]:
    """The timings of the segments run with `profile` on (in forward order, every call, the
    last 4096 at most), and with `reset`, a fresh start for the next ones. `str()` of each is
    one line of the report."""
    report = list(_timings)
    if reset:
        _timings.clear()
    return report


def _clock(device: torch.device | None) -> float:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time what has run
    return time.perf_counter()


def _time_backward(timing: SegmentTiming, inputs: list, output, device) -> None:
    """Notes when the segment's backward starts (the first gradient of its outputs) and ends
    (all of its inputs' gradients), with autograd hooks: the tensors stay the caller's own (a
    Function passing them through made them views, which an in-place write then refused)."""
    outputs = [t for t in pytree.tree_leaves(output)
               if isinstance(t, torch.Tensor) and t.requires_grad]
    inputs = [t for t in inputs if t.requires_grad]
    if not outputs or not inputs:
        return

    def started(_grads) -> None:
        timing._backward_start = _clock(device)

    def ended(_grads) -> None:
        if timing._backward_start is not None:
            timing.backward_s = _clock(device) - timing._backward_start
        # Once: an input that outlives the step (a parameter passed in) would otherwise gather
        # one more hook every step, each timing its old segment again.
        handle.remove()

    torch.autograd.graph.register_multi_grad_hook(outputs, started, mode="any")
    handle = torch.autograd.graph.register_multi_grad_hook(inputs, ended, mode="all")


# -- cpu_checkpointing --------------------------------------------------------------------------
_streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}


# Segments whose device originals are kept alive until their copies to the host finish.
_copying: list[_HostInputs] = []


def _side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    key = (device, purpose)
    if key not in _streams:
        _streams[key] = torch.cuda.Stream(device)
    return _streams[key]


class _HostInputs:
    """One checkpointed segment's saved inputs, kept in host memory between its forward and its
    backward. Created per segment call; autograd owns it through the handles the pack hook
    returns, so it lives exactly as long as the segment's graph."""

    def __init__(self, device: torch.device, previous: _HostInputs | None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host: list[torch.Tensor] = []
        # Each saved input (weakly) and its version counter at the save: the hooks take the
        # place of autograd's own check that it was not modified in place since.
        self.versions: list[tuple[weakref.ref, int]] = []
        self.originals: list[torch.Tensor] = []  # until to_host_done (CUDA)
        # Saved inputs modified in place while their copies to the host could still run (seen
        # while the originals were held; the weak references may be gone by backward).
        self.modified: set[int] = set()
        self.to_host_done = None
        self.loaded: list[torch.Tensor | None] | None = None  # device copies for backward
        self.to_device_done = None
        self.fetched = False  # its backward has started at least once
        # The segment before this one in forward order: its copy back starts when this
        # segment's backward starts.
        self.previous = weakref.ref(previous) if previous is not None else None

    def __del__(self):
        # Dropped before its backward fetched it (a graph freed early): its device buffers may
        # still be written by the copy back; the compute stream, to which the allocator returns
        # them, waits for that copy first.
        if self.to_device_done is not None and self.loaded is not None:
            torch.cuda.current_stream(self.device).wait_event(self.to_device_done)

    def pack(self, tensor: torch.Tensor):
        if isinstance(tensor, nn.Parameter) or (self.cuda and tensor.device.type == "cpu"):
            return tensor  # weights stay where they are; host tensors are there already
        if tensor.numel() == 0:
            # Nothing to move; torch's own checkpoint saves an empty placeholder (2.11 does).
            return tensor
        if self.cuda:
            # Same strides: a replay on differently laid-out inputs may round differently.
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)
            stream = _side_stream(self.device, "to_host")
            # The copy reads what the compute stream has written so far.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                self.to_host_done = torch.cuda.Event()
                self.to_host_done.record(stream)
            if not self.originals:
                _copying.append(self)
            self.originals.append(tensor)
        else:
            # A CPU-only run: the same path with the host as its own device (tests measure it).
            host = torch.empty_like(tensor).copy_(tensor)
        counters.tensors_to_host += 1
        counters.bytes_to_host += host.numel() * host.element_size()
        self.host.append(host)
        # A view shares its base's version counter, and the base outlives it: a temporary view
        # (f(x[:, :4])) is gone by backward while x can still be modified.
        base = tensor._base if tensor._base is not None else tensor
        self.versions.append((weakref.ref(base), tensor._version))
        return (self, len(self.host) - 1)

    def _check_unmodified(self, index: int) -> None:
        """Raises as autograd does when a saved input was modified in place after the segment's
        forward: the backward would replay the segment on other values than the forward saw
        (on CUDA its copy to the host may even race the in-place write)."""
        ref, saved = self.versions[index]
        tensor = ref()
        if index in self.modified or (tensor is not None and tensor._version != saved):
            host = self.host[index]
            raise RuntimeError(
                f"zero_ext checkpointing: an input of a checkpointed segment "
                f"({tuple(host.shape)}, {host.dtype}) was modified by an in-place operation "
                f"after the segment's forward (its version changed from {saved}), so its "
                "backward would recompute from other values than the forward used (on CUDA its "
                "copy to the host may even have read them half-written); "
                "torch.utils.checkpoint raises the same. Change it out of place, or clone it "
                "first (x = x.clone()) and modify the clone")

    def load(self) -> None:
        """Starts the copies back to the device (on a side stream on CUDA)."""
        if self.originals:
            # Its copies to the host may still run: the originals are right here.
            self.loaded = list(self.originals)
            return
        self.loaded = [torch.empty_like(h, device=self.device) for h in self.host]
        if self.cuda:
            stream = _side_stream(self.device, "to_device")
            # The buffers were just allocated on the compute stream: whatever used that memory
            # before must be done before the side stream writes it.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for buffer, host in zip(self.loaded, self.host):
                    buffer.copy_(host, non_blocking=True)
                self.to_device_done = torch.cuda.Event()
                self.to_device_done.record(stream)
        else:
            for buffer, host in zip(self.loaded, self.host):
                buffer.copy_(host)
        counters.bytes_to_device += sum(h.numel() * h.element_size() for h in self.host)

    def fetch(self, index: int) -> torch.Tensor:
        """Saved input `index`, on the device: the segment's recomputation starts."""
        self._check_unmodified(index)
        if self.loaded is None:
            self.load()
        _finish_copies_to_host()
        if not self.fetched:
            self.fetched = True
            previous = self.previous() if self.previous is not None else None
            if previous is not None and previous.loaded is None and not previous.fetched:
                previous.load()
                counters.prefetches += 1
        if self.to_device_done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.to_device_done)
            self.to_device_done = None
        tensor, self.loaded[index] = self.loaded[index], None
        if all(t is None for t in self.loaded):
            self.loaded = None  # a second backward (retain_graph) copies them back again
        return tensor


def _finish_copies_to_host() -> None:
    """Lets the device originals of finished segments go. The compute stream waits for their
    copies first, so the allocator hands their memory out again only after the copies read it
    (no record_stream)."""
    for inputs in _copying:
        torch.cuda.current_stream(inputs.device).wait_event(inputs.to_host_done)
        # A write queued on the compute stream since the save may have raced the copy; the
        # weak reference the backward checks may be dead by then (the tensor modified, then
        # dropped): checked now, while the originals are held.
        inputs.modified.update(i for i, tensor in enumerate(inputs.originals)
                               if tensor._version != inputs.versions[i][1])
        inputs.originals.clear()
    _copying.clear()


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    inputs, index = packed
    return inputs.fetch(index)


_last_inputs: weakref.ref | None = None


def _offload_hooks(device: torch.device):
    """Saved-tensor hooks that move one segment's inputs to the host (its only tensors saved
    outside torch.utils.checkpoint's own hooks, which take over inside the segment)."""
    global _last_inputs
    _finish_copies_to_host()  # the previous segments' copies ran while they computed
    previous = _last_inputs() if _last_inputs is not None else None
    inputs = _HostInputs(device, previous)
    _last_inputs = weakref.ref(inputs)
    return torch.autograd.graph.saved_tensors_hooks(inputs.pack, _unpack)


# -- checkpoint -----------------------------------------------------------------------------------
_local = threading.local()  # depth: checkpointed segments running on this thread


def checkpoint(fn: Callable, *args, **kwargs):
    """`fn(*args, **kwargs)`, keeping only its inputs for backward and recomputing the rest
    there (non-reentrant: inputs may be keyword arguments or nested in tuples, lists and dicts,
    outputs may be anything). Without gradients (eval, no_grad) it simply calls `fn`. The
    outputs come back as DeepSpeed's checkpoint returns them: a tuple or list of one element as
    that element, a longer list as a tuple; anything else as `fn` returned it (a dict, which
    DeepSpeed turns into its keys, stays a dict). apply() and transformers' switch keep torch's
    convention (the outputs as returned), which HF blocks' callers expect."""
    output = _checkpoint(fn, args, kwargs, None)
    if isinstance(output, (tuple, list)) and len(output) == 1:
        return output[0]
    return tuple(output) if isinstance(output, list) else output


# DeepSpeed's name for its non-reentrant variant; zero_ext's checkpoint is non-reentrant.
non_reentrant_checkpoint = checkpoint


def _checkpoint(fn: Callable, args: tuple, kwargs: dict, name: str | None):
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    while isinstance(fn, functools.partial):
        # Bound arguments become ordinary inputs: saved (and moved to the host) like the rest.
        fn, args, kwargs = fn.func, fn.args + tuple(args), {**fn.keywords, **kwargs}
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    tensors = [leaves[i] for i in at]
    # The replay rebuilds the arguments from the saved tensors; it must not hold the originals.
    template = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
    del leaves, args, kwargs

    def run(*saved):
        values = list(template)
        for i, tensor in zip(at, saved):
            values[i] = tensor
        call_args, call_kwargs = pytree.tree_unflatten(values, spec)
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            return fn(*call_args, **call_kwargs)
        finally:
            _local.depth -= 1

    if getattr(_local, "depth", 0) > 0:  # nested: the outer segment saves and times
        return torch.utils.checkpoint.checkpoint(run, *tensors, use_reentrant=False)
    counters.segments += 1
    config = _config
    device = next((t.device for t in tensors if t.device.type != "cpu"),
                  tensors[0].device if tensors else torch.device("cpu"))
    cuda = device if device.type == "cuda" else None
    timing = None
    if config.profile:
        timing = SegmentTiming(name or _name_of(fn), 0.0)
        start = _clock(cuda)
    elif config.synchronize_checkpoint_boundary and cuda is not None:
        torch.cuda.synchronize(cuda)
    if config.cpu_checkpointing:
        output = _offloaded(run, tensors, device)
    else:
        output = torch.utils.checkpoint.checkpoint(run, *tensors, use_reentrant=False)
    if timing is not None:
        timing.forward_s = _clock(cuda) - start
        _timings.append(timing)
        _time_backward(timing, tensors, output, cuda)
    elif config.synchronize_checkpoint_boundary and cuda is not None:
        torch.cuda.synchronize(cuda)
    return output


def _offload_segment(run: Callable, tensors: list, device: torch.device):
    """A segment whose saved inputs go to the host. Called as `_offloaded`, its
    torch.compiler.disable'd form (configure() makes it): it runs as Python even inside a
    torch.compile'd model (the segment's own computation then runs eagerly too), since Dynamo
    does not follow the saved-tensor hooks that move the inputs, and tracing their bookkeeping
    objects left them half-built."""
    with _offload_hooks(device):
        return torch.utils.checkpoint.checkpoint(run, *tensors, use_reentrant=False)


_offloaded: Callable | None = None


def _name_of(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


# -- apply ---------------------------------------------------------------------------------------
@dataclass
class _Block:
    name: str
    index: int  # in the model's block order: number_checkpoints counts from the first
    inner: Callable | None  # an instance-level forward this replaced (else the class's)


def _checkpoint_block(fn: Callable, args: tuple, kwargs: dict, block: _Block):
    limit = _config.number_checkpoints
    if limit is not None and block.index >= limit:
        return fn(*args, **kwargs)
    return _checkpoint(fn, args, kwargs, block.name)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    block = self._zero_ext_block
    forward = block.inner or types.MethodType(type(self).forward, self)
    return _checkpoint_block(forward, args, kwargs, block)


class _HFCheckpointFunction:
    """What a transformers model calls as `_gradient_checkpointing_func(fn, *args)`."""

    def __init__(self, block: _Block | None):
        self.block = block

    def __call__(self, fn: Callable, *args, **kwargs):
        if self.block is None:
            return _checkpoint(fn, args, kwargs, None)
        return _checkpoint_block(fn, args, kwargs, self.block)


def _find_blocks(model: nn.Module, block_classes) -> list[tuple[str, nn.Module]]:
    if block_classes is not None:
        names = {c for c in block_classes if isinstance(c, str)}
        types_ = tuple(c for c in block_classes if isinstance(c, type))
        found, inside = [], set()
        for name, module in model.named_modules():
            if module is model or any(name.startswith(p + ".") for p in inside):
                continue
            if type(module).__name__ in names or (types_ and isinstance(module, types_)):
                found.append((name, module))
                inside.add(name)
        if not found:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ValueError(f"zero_ext.checkpointing.apply: no module of class "
                             f"{sorted(c if isinstance(c, str) else c.__name__ for c in block_classes)} in the "
                             f"model; its classes are "
                             f"{present}")
        return found
    found = []

    def walk(module: nn.Module, prefix: str, in_container: bool) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, _CONTAINERS):
                walk(child, name + ".", True)
            elif in_container:
                found.append((name, child))
            else:
                walk(child, name + ".", False)

    walk(model, "", isinstance(model, _CONTAINERS))
    if not found:
        raise ValueError(f"zero_ext.checkpointing.apply: {type(model).__name__} has no "
                         "nn.ModuleList or nn.Sequential of blocks; name the block classes, "
                         "e.g. apply(model, block_classes=['DecoderLayer'])")
    return found


def apply(model: nn.Module, block_classes=None) -> list[str]:
    """Checkpoints every block of `model`: the children of its ModuleList / Sequential
    containers, or the modules of `block_classes` (classes or class names). With
    `number_checkpoints` set, only the first that many blocks are checkpointed. Returns the
    blocks' names. Call it once, before or after zero_ext.initialize.

    transformers models (without `block_classes`) are switched with their own
    `activation_checkpointing_enable` / `gradient_checkpointing_enable`, which also stops their
    layers from writing the KV cache, then run this module's `checkpoint`. Checkpointing that
    transformers' switch turned on before is replaced, with a warning; the switch called after
    this replaces it in turn (the module docstring's rule)."""
    blocks = _find_blocks(model, block_classes)
    index = {id(module): _Block(name, i, None) for i, (name, module) in enumerate(blocks)}
    hf_modules = _hf_checkpointed(model)
    if hf_modules:
        warnings.warn(
            f"zero_ext.checkpointing.apply replaces the activation checkpointing that "
            f"transformers' model.gradient_checkpointing_enable() / "
            f"activation_checkpointing_enable() (or TrainingArguments.gradient_checkpointing) "
            f"turned on for {len(hf_modules)} modules: zero_ext's checkpoint now runs the "
            "blocks, and that call's checkpoint arguments, offload and every_n_layers no "
            "longer apply. The switch called last wins; call only one of them to silence this",
            UserWarning, stacklevel=2)
    global _applying
    _applying = True
    try:
        if block_classes is None and getattr(model, "supports_gradient_checkpointing", False):
            enable = getattr(model, "activation_checkpointing_enable", None) or \
                model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            for module in model.modules():
                if hasattr(module, "_gradient_checkpointing_func"):
                    module._gradient_checkpointing_func = _HFCheckpointFunction(
                        index.get(id(module)))
            _guard_hf_switch(model)
            return [name for name, _ in blocks]
    finally:
        _applying = False
    for module in hf_modules:
        module.gradient_checkpointing = False  # the blocks below are checkpointed here, once
    for name, module in blocks:
        if isinstance(module.__dict__.get("_zero_ext_block"), _Block):
            continue  # applied before
        block = index[id(module)]
        block.inner = module.__dict__.get("forward")
        module._zero_ext_block = block
        module.forward = types.MethodType(_checkpointed_forward, module)
    _guard_hf_switch(model)
    return [name for name, _ in blocks]


# -- transformers' own switch ----------------------------------------------------------------
_applying = False  # apply() is calling transformers' switch itself


def _hf_checkpointed(model: nn.Module) -> list[nn.Module]:
    """The modules on which transformers' switch put torch's checkpoint (not this module's)."""
    return [m for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) is True
            and not isinstance(getattr(m, "_gradient_checkpointing_func", None),
                               _HFCheckpointFunction)]


def _zero_ext_checkpointed(model: nn.Module) -> bool:
    return any(isinstance(m.__dict__.get("_zero_ext_block"), _Block) or (
        getattr(m, "gradient_checkpointing", False) is True
        and isinstance(getattr(m, "_gradient_checkpointing_func", None), _HFCheckpointFunction))
        for m in model.modules())


def _guard_hf_switch(model: nn.Module) -> None:
    """Wraps `_set_gradient_checkpointing` (where every transformers switch ends) of each
    transformers model in `model`, so that switching transformers' checkpointing on after
    apply() warns and takes over cleanly (the rule in the module docstring)."""
    for module in model.modules():
        setter = getattr(module, "_set_gradient_checkpointing", None)
        if not callable(setter) or "_set_gradient_checkpointing" in module.__dict__:
            continue

        def guarded(*args, _setter=setter, _owner=module, **kwargs):
            enable = kwargs.get("enable", args[0] if args else True)
            if enable and not _applying and _zero_ext_checkpointed(_owner):
                warnings.warn(
                    "zero_ext: transformers' gradient_checkpointing_enable() / "
                    "activation_checkpointing_enable() (or TrainingArguments."
                    "gradient_checkpointing=True) replaces zero_ext.checkpointing.apply(): "
                    "torch's checkpoint now runs the blocks, and the activation_checkpointing "
                    "settings (cpu_checkpointing, number_checkpoints, profile) no longer apply. "
                    "The switch called last wins; call only one of them to silence this",
                    UserWarning, stacklevel=3)
                _unwrap_blocks(_owner)
            return _setter(*args, **kwargs)

        module._set_gradient_checkpointing = guarded


def _unwrap_blocks(model: nn.Module) -> None:
    """Undoes apply(block_classes=...)'s forward wrappers."""
    for module in model.modules():
        block = module.__dict__.get("_zero_ext_block")
        if isinstance(block, _Block):
            del module._zero_ext_block
            if block.inner is not None:
                module.forward = block.inner
            else:
                del module.forward
