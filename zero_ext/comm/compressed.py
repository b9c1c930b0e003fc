"""Compressed collectives: quantized reduce-scatter (ZeRO++'s qgZ) and all-gather (qwZ), and
top-k reduce-scatter / all-reduce with error feedback and momentum correction (Deep Gradient
Compression). zero_ext/zero/compression.py calls them per gradient bucket and for stage 3's
weight gathers; tests and benchmarks call them directly.

They are built on comm's own collectives (all_to_all, all_gather, reduce_scatter, all_reduce),
so every transfer is bounded by the watch and counted; each runs under `counted_as` the name of
the collective it stands for, so `traffic.bytes["reduce_scatter"]` of an int8 reduction and of
a bf16 one compare directly, and the bytes counted are the packed payload, block scales and
indices that went on the wire, by link class. The quantization itself is zero_ext.ops' (blockwise
symmetric int8 / int4, one fp32 scale per block, fp32 accumulation on receipt).

Async handles run their last step (dequantizing, scattering what arrived, a second hop) in
wait(), as the hierarchical all-gather does; with async_op=True a handle is always returned.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zero_ext import ops
from zero_ext.comm.collectives import (
    CommGroup,
    all_gather,
    all_reduce,
    all_to_all,
    counted_as,
    rank,
    reduce_scatter,
    world_size,
)
from zero_ext.comm.topology import (
    Topology,
    TopologyError,
    _HierarchicalWork,
    current_topology,
    hierarchical_all_gather,
)

__all__ = [
    "QuantFeedback",
    "TopkFeedback",
    "quantized_all_gather",
    "quantized_reduce_scatter",
    "sparse_all_reduce",
    "sparse_reduce_scatter",
]

_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0
_NEEDED_FOR = "zero_ext.compression.gradients.two_hop"


def _complete(first, finish, async_op: bool):
    """The handle of a compressed collective whose first transfer `first` (a handle, or None
    when it completed already) is followed by `finish`."""
    work = _HierarchicalWork(first, finish)
    if async_op:
        return work
    work.wait()
    return None


def _check_scatter(api: str, output: Tensor, input: Tensor, size: int) -> None:
    if (input.dim() != 1 or not input.is_contiguous() or not output.is_contiguous()
            or input.numel() != output.numel() * size or not input.is_floating_point()
            or not output.is_floating_point()):
        raise ValueError(
            f"zero_ext.comm.{api}: expected a 1-D contiguous floating-point input of world size "
            f"({size}) x output numel elements and a contiguous floating-point output; got input "
            f"{tuple(input.shape)} {input.dtype}, output {tuple(output.shape)} {output.dtype}")


def _two_hop_layout(topology: Topology) -> tuple[int, int] | None:
    """(nodes, ranks per node) when a reduce-scatter can go in two hops: several nodes with
    several ranks each, the same number on every node in contiguous blocks. Otherwise (one
    node, one rank per node, uneven nodes) the flat all-to-all is the whole story."""
    if topology.nodes == 1 or topology.nodes == topology.world_size:
        return None
    try:
        return topology.nodes, topology.ranks_per_node(_NEEDED_FOR)
    except TopologyError:
        return None


def two_hop_groups(topology: Topology) -> tuple[CommGroup, CommGroup] | None:
    """The groups of the two-hop reduce-scatter (within the node, across nodes), or None where
    it is one all-to-all (_two_hop_layout). Collective the first time: the engine asks when it
    is built, at the same point on every rank, so that no group (under NCCL, a communicator) is
    made in the middle of a backward, outside the stall watch's bounded waits."""
    if _two_hop_layout(topology) is None:
        return None
    return topology.node_group(_NEEDED_FOR), topology.across_nodes_group(_NEEDED_FOR)


# -- error feedback for the quantized reduce-scatter ----------------------------------------------
def _encode_fp8(rows: Tensor, residual: Tensor, scale: Tensor) -> None:
    """fp32 `rows` [chunks, m] stored as fp8 `residual` with one fp32 `scale` per row (the
    encoding quantize_chunks reads): the row's largest magnitude maps to fp8's largest."""
    absmax = rows.abs().amax(dim=1) if rows.numel() else rows.new_zeros(rows.shape[0])
    scale.copy_(absmax / _FP8_MAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    residual.view(rows.shape).copy_((rows / safe[:, None]).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8))


