"""gloo's all-to-all, all-gather and reduce-scatter as sends and receives in segments, both
directions at once.

Collectives of at least MIN_PAIRED_BYTES per peer. On a capped full-duplex link between two
nodes, gloo's all_to_all_single, its all-gather and a single large isend + irecv pair moved
6.43 MB each way in either 0.18 s (the link's 300 Mbit/s both ways) or 0.36 s (one direction
after the other), changing from call to call; its all-reduce, which sends segments, always
took 0.18 s. The same bytes as sends and receives of 256 KiB to 1 MiB, all posted at once,
took 0.18-0.23 s (benchmarks/gloo_duplex.py, benchmarks/RESULTS.md, "gloo's all-to-all uses
one direction at a time"). So on gloo:
  - all-to-all: chunk j to rank j, every segment of every peer posted at once (rank r starts
    with r + 1 and r - 1, so no rank is everyone's first peer);
  - all-gather: a ring, N - 1 steps each sending one chunk to rank + 1 while receiving one from
    rank - 1, in segments;
the same bytes on the same links as gloo's own algorithms (comm/collectives.py counts them);
  - reduce-scatter: the all-to-all's sends, then each rank sums the N chunks of its own part in
    rank order (fp32 for 16-bit dtypes, as the shared-memory arena sums). gloo has no
    reduce-scatter of its own: torch's is an all-reduce of the whole input, twice these bytes
    (n(N-1)/N per rank here, 2n(N-1)/N there). 2 ranks, 300 Mbit/s, a 12.9 MB fp32 input:
    see benchmarks/RESULTS.md.

Tags. gloo matches a send to a receive by (peer, tag), in the order posted. Each collective
here takes the next tag of its group's counter (every rank of a group issues its collectives
in the same order, which collectives need anyway), so two in flight at once (stage 3's
prefetch) never take each other's messages. The counters belong to the group's stall watch:
a new process group starts them again on every rank. The tag also carries a hash of the
collective's size and dtype: ranks that meet in collectives of different sizes wait, and the
watch names both, where gloo would abort the process (tests/test_stall.py).

The wait. The stall watch (comm/watch.py) waits in short slices, so that it can diagnose a
stall and read the other ranks' aborts while it waits. A gloo send or receive cannot be waited
that way: when its wait(timeout) expires, gloo closes the pair ("Application timeout caused
pair closure") and every later message on it fails. So a thread runs the exchange and waits
without a timeout (bounded by the process group's own timeout), and the watch waits in slices
for that thread: `PairedWork` is a Work whose wait(timeout) says "timed out" like gloo's
collectives' handles do, and leaves the transfers alone.
"""

from __future__ import annotations

import threading
import weakref
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

from zero_ext import ops

# 300 Mbit/s, 6.43 MB each way, 10 calls: 256 KiB 0.181-0.220 s, 512 KiB 0.181-0.199, 1 MiB
# 0.182-0.230, 4 MiB 0.230-0.298; fewer segments, fewer messages for gloo's event loop.
SEGMENT_BYTES = 512 << 10
# Below this per peer, gloo's own collectives: sending one direction after the other costs
# them at most 8 ms at 1 Gbit/s, and gloo's point-to-point messages cost more in latency (on
# 2 ranks of a busy 2-core host, 8 KiB each way: a median of 1.6-3.9 ms against 0.2 ms for
# its all_to_all_single).
MIN_PAIRED_BYTES = 1 << 20


def worth_pairing(peer_bytes: int) -> bool:
    """Whether a collective that sends `peer_bytes` to each peer (all-to-all and
    reduce-scatter: a chunk of the input; all-gather's ring: this rank's input) runs here
    rather than as gloo's own."""
    return peer_bytes >= MIN_PAIRED_BYTES


# Above a user's point-to-point tags (0 by default); gloo's collectives use their own slots.
_TAG_BASE = 1 << 30
_tags: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # watch -> {group: count}


def next_tag(watch, group_ranks: tuple[int, ...] | None, what: str) -> int:
    """The tag of this rank's next paired collective on the group of `group_ranks` (None:
    every rank), counted per group under `watch`, the current process group's stall watch:
    the count's low 16 bits, and above them 14 bits of a hash of `what` (the collective's
    size and dtype). Ranks that meet in collectives of different sizes then post different
    tags and wait, and the watch names the mismatch; with equal tags gloo would meet a message
    longer than the buffer posted for it and abort the process."""
    counts = _tags.setdefault(watch, {})
    count = counts.get(group_ranks, 0)
    counts[group_ranks] = count + 1
    return _TAG_BASE + ((zlib.crc32(what.encode()) & 0x3FFF) << 16) + (count & 0xFFFF)


class PairedWork:
    """An exchange run by a daemon thread that waits for its transfers without a timeout.

    wait(timeout) returns True once it completed, raises its first error, or raises
    RuntimeError("... timed out ...") when `timeout` passed first (the transfers go on). A
    thread per collective: a stalled exchange never holds up the next one, and a thread start
    (~0.1 ms) is small against a transfer over the network."""

    __slots__ = ("_done", "_error", "_thread")

    def __init__(self, exchange):
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(exchange,),
                                        name="zero_ext-pairs", daemon=True)
        self._thread.start()

    def _run(self, exchange) -> None:
        try:
            exchange()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            self._error = error
        finally:
            self._done.set()

    def wait(self, timeout: timedelta | None = None) -> bool:
        seconds = None if timeout is None else timeout.total_seconds()
        if not self._done.wait(seconds):
            raise RuntimeError(f"zero_ext paired exchange: wait timed out after {seconds} s "
                               "(its transfers go on)")
        # Gone before the caller goes on: a script that ends right after its last collective
        # leaves no thread to meet the interpreter's finalization.
        self._thread.join()
        if self._error is not None:
            # Not read as a slice of the wait (the watch retries those): gloo's own "timed
            # out" here is the process group's timeout, a failure.
            text = str(self._error).replace("timed out", "expired")
            raise RuntimeError(f"zero_ext paired exchange failed: {text}") from self._error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()


