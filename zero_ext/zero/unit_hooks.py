"""Stage 3: when a gather unit's parameters are needed, as the model runs.

PartitionedParameters (zero/params.py) keeps each unit's shards and gathers and releases them;
the `UnitHooks` it builds once its units are partitioned say when, from module hooks:
  forward pre-hook     the unit is used: gathered, and the prefetcher starts the next ones
  forward post-hook    released (unless something holds it or it is used again soon); its
                       outputs hooked so that backward reaching them gathers it again, and,
                       for a unit with frozen parameters, its inputs, so that backward
                       having computed their gradients releases it
  a released parameter used inside a forward
                       its unit gathered on the spot and held until that forward ends
                       (tracked per module), as for a declared external parameter
  register_external_parameter
                       the owner's unit gathered around another module's forward too
UnitHooks also points the units' nn.Linear modules at `_PartitionedLinear` (bitsandbytes'
Linear4bit with a partitioned weight at `_PartitionedLinear4bit`), so that a release frees the
gathered weight. The hooks act on the units only through their PartitionedParameters
(`use`, `release`, the prefetcher's `reused_soon`), which holds its UnitHooks as `hooks`.
"""

from __future__ import annotations

import dataclasses
import sys
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from zero_ext._plain_forward import plain_forward, replace_plain_forward
from zero_ext.zero.leaves import enclosing_leaves, is_leaf

if TYPE_CHECKING:
    from zero_ext.zero.params import PartitionedParameters
    from zero_ext.zero.units import GatherUnit

__all__ = ["UnitHooks", "replaying"]


def _eager(hook):
    """`hook` run as Python even inside a torch.compile'd model: the graph breaks around it
    (it gathers, releases and issues collectives, and keeps per-step counts), instead of
    Dynamo tracing into it, which re-ran its bookkeeping while tracing and so broke the
    prefetcher's record of the order units run in."""
    return torch.compiler.disable(hook, recursive=True)