class QuantFeedback:
    """The error-feedback state of one quantized reduce-scatter (one per gradient bucket):
    what each hop failed to send, added to its next send (quantize_chunks' residual). fp8
    e4m3 per element with one fp32 scale per chunk: 1 byte per element plus 4 per chunk.

    Hop 1 quantizes the input's `world` chunks (all-to-all over every rank, or within the node
    in two hops): `residual` [numel], `residual_scale` [world]. Hop 2 (two hops: across nodes,
    of this rank's node partial sums of the `nodes` chunks with its local index) has
    `across_residual` [numel / ranks per node], `across_residual_scale` [nodes]; it exists
    whenever the topology allows two hops, so calls with two_hop on or off can share it. The
    chunks a rank keeps exact (its own, and in two hops those of its local index in hop 1) are
    never quantized and their residual rows stay zero.
    """

    def __init__(self, numel: int, world: int, rank: int,
                 layout: tuple[int, int] | None, device=None):
        if world < 1 or numel % world:
            raise ValueError(f"zero_ext.comm.QuantFeedback: numel {numel} must be a multiple "
                             f"of the world size {world} (the reduce-scatter's input)")
        self.numel, self.world, self.rank, self.layout = numel, world, rank, layout
        self.residual = torch.zeros(numel, dtype=_FP8, device=device)
        self.residual_scale = torch.zeros(world, dtype=torch.float32, device=device)
        self.across_residual: Tensor | None = None
        self.across_residual_scale: Tensor | None = None
        if layout is not None:
            nodes, per_node = layout
            self.across_residual = torch.zeros(numel // per_node, dtype=_FP8, device=device)
            self.across_residual_scale = torch.zeros(nodes, dtype=torch.float32, device=device)

    @classmethod
    def for_reduce_scatter(cls, numel: int, world: int, topology: Topology | None = None,
                           device=None) -> QuantFeedback:
        """The state for quantized_reduce_scatter of a `numel`-element input over `world`
        ranks on `topology` (None: the current one)."""
        topology = topology if topology is not None else current_topology()
        if topology.world_size != world:
            raise ValueError(f"zero_ext.comm.QuantFeedback: world {world} but the topology "
                             f"has {topology.world_size} ranks ({topology.describe()})")
        return cls(numel, world, topology.rank, _two_hop_layout(topology), device)

    def tensors(self) -> dict[str, Tensor]:
        """The live state tensors by name (for checkpoints)."""
        out = {"residual": self.residual, "residual_scale": self.residual_scale}
        if self.layout is not None:
            out["across_residual"] = self.across_residual
            out["across_residual_scale"] = self.across_residual_scale
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        _load(self.tensors(), tensors, "QuantFeedback")

    def reset(self) -> None:
        for tensor in self.tensors().values():
            tensor.zero_()

    def _rows(self) -> tuple[Tensor, Tensor | None]:
        """(hop 1 residual [world, m], hop 2 residual [nodes, m] or None) in fp32."""
        m = self.numel // self.world
        first = self.residual.float().view(self.world, m) * self.residual_scale[:, None]
        if self.layout is None:
            return first, None
        second = self.across_residual.float().view(self.layout[0], m) \
            * self.across_residual_scale[:, None]
        return first, second

    def flat_total(self) -> Tensor:
        """This rank's undelivered mass in the input's flat coordinates (fp32, numel): hop 1's
        residual of chunk c at chunk c; hop 2's of node n' (a partial sum of chunk
        n' * per_node + local) at that chunk."""
        first, second = self._rows()
        total = first.clone()
        if second is not None:
            nodes, per_node = self.layout
            total.view(nodes, per_node, -1)[:, self.rank % per_node] += second
        return total.view(-1)

    def from_flat_total(self, total: Tensor, world: int) -> None:
        """The inverse of summing flat_total() over the ranks: `total` (fp32, numel: every
        rank's mass) is spread over the ranks that can carry each chunk, and this rank's part
        re-encoded. Chunk c can be carried by every rank but its owner (which sends it exact):
        in hop 1 by ranks of another local index, in hop 2 by those of c's local index on the
        other nodes, world - 1 ranks in all, so each carries total_c / (world - 1) and the
        sum over ranks is `total` again. On one rank nothing is quantized and nothing kept."""
        if world != self.world or total.numel() != self.numel:
            raise ValueError(f"zero_ext.comm.QuantFeedback.from_flat_total: expected "
                             f"{self.numel} elements for world {self.world}, got "
                             f"{total.numel()} for world {world}")
        self.reset()
        if world == 1:
            return
        m = self.numel // world
        share = total.to(self.residual_scale.device, torch.float32).view(world, m) / (world - 1)
        first = share.clone()
        if self.layout is None:
            first[self.rank] = 0
            _encode_fp8(first, self.residual, self.residual_scale)
            return
        nodes, per_node = self.layout
        local, node = self.rank % per_node, self.rank // per_node
        mine = first.view(nodes, per_node, m)[:, local]
        second = mine.clone()
        mine.zero_()
        second[node] = 0
        _encode_fp8(first, self.residual, self.residual_scale)
        _encode_fp8(second, self.across_residual, self.across_residual_scale)


def _load(live: dict[str, Tensor], given: dict[str, Tensor], what: str) -> None:
    if set(given) != set(live):
        raise ValueError(f"zero_ext.comm.{what}.load_tensors: expected tensors {sorted(live)}, "
                         f"got {sorted(given)} (saved for another world size, topology or "
                         "method: reshard through flat_total / from_flat_total)")
    for name, tensor in live.items():
        if given[name].shape != tensor.shape:
            raise ValueError(f"zero_ext.comm.{what}.load_tensors: {name} has shape "
                             f"{tuple(given[name].shape)}, expected {tuple(tensor.shape)}")
        tensor.copy_(given[name])


# -- quantized reduce-scatter and all-gather -----------------------------------------------------
def quantized_reduce_scatter(output: Tensor, input: Tensor, *, bits: int, block_size: int,
                             feedback: QuantFeedback | None = None, residual_factor: float = 1.0,
                             two_hop: bool = True, async_op: bool = False,
                             bucket: int | None = None):
    """comm.reduce_scatter's result (this rank gets chunk `rank` of the sum of every rank's
    `input`, world x output.numel() elements, pre-divided by the caller) with the other ranks'
    chunks sent quantized (`bits` 8 or 4, blocks of `block_size`): each rank quantizes the
    chunks for the others, one all-to-all moves them, and the receiver sums them dequantized in
    fp32 with its own chunk exact. In two hops when `two_hop` and the topology has several
    nodes of several ranks (_two_hop_layout): within the node first (each rank receives its
    node's partial sums of the chunks of its local index), then those partials requantized and
    all-to-all'ed across nodes among the ranks of its local index, so the slow link carries
    1/(ranks per node) of the flat all-to-all's bytes. `feedback` (QuantFeedback): error
    feedback for each hop, its stored residual scaled by `residual_factor` (the loss scale's
    change since it was stored)."""
    size, me = world_size(), rank()
    _check_scatter("quantized_reduce_scatter", output, input, size)
    if size == 1:
        reduce_scatter(output, input)
        return _complete(None, lambda: None, async_op)
    topology = current_topology()
    layout = _two_hop_layout(topology) if two_hop else None
    if feedback is not None and (feedback.numel != input.numel() or feedback.world != size or (
            layout is not None and feedback.layout != layout)):
        raise ValueError(
            f"zero_ext.comm.quantized_reduce_scatter: the feedback holds residuals for "
            f"{feedback.numel} elements over {feedback.world} ranks (two-hop layout "
            f"{feedback.layout}) but this call reduces {input.numel()} over {size} "
            f"({topology.describe()}); make it with QuantFeedback.for_reduce_scatter(numel, "
            "world, topology, device) for this bucket and job")
    first_state = {} if feedback is None else {
        "residual": feedback.residual, "residual_scale": feedback.residual_scale,
        "residual_factor": residual_factor}
    n = output.numel()
    if layout is None:
        packed = ops.quantize_chunks(input, size, bits, block_size, skip=[me], **first_state)
        received = torch.empty_like(packed)
        with counted_as("reduce_scatter"):
            first = all_to_all(received.view(-1), packed.view(-1), async_op=True, bucket=bucket)

        def finish(packed=packed) -> None:
            ops.dequantize_sum_(output, received.view(size, 1, -1), bits, block_size,
                                exact=input.view(size, n)[me], exact_index=me)

        return _complete(first, finish, async_op)

    nodes, per_node = layout
    node, local = me // per_node, me % per_node
    within, across = two_hop_groups(topology)
    # Hop 1: rows in the input's chunk order [node][local]; the rows for local rank l (the
    # chunks n * per_node + l of every node n) go to it together.
    packed = ops.quantize_chunks(input, size, bits, block_size,
                                 skip=[k * per_node + local for k in range(nodes)], **first_state)
    send = packed.view(nodes, per_node, -1).transpose(0, 1).contiguous()
    received = torch.empty_like(send)
    with counted_as("reduce_scatter"):
        first = all_to_all(received.view(-1), send.view(-1), group=within, async_op=True,
                           bucket=bucket)

    def finish() -> None:
        partial = torch.empty(nodes * n, dtype=torch.float32, device=input.device)
        own = input.view(nodes, per_node, n)[:, local].reshape(-1)
        ops.dequantize_sum_(partial, received.view(per_node, nodes, -1), bits, block_size,
                            exact=own, exact_index=local)
        second_state = {} if feedback is None else {
            "residual": feedback.across_residual,
            "residual_scale": feedback.across_residual_scale,
            "residual_factor": residual_factor}
        packed2 = ops.quantize_chunks(partial, nodes, bits, block_size, skip=[node],
                                      **second_state)
        received2 = torch.empty_like(packed2)
        with counted_as("reduce_scatter"):
            all_to_all(received2.view(-1), packed2.view(-1), group=across, bucket=bucket)
        ops.dequantize_sum_(output, received2.view(nodes, 1, -1), bits, block_size,
                            exact=partial.view(nodes, n)[node], exact_index=node)

    return _complete(first, finish, async_op)


def quantized_all_gather(output: Tensor, input: Tensor, *, bits: int = 8, block_size: int,
                         group: CommGroup | None = None, async_op: bool = False,
                         bucket: int | None = None, hierarchical: bool = False):
    """comm.all_gather's result (every rank's `input` in rank order into `output`) with each
    rank's input sent quantized: one packed row per rank, all-gathered in one collective (or
    comm.hierarchical_all_gather's two hops when `hierarchical`), dequantized into `output`.
    Every rank uses the dequantized values, its own included, so all ranks hold identical
    values (bf16 is read as bf16: the scales are fp32). `input` may be `output`'s chunk."""
    if hierarchical and group is not None:
        raise ValueError("zero_ext.comm.quantized_all_gather: hierarchical gathers over every "
                         "rank; pass group=None with hierarchical=True")
    size = group.size if group is not None else world_size()
    if (output.numel() != input.numel() * size or not output.is_contiguous()
            or not input.is_floating_point() or not output.is_floating_point()):
        raise ValueError(
            f"zero_ext.comm.quantized_all_gather: expected a floating-point input and a "
            f"contiguous floating-point output of group size ({size}) x its numel; got input "
            f"{tuple(input.shape)} {input.dtype}, output {tuple(output.shape)} {output.dtype}")
    if size == 1:
        all_gather(output, input, group=group)
        return _complete(None, lambda: None, async_op)
    packed = ops.quantize_chunks(input.reshape(-1).contiguous(), 1, bits, block_size)
    gathered = torch.empty(size * packed.numel(), dtype=torch.uint8, device=packed.device)
    if hierarchical:
        first = hierarchical_all_gather(gathered, packed.view(-1), async_op=True, bucket=bucket)
    else:
        first = all_gather(gathered, packed.view(-1), async_op=True, bucket=bucket, group=group)

    def finish(packed=packed) -> None:
        ops.dequantize_(output.view(-1), gathered.view(size, -1), bits, block_size)

    return _complete(first, finish, async_op)


# -- top-k with error feedback and momentum correction --------------------------------------------
class TopkFeedback:
    """The state of one top-k reduction (one per gradient bucket), all fp32:
    `residual` v [numel], what this rank has not sent yet; `momentum` u [numel] when momentum
    > 0 (DGC's momentum correction, in EMA form u = m u + (1 - m) g: it stays in gradient
    units); `owner_residual` [numel / world] for sparse_all_reduce, what the owner of this
    rank's chunk did not send on of the chunk's sum. With momentum 0 every gradient entry is
    delivered exactly once, sooner or later (sum delivered + residuals = sum of inputs);
    momentum factor masking (u = 0 where sent) drops the momentum still pending on the entries
    just sent, as DGC does, so the delivered scale of an entry sent every step is (1 - m) g."""

    def __init__(self, numel: int, world: int, *, momentum: float = 0.0,
                 all_reduce: bool = False, device=None):
        if world < 1 or numel % world:
            raise ValueError(f"zero_ext.comm.TopkFeedback: numel {numel} must be a multiple of "
                             f"the world size {world} (the padded bucket)")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"zero_ext.comm.TopkFeedback: momentum must be in [0, 1), got "
                             f"{momentum}")
        self.numel, self.world, self.momentum_factor = numel, world, float(momentum)
        self.rank = rank()
        self.residual = torch.zeros(numel, dtype=torch.float32, device=device)
        self.momentum = torch.zeros_like(self.residual) if momentum > 0 else None
        self.owner_residual = torch.zeros(numel // world, dtype=torch.float32,
                                          device=device) if all_reduce else None
        # Compressed momentum (zero/compression.py): beta1, and what this rank delivered since
        # the last carry_momentum() as (state tensor it left, [rows, k] indices or None for
        # all of it, values); of its own chunk, beta1 x what it delivered, summed.
        self.carry = 0.0
        self._delivered: list[tuple[Tensor, Tensor | None, Tensor]] = []
        self._own_carry: Tensor | None = None
        self._product: Tensor | None = None  # a segment of beta1 x the own chunk
        self._own_sum: Tensor | None = None

    def own_sum_buffer(self) -> Tensor:
        """The fp32 buffer [numel / world] of one reduction's chunk sum. On CPU one buffer,
        kept from reduction to reduction (the reductions of a bucket never overlap): a new
        one of this size each time is new pages from the kernel as often as not (glibc trims
        the heap as two such buffers are freed together), zeroed and faulted in, which took
        one rank ~108 MB of page faults per step in bench_compression's top-k row. Elsewhere
        (CUDA's caching allocator reuses memory itself) a new one."""
        shape, device = (self.numel // self.world,), self.residual.device
        if device.type != "cpu":
            return torch.empty(shape, dtype=torch.float32, device=device)
        if self._own_sum is None:
            self._own_sum = torch.empty(shape, dtype=torch.float32)
        return self._own_sum

    def tensors(self) -> dict[str, Tensor]:
        """The live state tensors by name (for checkpoints; scaling them in place is seen)."""
        out = {"residual": self.residual}
        if self.momentum is not None:
            out["momentum"] = self.momentum
        if self.owner_residual is not None:
            out["owner_residual"] = self.owner_residual
        return out

    def load_tensors(self, tensors: dict[str, Tensor]) -> None:
        _load(self.tensors(), tensors, "TopkFeedback")

    def reset(self) -> None:
        for tensor in self.tensors().values():
            tensor.zero_()
        self._delivered.clear()
        if self._own_carry is not None:
            self._own_carry.zero_()

    def _note_delivery(self, target: Tensor, rows: Tensor | None, k: int,
                       values: Tensor) -> None:
        """Under compressed momentum, remembers what left `target` for good this reduction:
        the packed `rows` ([chunks, k] entries of `target` viewed [chunks, -1]), or with rows
        None all of `values` (the dense path)."""
        if not self.carry:
            return
        if rows is None:
            self._delivered.append((target, None, values.to(torch.float32, copy=True)))
        else:
            index, sent = _unpack(rows, k, values.dtype)
            self._delivered.append((target.view(rows.shape[0], -1), index, sent.float()))

    def _note_own_delivery(self, own: Tensor) -> None:
        """Under compressed momentum, beta1 of this rank's own chunk just delivered (fp32),
        added to the step's own carry: each product rounded, then summed, as the rows' carry
        is made, a segment at a time (no temporary of the chunk's size). The own chunk of the
        residual is empty at the step's end (every reduction takes all of it), so adding
        the sum there equals adding each product in turn."""
        if not self.carry:
            return
        if self._own_carry is None:
            self._own_carry = torch.zeros_like(own)
        if own.device.type != "cpu":
            # One product of the chunk's size (the same roundings): segments would cost two
            # kernel launches per 128K elements, hundreds per bucket.
            self._own_carry.add_(own * self.carry)
            return
        if self._product is None:
            self._product = torch.empty(min(own.numel(), 1 << 17), dtype=own.dtype,
                                        device=own.device)
        step = self._product.numel()
        for begin in range(0, own.numel(), step):
            segment = own[begin:begin + step]
            product = torch.mul(segment, self.carry, out=self._product[:segment.numel()])
            self._own_carry[begin:begin + step].add_(product)

    def carry_momentum(self) -> None:
        """The end of an optimizer step under compressed momentum: beta1 (`carry`) of all this
        rank delivered during the step goes back where it left from, to be sent again with the
        next gradients (each times 1 - beta1): summed over the ranks, what is pending plus
        what is delivered then follows 1-bit Adam's m = beta1 m + (1 - beta1) g. Once per
        step, not per reduction, so the micro-steps of one step build one momentum."""
        for target, index, values in self._delivered:
            if index is None:  # rounded as the sparse rows' carry (add_'s alpha may fuse)
                target.add_(values * self.carry)
            else:
                target.scatter_add_(1, index, values * self.carry)
        self._delivered.clear()
        if self._own_carry is not None:
            self.residual.view(self.world, -1)[self.rank].add_(self._own_carry)
            self._own_carry.zero_()

    def _scale(self, factor: float) -> None:
        if factor != 1.0:
            for tensor in self.tensors().values():
                tensor.mul_(factor)

    def flat_total(self) -> Tensor:
        """This rank's undelivered mass in the input's flat coordinates (fp32, numel): its
        residual, plus the owner residual at this rank's chunk."""
        total = self.residual.clone()
        if self.owner_residual is not None:
            total.view(self.world, -1)[self.rank] += self.owner_residual
        return total

    def flat_momentum(self) -> Tensor | None:
        """This rank's momentum (fp32, numel), resharded like flat_total."""
        return None if self.momentum is None else self.momentum.clone()

    def from_flat_total(self, total: Tensor, world: int, momentum: Tensor | None = None) -> None:
        """The inverse of summing flat_total() (and flat_momentum()) over the ranks: this
        rank's share total / world (every rank can carry any entry: its own chunk's share is
        delivered whole with its next reduction), the owner residual empty."""
        if world != self.world or total.numel() != self.numel:
            raise ValueError(f"zero_ext.comm.TopkFeedback.from_flat_total: expected "
                             f"{self.numel} elements for world {self.world}, got "
                             f"{total.numel()} for world {world}")
        self.reset()
        self.residual.copy_(total.view(-1) / world)
        if momentum is not None and self.momentum is not None:
            self.momentum.copy_(momentum.view(-1) / world)


def _topk_k(density: float, m: int) -> int:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"zero_ext.comm: top-k density must be in (0, 1], got {density}")
    return min(m, math.ceil(density * m))