def _post(works: list, send: torch.Tensor, to: int, recv: torch.Tensor, source: int, group,
          tag: int) -> None:
    """Posts `send` to `to` and `recv` from `source` (group ranks; the two of one size),
    segment by segment, alternating, onto `works`."""
    step = max(1, SEGMENT_BYTES // send.element_size())
    for out, back in zip(send.split(step), recv.split(step)):
        if out.numel():
            works.append(dist.isend(out, group=group, group_dst=to, tag=tag))
            works.append(dist.irecv(back, group=group, group_src=source, tag=tag))


def _wait_all(works: list) -> None:
    for work in works:
        work.wait()


def paired_all_to_all(output: torch.Tensor, input: torch.Tensor, me: int, size: int, group,
                      tag: int) -> PairedWork:
    """Chunk j of `input` to rank j of `group` (a process group handle, None: the default one;
    `me`: this rank's index in it), chunk i of `output` from rank i; this rank's own chunk is
    copied. Both 1-D, contiguous, of the same dtype and numel, divisible by `size`."""
    send, recv = input.view(size, -1), output.view(size, -1)

    def exchange():
        works = []
        for step in range(1, size):
            to, source = (me + step) % size, (me - step) % size
            _post(works, send[to], to, recv[source], source, group, tag)
        recv[me].copy_(send[me])
        _wait_all(works)

    return PairedWork(exchange)


def paired_all_gather(output: torch.Tensor, input: torch.Tensor, me: int, size: int, group,
                      tag: int) -> PairedWork:
    """Every rank's `input` into `output` (contiguous, `size` x input's numel, rank order) by a
    ring: at step s this rank sends chunk me - s to rank me + 1 and receives chunk me - s - 1
    from rank me - 1."""
    out = output.view(size, -1)
    right, left = (me + 1) % size, (me - 1) % size

    def exchange():
        out[me].copy_(input.reshape(-1))
        for step in range(size - 1):
            works = []
            _post(works, out[(me - step) % size], right, out[(me - step - 1) % size], left,
                  group, tag)
            _wait_all(works)

    return PairedWork(exchange)


def _add(total: torch.Tensor, part: torch.Tensor, first: bool) -> None:
    """total = part (first) or total + part, in total's dtype. fp32 += a 16-bit part reads it
    as fp32 in place (add_ would first copy it to a new fp32 tensor of its size)."""
    if first:
        total.copy_(part)
    elif part.dtype == total.dtype:
        total.add_(part)
    else:
        ops.flatten_into_(total, [part], [0], accumulate=True)


def paired_reduce_scatter(output: torch.Tensor, input: torch.Tensor, me: int, size: int, group,
                          tag: int) -> PairedWork:
    """The sum over ranks of chunk `me` of `input` (1-D, contiguous, `size` chunks) into
    `output` (its numel): chunk j goes to rank j as in paired_all_to_all, and the chunks that
    arrive are summed in rank order as they do, in fp32 for 16-bit dtypes (fp64 for fp64, the
    dtype itself for integers), so every rank's result is the same function of the inputs."""
    send = input.view(size, -1)
    wide = input.dtype
    if input.is_floating_point():
        wide = torch.float64 if input.dtype == torch.float64 else torch.float32
    # The sum runs in the output itself where it has the summing dtype and layout and is not
    # part of the input (a shard of the bucket it reduces: its own chunk is read last but one).
    start, end = input.data_ptr(), input.data_ptr() + input.numel() * input.element_size()
    at = output.data_ptr()
    apart = at >= end or at + output.numel() * output.element_size() <= start
    in_place = output.dtype == wide and output.is_contiguous() and apart

    def exchange():
        received = torch.empty((size - 1, send.shape[1]), dtype=input.dtype)
        works = {}
        for step in range(1, size):  # received[step - 1] comes from rank me - step
            to, source = (me + step) % size, (me - step) % size
            works[source] = []
            _post(works[source], send[to], to, received[step - 1], source, group, tag)

        def part(source: int) -> torch.Tensor:
            return send[me] if source == me else received[(me - source) % size - 1]

        if in_place:  # summed as the chunks arrive
            total = output.view(-1)
            for source in range(size):
                if source != me:
                    _wait_all(works[source])
                _add(total, part(source), first=source == 0)
        else:  # summed segment by segment in a small fp32 buffer, rounded once into output
            for source_works in works.values():
                _wait_all(source_works)
            out, step = output.view(-1), max(1, SEGMENT_BYTES // 4)
            buffer = torch.empty(min(step, out.numel()), dtype=wide)
            for begin in range(0, out.numel(), step):
                total = buffer[:min(step, out.numel() - begin)]
                for source in range(size):
                    _add(total, part(source)[begin:begin + total.numel()], first=source == 0)
                out[begin:begin + total.numel()].copy_(total)

    return PairedWork(exchange)
