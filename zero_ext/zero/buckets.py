"""Partitioned gradient buckets: fill from autograd hooks, reduce while backward runs, keep a shard.

The engine creates one GradientBuckets for its trainable parameters and calls begin_backward /
end_backward around each backward pass; parameter hooks do the rest. When every gradient of a
bucket exists, one zero_ext::flatten_into_ launch copies them (cast to the communication dtype,
pre-divided by the world size) into the bucket's flat buffer, the parameters' .grad are freed,
and the bucket's collective starts asynchronously while autograd goes on with earlier layers:
  stage 0  all-reduce of the whole bucket (every rank keeps every gradient)
  stage 1  reduce-scatter at the accumulation boundary only (.grad accumulates in between,
           or, with data_types.grad_accum_dtype fp32, the bucket's fp32 `window`)
  stage 2  reduce-scatter on every micro-step; the shard is accumulated in fp32 across them
  stage 3  as stage 2, per gather unit; then the unit's full parameters are released
Collectives start in one launch order agreed by every rank, whatever order gradients arrive in,
so every rank issues the same sequence of collectives even when some parameters receive no
gradient. In the first backward that reduces it is the reverse of the order the forwards before
it first used the buckets' parameters in; from the next one on, the order that first one
completed its buckets in (rank 0's orders, given to every rank). A bucket complete before the
ones ahead of it waits for them, holding its gradients (and at stage 3 its unit's full
parameters): in registration order, a model whose modules run in another order (CLIP's towers)
held nearly all of them to the end of backward. With compressed gradients (zero/compression.py)
the bucket's reduction is the compressed one, started the same way; its handle's wait()
finishes it (dequantize and sum, or scatter the top-k entries).
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from zero_ext import comm, ops
from zero_ext.zero.compression import GradientCompression
from zero_ext.zero.partition import BucketLayout

__all__ = ["BucketState", "GradientBucket", "GradientBuckets", "accumulates_shards",
           "fp32_norm", "reduced_grad_dtype"]


# Elements per piece of fp32_norm: a 16 MB fp32 copy at a time.
NORM_PIECE = 1 << 22


def fp32_norm(x: torch.Tensor) -> torch.Tensor:
    """The 2-norm of a 1-D tensor computed in fp32 (a 0-d fp32 tensor). On CPU
    vector_norm(x, dtype=fp32) first copies a 16-bit x to fp32 whole (torch's profiler: one
    allocation of 4 bytes per element; CUDA's norm kernel reads 16-bit input into fp32 itself),
    which for a bucket of DeepSpeed's default 5e8 elements at stages 0-1 would be 2 GB. So on
    CPU, above NORM_PIECE elements, the pieces' norms are taken one at a time and combined."""
    if x.dtype == torch.float32 or x.numel() <= NORM_PIECE or x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dtype=torch.float32)
    pieces = [torch.linalg.vector_norm(piece, dtype=torch.float32)
              for piece in x.split(NORM_PIECE)]
    return torch.linalg.vector_norm(torch.stack(pieces))


def accumulates_shards(stage: int, accumulation_steps: int) -> bool:
    """Whether each rank sums its reduced shards over the micro-steps of a step (stages 2-3
    reduce every micro-step; stages 0-1 let autograd accumulate and reduce once)."""
    return stage >= 2 and accumulation_steps > 1


def reduced_grad_dtype(stage: int, accumulation_steps: int,
                       comm_dtype: torch.dtype) -> torch.dtype:
    """The reduced gradient's dtype, which the update reads and offload copies: fp32 where
    the shards are summed over micro-steps (accumulates_shards), else the reduction's."""
    return torch.float32 if accumulates_shards(stage, accumulation_steps) else comm_dtype


class BucketState(enum.Enum):
    WAITING = "waiting"      # not all gradients of this backward have arrived
    READY = "ready"          # complete, waiting for earlier buckets to start their collectives
    REDUCING = "reducing"    # collective in flight
    REDUCED = "reduced"      # this rank's gradient is in `grad`


@dataclass(eq=False)
class GradientBucket:
    layout: BucketLayout
    params: list[torch.nn.Parameter]   # in slot order
    offsets: list[int]                 # slot offsets, for the flatten op
    arrived: set[int] = field(default_factory=set)   # slot positions whose grad arrived
    used: set[int] = field(default_factory=set)  # slot positions with a grad this window
    state: BucketState = BucketState.WAITING
    flat: torch.Tensor | None = None   # whole padded bucket in the communication dtype
    work: object | None = None         # the in-flight collective's handle
    grad: torch.Tensor | None = None   # what the optimizer reads: full (stage 0) or shard
    accumulated: torch.Tensor | None = None  # stage 2 with accumulation: fp32 shard sum
    window: torch.Tensor | None = None  # stages 0-1, fp32 accumulation: the window's sum so far
    norm: torch.Tensor | None = None   # this step's final gradient's L2 norm (fp32, 0-dim)