_SAMPLE = 8192  # elements of a chunk sampled for the threshold of its top-k


def top_magnitudes(rows: Tensor, k: int) -> Tensor:
    """Indices [chunks, k] of the k largest |x| in each row of `rows` [chunks, m], in no
    particular order: torch.topk's set, found faster on large rows as Deep Gradient Compression
    does. A strided sample of the row gives a threshold a little below the k-th largest
    magnitude; the entries not below it (NaN included, so a non-finite gradient is still
    sent and seen by the overflow check) are the candidates, and the top-k of the candidates is
    the row's whenever there are at least k of them; else the row's own topk runs. On 6.35M
    elements at density 0.01 that is ~5x faster than torch.topk over the row on one core. On
    CPU only: elsewhere torch.topk of the rows, with no host synchronization."""
    chunks, m = rows.shape
    magnitudes = rows.abs()
    stride = m // _SAMPLE
    # Small rows, a large share of the row wanted, or off the CPU: topk over each row (on a GPU
    # one batched call; the candidates' nonzero() below would wait for the device per chunk).
    if stride < 2 or 4 * k > m or rows.device.type != "cpu":
        return magnitudes.topk(k, dim=1, sorted=False).indices
    sample = magnitudes[:, ::stride]
    # About twice the row's expected count above the threshold, so that sampling noise rarely
    # leaves fewer than k.
    rank_in_sample = min(sample.shape[1], 2 * math.ceil(k * sample.shape[1] / m) + 8)
    thresholds = sample.topk(rank_in_sample, dim=1).values[:, -1]
    out = torch.empty(chunks, k, dtype=torch.long, device=rows.device)
    for c in range(chunks):
        candidates = (~(magnitudes[c] < thresholds[c])).nonzero().squeeze(1)
        if candidates.numel() < k:
            out[c] = magnitudes[c].topk(k, sorted=False).indices
        else:
            out[c] = candidates[magnitudes[c][candidates].topk(k, sorted=False).indices]
    return out