class _PartitionedLinear(torch.autograd.Function):
    """F.linear that saves the weight Parameter itself for backward, not `weight.t()`.

    nn.Linear's own autograd saves a view of the weight, which would keep a released unit's
    gathered buffer alive until backward; saving the Parameter lets the release free it, and
    the unit's pre-backward gather points the Parameter at fresh full values before this
    backward reads it.
    """

    @staticmethod
    def forward(ctx, input, weight, bias):
        # Only what a gradient needs, as torch's own linear saves: a frozen weight (a LoRA
        # base) keeps no input alive, and may see its input modified in place after.
        ctx.save_for_backward(input if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        # Under torch.autocast the forward computed in the autocast dtype (the output, and so
        # its gradient, is bf16) from the fp32 tensors saved here: the backward computes in
        # that dtype too, as autocast's own linear does; autograd casts the gradients back to
        # the parameter's and the input's dtypes. Without autocast these casts do nothing.
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = weight.to(grad_output.dtype)
            grad_input = grad_output.matmul(weight)
        if ctx.needs_input_grad[1]:
            input = input.to(grad_output.dtype)
            grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(
                input.reshape(-1, input.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_input, grad_weight, grad_bias


def _partitioned_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    return _PartitionedLinear.apply(input, self.weight, self.bias)


class _PartitionedLinear4bit(torch.autograd.Function):
    """bitsandbytes' 4-bit linear as its MatMul4Bit computes it for a batch (the weight
    dequantized, then a matmul; so is the input gradient), saving the weight Parameter for
    backward: MatMul4Bit saves a view of the packed weight, which would keep every released
    unit's gathered 4-bit buffer alive until backward. dequantize_4bit reads the weight's
    shape from its quantization state whatever layout a bitsandbytes version passes it in.
    The weight is frozen: only the input's (and a trained bias's) gradients are computed."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        import bitsandbytes as bnb  # a model holding a Linear4bit has imported it

        ctx.save_for_backward(weight)
        ctx.state = weight.quant_state
        dequantized = bnb.functional.dequantize_4bit(weight.view(-1, 1), ctx.state)
        return torch.nn.functional.linear(input, dequantized.to(input.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        import bitsandbytes as bnb

        weight, = ctx.saved_tensors
        grad_input = grad_bias = None
        if ctx.needs_input_grad[0]:
            dequantized = bnb.functional.dequantize_4bit(weight.view(-1, 1), ctx.state)
            grad_input = torch.matmul(grad_output, dequantized.to(grad_output.dtype))
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_input, None, grad_bias


def _partitioned_linear4bit_forward(self, input: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward (its compute dtype) through _PartitionedLinear4bit, and
    never its CPU inference path, which repacks `weight.data` (a view of the gathered buffer,
    released after the forward) into another layout and marks the shared quantization state
    so; the bias is cast for the product, not in place."""
    if not self.compute_type_is_set:
        self.set_compute_type(input)
        self.compute_type_is_set = True
    dtype = input.dtype
    if self.compute_dtype is not None:
        input = input.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(input.dtype)
    return _PartitionedLinear4bit.apply(input, self.weight, bias).to(dtype)


def _partition_linear_forwards(units: list[GatherUnit]) -> None:
    """The units' plain nn.Linear modules compute through _partitioned_linear_forward, which
    lets the release free the weight, and bitsandbytes' Linear4bit modules whose weight the
    unit partitions through _partitioned_linear4bit_forward. Subclasses (but Linear4bit's
    that keep its forward), and instances whose forward something replaced (a checkpointed
    block, whose forward saves nothing until its replay), keep their own; under a wrapper
    that falls back to the plain forward (zero_ext.fused's loss head), the fallback is
    replaced."""
    bnb_modules = sys.modules.get("bitsandbytes.nn.modules")
    linear4bit = bnb_modules.Linear4bit.forward if bnb_modules is not None else None
    for unit in units:
        members = {id(p) for params in unit.params for p in params}
        for module in unit.module.modules():
            forward = getattr(plain_forward(module), "__func__", None)
            if type(module) is nn.Linear and forward is nn.Linear.forward:
                replace_plain_forward(module, _partitioned_linear_forward.__get__(module))
            elif forward is not None and forward is linear4bit \
                    and id(module._parameters.get("weight")) in members:
                replace_plain_forward(module, _partitioned_linear4bit_forward.__get__(module))


def _tensors_requiring_grad(output) -> list[torch.Tensor]:
    """Tensors in a module's output (nested tuples, lists, dicts, dataclasses and transformers'
    ModelOutput) that backward will reach."""
    return [tensor for tensor in _output_tensors(output) if tensor.requires_grad]


def _output_tensors(value):
    # A generator at module level, not a nested function calling itself: that closure is a
    # reference cycle (function -> cell -> function) holding the outputs it found, and with
    # them their hooks (which hold the units and the model) until the garbage collector runs,
    # where torch resurrects an output still saved for backward by a later op: the model then
    # outlived the first gc.collect() after the engine and the loss were dropped.
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _output_tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _output_tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _output_tensors(getattr(value, f.name))


def replaying() -> bool:
    """Whether a forward runs inside backward: activation checkpointing recomputing a segment
    (torch.utils.checkpoint replays from within the autograd engine, reentrant or not). Its
    units' hooks fire again there and must neither release them nor count as forward uses."""
    return torch._C._current_graph_task_id() != -1


class UnitHooks:
    """The forward hooks of `params`' units and of `root` (the model), and the external
    parameters: declared with register_external_parameter (also before initialize, kept on
    the module), or found when a released parameter is used inside a forward."""

    def __init__(self, params: PartitionedParameters, root: nn.Module | None):
        self.params, self.root = params, root
        _partition_linear_forwards(params.units)
        self._handles = []
        self._external: set[tuple[int, int]] = set()  # (module, unit) pairs declared so far
        # The forwards running now (the model's, and units' inside it), innermost last, each
        # with the units it gathered for parameters used inside it without a declaration.
        self._running: list[tuple[nn.Module, list[GatherUnit]]] = []
        # The inputs that units with frozen parameters took in the forwards since the last
        # backward began (see _release_after_inputs).
        self._taken = torch.utils.weak.WeakIdKeyDictionary()
        for unit in params.units:
            self._hook_module(unit.module, unit)
        self._watch_outside_trainable(params.units)
        # Leaf modules (zero/leaves.py) run on every rank, their inner modules (experts) maybe
        # not: a declaration inside one moves to its outermost leaf, and a use found inside
        # one is refused (see hold_in_forward).
        self._leaf_of = enclosing_leaves(root) if root is not None else {}
        unit_modules = {id(unit.module) for unit in params.units}
        for leaf in {id(m): m for m in self._leaf_of.values()}.values():  # the outermost
            if id(leaf) not in unit_modules:
                self._track_running(leaf)
        if root is not None:
            self._track_running(root)
            # The models generate() calls directly (a PeftModel's inner transformers model):
            # a released parameter used in their forwards is gathered there as in the root's.
            for module in root.modules():
                if module is not root and callable(getattr(type(module), "generate", None)):
                    self._track_running(module)
            for module in root.modules():  # declared before initialize (e.g. in constructors)
                for param in module.__dict__.pop("_zero_ext_external_params", []):
                    self.register_external_parameter(module, param)

    def remove(self) -> None:
        """engine.destroy(): the modules' hooks removed (the units stay partitioned)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _watch_outside_trainable(self, units: list[GatherUnit]) -> None:
        """A unit with frozen parameters also waits, in backward, for the gradients of the
        trainable parameters in its modules that its buckets do not hold (kept whole by
        stage3_param_persistence_threshold, such as small LoRA matrices and norms, or an inner
        unit's): a frozen weight's backward may be what computes them (a trainable norm before
        a frozen linear). A leaf's unit does not: its backward is over with its inputs'
        gradients, and an expert that got no token on this rank never gives its parameters
        one (waiting for them kept it gathered on that rank only)."""
        watchers: dict[int, list[int]] = {}  # parameter id -> positions of its units
        watched = []
        for position, unit in enumerate(units):
            if not unit.has_frozen or unit.leaf:
                continue
            own = {id(p) for members in unit.params for p in members}
            outside = [p for p in unit.module.parameters() if p.requires_grad
                       and id(p) not in own]
            unit.outside_trainable = len(outside)
            for param in outside:
                if id(param) not in watchers:
                    watched.append(param)
                watchers.setdefault(id(param), []).append(position)
        # The hooks live on the parameters, beyond the engine when the caller keeps the model:
        # they reach the units through a weak reference only.
        ref = weakref.ref(self.params)

        def accumulated(param: nn.Parameter) -> None:
            params = ref()
            if params is not None:
                for position in watchers.get(id(param), ()):
                    params.outside_grad(params.units[position])

        self._handles += [p.register_post_accumulate_grad_hook(accumulated) for p in watched]

    def _hook_module(self, module: nn.Module, unit: GatherUnit) -> None:
        """Gather `unit` around `module`'s forward, and again when backward reaches it."""
        def gather(module, args):
            self.params.use(unit, "forward")

        def before(module, args, kwargs):
            if unit.waits_for_inputs and torch.is_grad_enabled():
                return self._release_after_inputs(unit, args, kwargs)
            return None

        # The gather first, before the model's own pre-hooks (weight_norm's, spectral_norm's
        # read the weights: run on the released ones, they gathered the unit and held it for
        # the rest of the forward); the inputs' wrapping last, around the arguments the
        # module's forward receives.
        self._handles.append(module.register_forward_pre_hook(_eager(gather), prepend=True))
        self._handles.append(module.register_forward_pre_hook(_eager(before), with_kwargs=True))
        self._handles.append(module.register_forward_hook(_eager(
            lambda module, args, kwargs, output, unit=unit:
                self._after_forward(unit, None, output)), with_kwargs=True))
        self._track_running(module)

    def begin_backward(self) -> None:
        self._taken.clear()

    def _track_running(self, module: nn.Module) -> None:
        def enter(module, args):
            self._running.append((module, []))

        def leave(module, args, kwargs, output):
            # always_call: an exception inside the forward must not leave it "running".
            if not self._running or self._running[-1][0] is not module:
                return
            _, borrowed = self._running.pop()
            for unit in borrowed:
                unit.holders -= not replaying()
                self._after_forward(unit, (args, kwargs), output)

        self._handles.append(module.register_forward_pre_hook(_eager(enter)))
        self._handles.append(module.register_forward_hook(_eager(leave), always_call=True,
                                                          with_kwargs=True))

    def use_released(self, param: nn.Parameter) -> None:
        """A released parameter's values are used. Inside a forward, the code using them runs
        in the innermost running unit (or the model's own forward): the owner's unit is gathered
        now and held until that forward ends, and again for its backward, every step (DeepSpeed
        registers such "external parameters" itself). Anywhere else nothing says when the use
        ends, so it is an error that names the parameter and the fix."""
        if self.hold_in_forward(param):
            return
        unit = self.params.unit_of_param[id(param)]
        names = {id(p): n for n, p in self.root.named_parameters()} if self.root else {}
        owner = next((n for n, m in self.root.named_modules() if m is unit.module),
                     type(unit.module).__name__) if self.root else type(unit.module).__name__
        raise RuntimeError(
            f"zero_ext stage 3: parameter {names.get(id(param), '?')} is used outside any "
            f"forward of the model while its unit ({owner}) is partitioned: it holds no values "
            "here, and computing on it would silently use an empty tensor. Gather it around "
            "the use: `with zero_ext.GatheredParameters(param): ...` (add modifier_rank=0 to "
            "write to it), or move the use into a module's forward and declare it with "
            "zero_ext.register_external_parameter(module, param)")

    def hold_in_forward(self, param: nn.Parameter) -> bool:
        """Inside a forward of the model, `param`'s unit is gathered now, held until that forward
        ends and gathered again for its backward (what a use of its values there does); for code
        that reads a parameter's shape before its values, such as a custom autograd Function
        sizing its loops from the weight. False, doing nothing, outside any forward."""
        if not self._running:
            return False
        unit = self.params.unit_of_param[id(param)]
        running = self._running[-1][0]
        if is_leaf(running):
            names = {id(p): n for n, p in self.root.named_parameters()} if self.root else {}
            raise RuntimeError(
                f"zero_ext stage 3: parameter {names.get(id(param), '?')} of another unit is "
                f"used inside the leaf module {type(running).__name__} without a declaration. "
                "A leaf's inner modules (experts) may run on some ranks only, and gathering it "
                "there would make the ranks issue different collectives. Declare it before "
                "initialize: zero_ext.register_external_parameter(leaf_module, param)")
        # Gathered, not counted as a use in the prefetch order: where the order keeps the
        # unit gathered (reused soon), the next step reads it with no such use, and the order
        # would look changed.
        self.params.gather(unit)
        unit.holders += not replaying()
        self._running[-1][1].append(unit)
        return True

    def register_external_parameter(self, module: nn.Module, param: nn.Parameter) -> None:
        """`module` uses `param`, which belongs to another unit: gather that unit around
        `module` too."""
        unit = self.params.unit_of_param.get(id(param))
        # Inside a leaf, around the leaf: its inner modules may run on some ranks only.
        module = self._leaf_of.get(id(module), module)
        if unit is None or any(m is module for m in unit.module.modules()):
            return  # the owner's own unit holds the module: gathered around it already
        if (id(module), id(unit)) in self._external:
            return  # declared before (GatheredParameters(fwd_module=) on every call, say)
        self._external.add((id(module), id(unit)))

        def before(module, args):
            self.params.use(unit, "forward")
            # The owner's own forward inside must not release it. (A replay may stop early,
            # before `after`: it counts nothing.)
            unit.holders += not replaying()

        def after(module, args, kwargs, output):
            unit.holders -= not replaying()
            self._after_forward(unit, (args, kwargs), output)

        self._handles.append(module.register_forward_pre_hook(_eager(before)))
        # always_call: a forward that raises must not leave the unit held (and gathered).
        self._handles.append(module.register_forward_hook(_eager(after), always_call=True,
                                                          with_kwargs=True))

    def _after_forward(self, unit: GatherUnit, inputs, output) -> None:
        """A forward that used `unit` has run, giving `output`: the unit's own, or another
        module's, on `inputs` (args, kwargs), whose gradients a unit with frozen parameters
        or a leaf then waits for (its own forward hooked them before it ran: None)."""
        self.params.after_forward()  # a prefetch held back for a deferred step starts now
        if inputs is not None and unit.waits_for_inputs and torch.is_grad_enabled():
            self._release_after_inputs(unit, *inputs, replace=False)
        if replaying():
            # The replay's outputs feed no backward, and its saved tensors alias the gathered
            # buffers: the unit stays gathered until its gradients are reduced.
            return
        if torch.is_grad_enabled():
            for tensor in _tensors_requiring_grad(output):
                if tensor.grad_fn is None:
                    # A leaf (a frozen embedding's output set to require grad, as
                    # enable_input_require_grads does): no backward runs through the unit.
                    continue
                tensor.register_hook(lambda grad, unit=unit: self._before_backward(unit, grad))
        if unit.holders == 0 and not self.params.prefetch.reused_soon(unit):
            self.params.release(unit)

    def _release_after_inputs(self, unit: GatherUnit, args, kwargs, replace: bool = True):
        """A unit with frozen parameters, or a leaf's: its backward is over (for them; for
        every parameter of a leaf) once the gradients of this forward's inputs (`args`,
        `kwargs`) are computed. A replay (activation checkpointing recomputing the forward
        inside backward) counts only where the original forward ran without autograd (torch's
        reentrant checkpoint: the replay's own backward follows); otherwise the original
        forward's inputs are what backward reaches, and the replay's graph is discarded. `replace`: before the forward, which may run on other
        inputs; returns them, when it passed some through a view of its own (a forward
        pre-hook's result), else None."""
        tensors = [t for t in _output_tensors((args, kwargs)) if t.requires_grad]
        if unit.leaf and not tensors and not replaying():
            # Nothing tells when this forward's backward is over: the leaf's buckets wait for
            # the end of backward (another forward's inputs may get their gradients first).
            unit.untracked_use = True
        if not tensors or (replaying() and unit.inputs_pending > 0):
            return None
        changed = None
        if not replaying():
            # Only top-level arguments are replaced (a nested one keeps its longer wait).
            top = {id(a): a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            shared = [t for t in top.values() if t.requires_grad and t in self._taken]
            if shared and replace:
                # A tensor's gradient is complete only after its last consumer's backward (in
                # backward order, the first unit's): the view this unit takes instead gets
                # its own share as soon as this unit's backward computed it. (A view made here,
                # not in a custom Function: the unit may still modify its input in place.)
                alias = {id(t): t.view_as(t) for t in shared}
                args = tuple(alias.get(id(a), a) for a in args)
                kwargs = {k: alias.get(id(v), v) for k, v in kwargs.items()}
                changed = args, kwargs
                tensors = [t for t in _output_tensors(changed) if t.requires_grad]
            for tensor in tensors:
                self._taken[tensor] = True
        unit.inputs_pending += 1
        unit.inputs_registered += 1
        # A leaf input's hook runs on its gradient accumulator, which autograd may run before
        # the unit's parameters' own (the same priority): what ends a leaf unit's backward
        # then waits for the end of the backward running it (torch's reentrant checkpoint
        # replays a block on leaf inputs in a backward of its own).
        leaf_input = any(t.grad_fn is None for t in tensors)
        torch.autograd.graph.register_multi_grad_hook(
            tensors, lambda grads, unit=unit: self.params.inputs_reduced(unit, leaf_input),
            mode="all")
        return changed

    def _before_backward(self, unit: GatherUnit, grad):
        # The gradient of an output the unit passed through unchanged (T5's blocks return the
        # position bias they were given) completes after the unit's own were reduced: its
        # backward is over, and gathering it again would leave it gathered.
        if not unit.backward_done:
            self.params.use(unit, "backward")
        return grad