class GradientBuckets:
    """Every trainable parameter's gradient path from autograd to the optimizer."""

    def __init__(self, layouts: list[BucketLayout], params: list[torch.nn.Parameter], *,
                 stage: int, comm_dtype: torch.dtype, accumulation_steps: int,
                 overlap_comm: bool, fp32_accumulation: bool = False, on_reduced: Callable[[int], None] | None = None,
                 on_final: Callable[[int, torch.Tensor], bool] | None = None,
                 compression: GradientCompression | None = None):
        self.stage = stage
        # Compressed gradients: its reduce() replaces the exact collective (None: exact).
        self.compression = compression
        self.comm_dtype = comm_dtype
        # What a step reads (and offload's host buffers hold): fp32 when shards accumulate.
        self._reduced_dtype = reduced_grad_dtype(stage, accumulation_steps, comm_dtype)
        self.accumulation_steps = accumulation_steps
        # Stages 0-1 between boundaries: each gradient goes into its bucket's fp32 window (and
        # leaves .grad) instead of autograd's 16-bit sum in .grad.
        self.fp32_accumulation = fp32_accumulation and stage <= 1
        self.overlap_comm = overlap_comm
        self._on_reduced = on_reduced  # told each bucket index whose gradients were taken
        # Offload: told (bucket index, gradient) as soon as a bucket's gradient for the step is
        # final, so its copy to the host starts while backward goes on. Returning True takes
        # the gradient: the bucket lets go of it (the taker keeps it until its copy is done).
        self._on_final = on_final
        self.world_size = comm.world_size()
        self.rank = comm.rank()
        # Stage 0 keeps whole buckets; so does every stage on one rank, where a shard is the
        # whole bucket and a reduce-scatter would only copy it.
        self._whole_buckets = stage == 0 or self.world_size == 1
        self.buckets = [
            GradientBucket(layout, [params[s.param_index] for s in layout.slots],
                           [s.offset for s in layout.slots]) for layout in layouts]
        self._where: dict[torch.nn.Parameter, tuple[GradientBucket, int]] = {}
        for bucket in self.buckets:
            for position, param in enumerate(bucket.params):
                self._where[param] = (bucket, position)
        self.held: set[int] = set()  # see hold_for_leaves
        self._counted_as_zero: set[int] = set()
        # The launch order (bucket indices, the same on every rank) and where it has got to.
        self._order = list(range(len(self.buckets)))
        self._next_launch = 0
        # The order this rank's buckets were complete in, in the first backward that reduces
        # (None once every rank has taken rank 0's as the launch order).
        self._completed: list[int] | None = []
        # See watch_first_use (None: not watched, or the first reducing backward has begun).
        self._first_use: dict[int, None] | None = None
        self._first_use_hooks: list = []
        self._active = False       # inside engine.backward
        self._reduce_now = False   # this backward reduces (boundary, or every one in stage 2)
        self._micro_index = 0      # micro-step within the accumulation window (stage 2)
        self._boundary = False     # this backward ends the accumulation window
        # The hooks live on the parameters, which outlive the engine when the caller keeps the
        # model; through C++ (the tensor's hook table) a bound method would keep these buckets,
        # and through them a stage-3 engine's units and the model itself, alive for good.
        on_grad = weakref.WeakMethod(self._on_grad)

        def hook(param: torch.nn.Parameter) -> None:
            method = on_grad()
            if method is not None:
                method(param)

        self._handles = [p.register_post_accumulate_grad_hook(hook) for p in params]

    def remove_hooks(self) -> None:
        """engine.destroy(): the parameters' gradients are autograd's own again."""
        for handle in self._handles + self._first_use_hooks:
            handle.remove()
        self._handles, self._first_use_hooks = [], []

    # -- backward ---------------------------------------------------------------------------
    def watch_first_use(self, model: torch.nn.Module) -> None:
        """Until the first backward that reduces: records the order the forwards first use the
        buckets' parameters in (each module with parameters of ours hooked before its forward),
        whose reverse is that backward's launch order."""
        bucket_of = {id(p): bucket.layout.index for bucket in self.buckets for p in bucket.params}
        first_use = self._first_use = {}
        indices_of: dict[int, list[int]] = {}

        # One hook object for every module, its data looked up by module, and nothing recorded
        # while torch.compile traces it (that first backward launches in index order): a hook
        # per module, traced, made Dynamo guard on each module's bucket indices, one compiled
        # entry per block where graph breaks split the model (stage 3's gathers), and past its
        # recompile limit (8) the blocks ran uncompiled for the rest of training. Disabling
        # the hook for Dynamo instead split every block's graph at it, for good.
        def hook(module, args) -> None:
            if torch.compiler.is_compiling():
                return
            first_use.update(dict.fromkeys(
                [i for i in indices_of.get(id(module), ()) if i not in first_use]))

        for module in model.modules():
            indices = list(dict.fromkeys(bucket_of[id(p)] for p in module.parameters(False)
                                         if id(p) in bucket_of))
            if indices:
                indices_of[id(module)] = indices
                self._first_use_hooks.append(module.register_forward_pre_hook(hook))

    def begin_backward(self, boundary: bool, micro_index: int) -> None:
        self._active = True
        self._reduce_now = boundary or self.stage >= 2
        if self._reduce_now and self._first_use is not None:
            # Collective (every rank's first reducing backward): the buckets in the reverse of
            # their first use, those no module's forward used after them in index order.
            first_use = list(self._first_use)[::-1]
            self._first_use = None
            for handle in self._first_use_hooks:
                handle.remove()
            self._agree_order(first_use + sorted(set(self._order).difference(first_use)))
        self._micro_index = micro_index
        self._boundary = boundary
        self._next_launch = 0
        for bucket in self.buckets:
            bucket.arrived.clear()
            bucket.state = BucketState.WAITING

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        if not self._active:
            raise RuntimeError(
                "zero_ext: a gradient was produced outside engine.backward(); call "
                "engine.backward(loss) instead of loss.backward() so gradients are reduced")
        bucket, position = self._where[param]
        if self._reduce_now and bucket.state in (BucketState.REDUCING, BucketState.REDUCED):
            raise RuntimeError(
                f"zero_ext: a parameter of bucket {bucket.layout.index} ({tuple(param.shape)}) "
                "got a second gradient in this backward, after its bucket was reduced: it would "
                "be lost (DeepSpeed refuses this too). Autograd accumulates a parameter twice "
                "when it is used in a reentrant activation-checkpointed segment and again "
                "outside it, or in two such segments (two forwards of a checkpointed model "
                "before one backward): checkpoint with use_reentrant=False "
                "(gradient_checkpointing_kwargs={'use_reentrant': False} in transformers). At "
                "stage 3 a leaf module's parameter used by another module also does: declare it "
                "with zero_ext.register_external_parameter(module, param)")
        bucket.used.add(position)
        if not self._reduce_now:  # stage 0/1 between boundaries
            if self.fp32_accumulation:
                if bucket.window is None:
                    bucket.window = torch.zeros(bucket.layout.padded_numel, dtype=torch.float32,
                                                device=param.device)
                ops.flatten_into_(bucket.window, [param.grad], [bucket.offsets[position]],
                                  accumulate=True)
                param.grad = None
            return  # else autograd accumulates into .grad
        bucket.arrived.add(position)
        if len(bucket.arrived) == len(bucket.params) and bucket.layout.index not in self.held:
            self._mark_ready(bucket)
            self._launch_ready()

    def hold_for_leaves(self, indices: set[int]) -> None:
        """Stage 3's leaf units (zero/leaves.py): their buckets (`indices`) are reduced by
        reduce_now when the unit's backward is over, not when their gradients are all there (on
        a rank where they are, the reduction would come earlier than on one where an expert got
        no token: another collective order)."""
        self.held = set(indices)

    def count_as_zero(self, params: list[torch.nn.Parameter]) -> None:
        """Stage 3's leaves' parameters: one without a gradient counts as having a zero one
        (as DeepSpeed gives them zeros), also for ignore_unused_parameters false."""
        self._counted_as_zero = {id(p) for p in params if p in self._where}

    def reduce_now(self, indices: list[int]) -> None:
        """Stage 3, a leaf unit's backward is over (its inputs have their gradients): its
        buckets are reduced now, their parameters without a gradient on this rank counting as
        zero; every rank reaches this at the same point."""
        if not self._reduce_now:
            return
        for index in indices:
            self._mark_ready(self.buckets[index])
        self._launch_ready()

    def _mark_ready(self, bucket: GradientBucket) -> None:
        if bucket.state is BucketState.WAITING:
            bucket.state = BucketState.READY
            if self._completed is not None:
                self._completed.append(bucket.layout.index)

    def _agree_order(self, mine: list[int]) -> None:
        """Collective: rank 0's order (a permutation of the bucket indices) becomes every
        rank's launch order. Any order issued alike by every rank is correct; the one that
        follows backward frees each bucket's gradients (and unit) soonest."""
        order = comm.all_gather_object(mine)[0]
        if sorted(order) != list(range(len(self.buckets))):
            raise RuntimeError(f"zero_ext: internal error: bucket launch order {order} is not "
                               f"a permutation of the {len(self.buckets)} buckets")
        self._order = order

    def _launch_ready(self) -> None:
        while (self._next_launch < len(self._order)
               and self.buckets[self._order[self._next_launch]].state is BucketState.READY):
            self._launch(self.buckets[self._order[self._next_launch]])
            self._next_launch += 1

    def _launch(self, bucket: GradientBucket) -> None:
        layout = bucket.layout
        # Zeros: alignment gaps, padding and parameters without a gradient contribute nothing.
        bucket.flat = torch.zeros(layout.padded_numel, dtype=self.comm_dtype,
                                  device=bucket.params[0].device)
        present = [i for i, p in enumerate(bucket.params) if p.grad is not None]
        scale = 1.0 / self.world_size
        if self.compression is not None:  # compressed momentum: (1 - beta1) g
            scale *= self.compression.gradient_scale(layout.index)
        grads = [bucket.params[i].grad for i in present]
        offsets = [bucket.offsets[i] for i in present]
        if bucket.window is not None:  # the window's fp32 sum, this backward's added last
            ops.flatten_into_(bucket.window, grads, offsets, accumulate=True)
            grads, offsets, bucket.window = [bucket.window], [0], None
        ops.flatten_into_(bucket.flat, grads, offsets, scale=scale)
        for i in present:
            bucket.params[i].grad = None
        if self._on_reduced is not None:
            self._on_reduced(layout.index)  # stage 3: the unit's full parameters can go
        out = None if self._whole_buckets else \
            torch.empty(layout.shard_numel, dtype=self.comm_dtype, device=bucket.flat.device)
        if self.compression is not None:
            bucket.work = self.compression.reduce(bucket.flat, out, layout.index)
        elif out is None:
            bucket.work = comm.all_reduce(bucket.flat, async_op=True, bucket=layout.index)
        else:
            bucket.work = comm.reduce_scatter(out, bucket.flat, async_op=True,
                                              bucket=layout.index)
        if out is not None:
            bucket.grad = out
        bucket.state = BucketState.REDUCING
        if not self.overlap_comm:
            self._finish(bucket)
        elif self._next_launch > 0:
            # One collective stays in flight while the one before it is finished: its whole
            # bucket is freed (holding them all to the end of backward held the whole model's
            # gradient, which stages 2 and 3 partition to avoid) and, with offload, its
            # gradient goes to the host while backward goes on. On NCCL the wait only orders
            # the compute stream after that earlier collective; it does not block the host.
            self._finish(self.buckets[self._order[self._next_launch - 1]])

    def _finish(self, bucket: GradientBucket) -> None:
        if bucket.state is not BucketState.REDUCING:
            return
        if bucket.work is not None:
            bucket.work.wait()
            bucket.work = None
        if self._whole_buckets:
            bucket.grad = bucket.flat  # the all-reduced bucket itself
        bucket.flat = None
        if self._accumulates():
            if bucket.accumulated is None:
                bucket.accumulated = torch.empty(bucket.layout.shard_numel, dtype=torch.float32,
                                                 device=bucket.grad.device)
            ops.flatten_into_(bucket.accumulated, [bucket.grad], [0],
                              accumulate=self._micro_index > 0)
            bucket.grad = None
        else:
            bucket.accumulated = None  # an earlier window's (one held open): not this one's
        bucket.state = BucketState.REDUCED
        if not self._boundary:
            return
        final = bucket.accumulated if bucket.accumulated is not None else bucket.grad
        if final.dtype != self._reduced_dtype:
            # A window held open at one micro-step per step: its fp32 sum goes on in the dtype
            # every other step of the run has (offload's host buffers hold it), so an fp16
            # overflow of the sum shows in the norm and the step is skipped.
            bucket.grad, bucket.accumulated = final.to(self._reduced_dtype), None
            final = bucket.grad
        # Each bucket's norm is taken as soon as its gradient is final, so the global norm
        # never needs the gradients themselves, which a taker may free before the step.
        bucket.norm = fp32_norm(final)
        if self._on_final is not None and self._on_final(bucket.layout.index, final) \
                and bucket.accumulated is None:
            bucket.grad = None

    def set_accumulation_steps(self, steps: int, fixed_dtype: bool) -> None:
        """engine.set_train_batch_size, between windows. The reduced gradient's dtype follows
        (fp32 when stage-2/3 shards are summed) unless `fixed_dtype` (offload's host buffers
        were sized for the old one: the sum is then rounded to it, as in a held-open window)."""
        self.accumulation_steps = steps
        if not fixed_dtype:
            self._reduced_dtype = reduced_grad_dtype(self.stage, steps, self.comm_dtype)

    def _accumulates(self) -> bool:
        """Whether this backward's reduced shards are summed in fp32 over the window: at stages
        2-3 with several micro-steps per step, and also in a window that
        set_gradient_accumulation_boundary(False) holds open past a single one."""
        return self.stage >= 2 and (accumulates_shards(self.stage, self.accumulation_steps)
                                    or not self._boundary or self._micro_index > 0)

    def end_backward(self) -> None:
        """Starts what has not started (parameters that got no gradient) and waits for all."""
        try:
            if self._reduce_now:
                for index in self._order[self._next_launch:]:
                    self._mark_ready(self.buckets[index])
                self._launch_ready()
                for index in self._order:
                    self._finish(self.buckets[index])
                if self._completed is not None:
                    completed, self._completed = self._completed, None
                    self._agree_order(completed)
        finally:
            self._active = False

    # -- optimizer side ----------------------------------------------------------------------
    def reduced_grads(self, only: Collection[int] | None = None) -> list[torch.Tensor]:
        """Per bucket (or per bucket index in `only`, in bucket order), the averaged gradient
        this rank steps with: the whole bucket at stage 0, this rank's shard otherwise (fp32
        when accumulated over micro-steps at stage 2)."""
        grads = []
        for bucket in self.buckets:
            if only is not None and bucket.layout.index not in only:
                continue
            grad = bucket.accumulated if bucket.accumulated is not None else bucket.grad
            if grad is None:
                raise RuntimeError("zero_ext: no reduced gradients: engine.step() at an "
                                   "accumulation boundary needs engine.backward() first")
            grads.append(grad)
        return grads

    def reduced_norms(self) -> list[torch.Tensor]:
        """Per bucket, the L2 norm of the gradient reduced_grads() gives (fp32, 0-dim)."""
        if any(bucket.norm is None for bucket in self.buckets):
            raise RuntimeError("zero_ext: no reduced gradients: engine.step() at an "
                               "accumulation boundary needs engine.backward() first")
        return [bucket.norm for bucket in self.buckets]

    def without_gradient(self) -> list[torch.nn.Parameter]:
        """The parameters that got no gradient on this rank since the last clear() (the
        accumulation window), in bucket order: ignore_unused_parameters false refuses them."""
        return [p for b in self.buckets for i, p in enumerate(b.params)
                if i not in b.used and id(p) not in self._counted_as_zero]

    def clear(self) -> None:
        """Drops the gradients after a step (or a skipped step). The stage-2 fp32 accumulator
        stays allocated: the next window's first micro-step overwrites it."""
        for bucket in self.buckets:
            bucket.used.clear()
            bucket.grad = None
            bucket.flat = None
            bucket.norm = None
            bucket.window = None
            for param in bucket.params:
                param.grad = None

    def reduced(self) -> bool:
        """Whether the backward that ended the window has reduced its gradients (their norms
        are taken; until step() or clear() drops them)."""
        return any(bucket.norm is not None for bucket in self.buckets)

    def unreduced(self) -> bool:
        """Whether gradients wait for a reduction: stages 0-1 between boundaries (.grad, or the
        fp32 windows), backwards under engine.no_sync() included."""
        return any(bucket.window is not None or any(p.grad is not None for p in bucket.params)
                   for bucket in self.buckets)

    def drop_windows(self, forget_used: bool = False) -> None:
        """engine.zero_grad(): the fp32 sums of a window's gradients not reduced yet (stages
        0-1 with fp32 accumulation; the model's .grad are the caller's to drop), and with
        `forget_used` which parameters got a gradient (ignore_unused_parameters' check)."""
        for bucket in self.buckets:
            bucket.window = None
            if forget_used:
                bucket.used.clear()

    def nbytes(self) -> int:
        """Bytes of gradient storage held now (buckets and any .grad of our parameters)."""
        seen = set()
        total = 0
        tensors = [t for b in self.buckets for t in (b.flat, b.grad, b.accumulated, b.window)]
        tensors += [p.grad for b in self.buckets for p in b.params]
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total