def _pack(index: Tensor, values: Tensor) -> Tensor:
    """[rows, k] indices and values -> uint8 [rows, k * (4 + value bytes)]: int32 indices,
    then the values in their dtype."""
    return torch.cat([index.to(torch.int32).view(torch.uint8), values.view(torch.uint8)], dim=1)


def _unpack(rows: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    index = rows[:, :4 * k].contiguous().view(torch.int32).long()
    return index, rows[:, 4 * k:].contiguous().view(dtype)


def _select_with_feedback(residual: Tensor, grad: Tensor, chunks: int, k: int,
                          dtype: torch.dtype, momentum: Tensor | None = None,
                          momentum_factor: float = 0.0) -> Tensor:
    """v += the momentum-corrected gradient (u = m u + (1 - m) g, v += u; v += g without
    momentum), then the top-k of |v| per chunk, packed (_pack: ascending indices within the
    chunk, values rounded to `dtype`); those entries leave v (their rounding error stays) and
    the momentum (masking). On CPU one zero_ext.ops.topk_feedback_select call does it all in two
    passes over v (the torch ops below took ~9 ns per element on one core, more than the bf16
    reduction they replace); other devices take the torch path (there is no CUDA kernel yet)."""
    if residual.device.type == "cpu":
        return ops.topk_feedback_select(residual, grad, chunks, k, momentum=momentum,
                                        momentum_factor=momentum_factor, dtype=dtype)
    return _select_with_feedback_torch(residual, grad, chunks, k, dtype, momentum,
                                       momentum_factor)


def _select_with_feedback_torch(residual: Tensor, grad: Tensor, chunks: int, k: int,
                                dtype: torch.dtype, momentum: Tensor | None,
                                momentum_factor: float) -> Tensor:
    """_select_with_feedback in torch ops, for devices without the op's kernel: the same
    arithmetic and the same entries, but for which of several equal magnitudes at the k-th
    are sent (the op sends those of lowest index)."""
    g = grad.float()
    if momentum is None:
        residual.add_(g)
    else:
        momentum.mul_(momentum_factor).add_(g * (1.0 - momentum_factor))
        residual.add_(momentum)
    v = residual.view(chunks, -1)
    index = top_magnitudes(v, k).sort(dim=1).values
    values = v.gather(1, index).to(dtype)
    v.scatter_add_(1, index, -values.float())
    if momentum is not None:
        momentum.view(chunks, -1).scatter_(1, index, 0.0)
    return _pack(index, values)


def _dense(state: TopkFeedback, input: Tensor) -> Tensor:
    """Everything due, as `input`'s dtype (the dense path, when sparse would not be smaller):
    the gradient, the residual and the momentum still pending (m / (1 - m) u), which leave the
    state but for the rounding error."""
    ops.flatten_into_(state.residual, [input], [0], accumulate=True)  # no fp32 copy of input
    if state.momentum is not None:
        m = state.momentum_factor
        state.residual.add_(state.momentum, alpha=m / (1.0 - m))
        state.momentum.zero_()
    if state.owner_residual is not None:
        state.residual.view(state.world, -1)[state.rank] += state.owner_residual
        state.owner_residual.zero_()
    sent = state.residual.to(input.dtype, copy=True)  # fp32: not the residual itself
    state.residual.sub_(sent.float())
    return sent


def _sparse_pays(k: int, m: int, element_size: int) -> bool:
    return k * (4 + element_size) < m * element_size


def _check_state(api: str, state: TopkFeedback, numel: int, size: int, owner: bool) -> None:
    if state.numel != numel or state.world != size or (owner and state.owner_residual is None):
        has = "with" if state.owner_residual is not None else "without"
        raise ValueError(
            f"zero_ext.comm.{api}: the TopkFeedback holds {state.numel} elements over "
            f"{state.world} ranks, {has} an owner residual, but this call reduces {numel} over "
            f"{size}; make it with TopkFeedback(numel, world, momentum=..., all_reduce={owner}) "
            "for this bucket")


def _take_own_chunk(state: TopkFeedback, input: Tensor) -> Tensor:
    """This rank's own chunk, delivered whole (fp32): it never goes on the wire, so nothing is
    gained by holding any of it back. The chunk's residual and its momentum-corrected gradient
    (as _select_with_feedback adds it) leave the state; its momentum is masked as every entry
    sent is."""
    size, r = state.world, state.rank
    residual = state.residual.view(size, -1)[r]
    gradient = input.view(size, -1)[r]
    # The gradient is read into fp32 once, into the result's buffer: fp32 += a 16-bit tensor
    # (add_) would first copy it to a temporary fp32 tensor of its size.
    own = state.own_sum_buffer()
    own.copy_(gradient)
    if state.momentum is None:
        own.add_(residual)
    else:
        momentum = state.momentum.view(size, -1)[r]
        momentum.mul_(state.momentum_factor).add_(own, alpha=1.0 - state.momentum_factor)
        torch.add(residual, momentum, out=own)
        momentum.zero_()
    residual.zero_()
    return own


def _select_others(state: TopkFeedback, input: Tensor, k: int) -> Tensor:
    """_select_with_feedback on every chunk but this rank's own: packed rows [world, bytes]
    whose own row is zeros (the all-to-all hands it back to this rank unread)."""
    size, r = state.world, state.rank
    m = input.numel() // size
    rows = torch.zeros(size, k * (4 + input.element_size()), dtype=torch.uint8,
                       device=input.device)
    for first, last in ((0, r), (r + 1, size)):  # the chunks before and after its own
        if first < last:
            span = slice(first * m, last * m)
            momentum = None if state.momentum is None else state.momentum[span]
            rows[first:last] = _select_with_feedback(
                state.residual[span], input[span], last - first, k, input.dtype, momentum,
                state.momentum_factor)
    return rows


def _sparse_scatter_start(input: Tensor, state: TopkFeedback, density: float,
                          residual_factor: float, bucket: int | None):
    """The reduce-scatter half: selects and sends; returns (first handle, chunk_sum) where
    chunk_sum(), after the handle's wait, gives this rank's chunk of the sum (fp32): all of this
    rank's own, then what the others sent of it, in rank order."""
    size = world_size()
    m = input.numel() // size
    k = _topk_k(density, m)
    state._scale(residual_factor)
    own = _take_own_chunk(state, input)
    rows = _select_others(state, input, k)
    if state.owner_residual is None:  # sparse_all_reduce's deliveries are its owners'
        state._note_delivery(state.residual, rows, k, input)
        state._note_own_delivery(own)
    received = torch.empty_like(rows)
    first = all_to_all(received.view(-1), rows.view(-1), async_op=True, bucket=bucket)

    def chunk_sum(rows=rows) -> Tensor:
        # This rank's own chunk, then what the others sent in rank order, in fp32:
        # deterministic. The own chunk is the sum's buffer.
        total = own
        index, values = _unpack(received.view(size, -1), k, input.dtype)
        for sender in range(size):
            if sender != state.rank:
                total.index_add_(0, index[sender], values[sender].float())
        return total

    return first, chunk_sum


def sparse_reduce_scatter(output: Tensor, input: Tensor, *, state: TopkFeedback,
                          density: float, residual_factor: float = 1.0,
                          async_op: bool = False, bucket: int | None = None):
    """comm.reduce_scatter's result from top-k sparsified sends with error feedback and
    momentum correction (DGC): v += u (momentum-corrected gradient), each rank sends per
    destination chunk its k = ceil(density * chunk) largest |v| entries as (int32 index, value
    in input's dtype) rows in one all-to-all, and keeps the rest in v; its own chunk never goes
    on the wire, so all of it is delivered at once, in fp32. The receiver adds what arrived to
    its own chunk, in fp32, in rank order. When that would not be smaller than the dense chunk
    (a high warm-up density) the dense reduce-scatter runs on everything due, residual
    included. `residual_factor` scales the
    stored state first (the loss scale changed)."""
    size = world_size()
    _check_scatter("sparse_reduce_scatter", output, input, size)
    _check_state("sparse_reduce_scatter", state, input.numel(), size, owner=False)
    m = output.numel()
    if size == 1:
        reduce_scatter(output, input)
        return _complete(None, lambda: None, async_op)
    if not _sparse_pays(_topk_k(density, m), m, input.element_size()):
        state._scale(residual_factor)
        due = _dense(state, input)
        state._note_delivery(state.residual, None, 0, due)
        first = reduce_scatter(output, due, async_op=True, bucket=bucket)
        return _complete(first, lambda due=due: None, async_op)
    with counted_as("reduce_scatter"):
        first, chunk_sum = _sparse_scatter_start(input, state, density, residual_factor, bucket)
    return _complete(first, lambda: output.copy_(chunk_sum()), async_op)


def sparse_all_reduce(tensor: Tensor, *, state: TopkFeedback, density: float,
                      residual_factor: float = 1.0, async_op: bool = False,
                      bucket: int | None = None):
    """comm.all_reduce's result (in place) from top-k sends: the sparse reduce-scatter above
    (state.residual), then the owner of each chunk adds its owner residual to the chunk's sum,
    sends on its k largest entries (the rest stay in its owner residual) in one all-gather of
    fixed-size (index, value) rows, and every rank writes them into a zeroed `tensor`. Dense
    all-reduce of everything due when sparse would not be smaller."""
    size = world_size()
    if tensor.dim() != 1 or not tensor.is_contiguous() or not tensor.is_floating_point() \
            or tensor.numel() % size:
        raise ValueError(f"zero_ext.comm.sparse_all_reduce: expected a 1-D contiguous "
                         f"floating-point tensor whose numel is a multiple of the world size "
                         f"({size}); got {tuple(tensor.shape)} {tensor.dtype}")
    _check_state("sparse_all_reduce", state, tensor.numel(), size, owner=True)
    m = tensor.numel() // size
    k = _topk_k(density, m)
    if size == 1:
        return _complete(None, lambda: None, async_op)
    if not _sparse_pays(k, m, tensor.element_size()):
        state._scale(residual_factor)
        tensor.copy_(_dense(state, tensor))
        state._note_delivery(state.residual, None, 0, tensor)
        return _complete(all_reduce(tensor, async_op=True, bucket=bucket), lambda: None,
                         async_op)
    with counted_as("all_reduce"):
        first, chunk_sum = _sparse_scatter_start(tensor, state, density, residual_factor, bucket)

    def finish() -> None:
        row = _select_with_feedback(state.owner_residual, chunk_sum(), 1, k, tensor.dtype)
        state._note_delivery(state.owner_residual, row, k, tensor)
        gathered = torch.empty(size * row.numel(), dtype=torch.uint8, device=row.device)
        with counted_as("all_reduce"):
            all_gather(gathered, row.view(-1), bucket=bucket)
        indices, values = _unpack(gathered.view(size, -1), k, tensor.dtype)
        tensor.zero_()
        tensor.view(size, m).scatter_(1, indices, values)

    return _complete(first, finish, async_op)
