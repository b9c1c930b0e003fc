"""The single door to torch.distributed (callers write `from zero_ext import comm`).

collectives.py: process-group setup, the collectives (gloo, NCCL, the shared-memory arena) and
the traffic counters (by link class). compressed.py: quantized reduce-scatter and all-gather,
top-k reduce-scatter and all-reduce with error feedback, over those collectives. topology.py:
which node each rank is on, the groups within and across nodes, the hierarchical all-gather.
watch.py: sequence numbers and fingerprints of every collective, bounded waits, heartbeats;
watch_diagnosis.py: the stall report. pairs.py: gloo's all-to-all, all-gather and
reduce-scatter of a MiB or more per peer as sends and receives in segments, both directions at
once.
"""

from zero_ext.comm.collectives import (
    CollectiveTraffic,
    CommGroup,
    WatchedWork,
    all_gather,
    all_gather_object,
    all_reduce,
    all_to_all,
    backend,
    barrier,
    broadcast,
    counted_as,
    init_distributed,
    rank,
    reduce_scatter,
    traffic,
    wire_sends,
    world_size,
)
from zero_ext.comm.collectives import (
    _shared_memory_arena as _shared_memory_arena,
)
from zero_ext.comm.collectives import (
    _SharedMemoryArena as _SharedMemoryArena,
)
from zero_ext.comm.compressed import (
    QuantFeedback,
    TopkFeedback,
    quantized_all_gather,
    quantized_reduce_scatter,
    sparse_all_reduce,
    sparse_reduce_scatter,
    two_hop_groups,
)
from zero_ext.comm.topology import (
    Topology,
    TopologyError,
    current_topology,
    detect_topology,
    hierarchical_all_gather,
)
from zero_ext.comm.watch import (
    DEFAULT_STALL_TIMEOUT_S,
    CollectiveStallError,
    current_watch,
    set_stall_timeout,
    stall_timeout,
)

__all__ = [
    "DEFAULT_STALL_TIMEOUT_S",
    "CollectiveStallError",
    "CollectiveTraffic",
    "CommGroup",
    "QuantFeedback",
    "TopkFeedback",
    "Topology",
    "TopologyError",
    "WatchedWork",
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "backend",
    "barrier",
    "broadcast",
    "counted_as",
    "current_topology",
    "current_watch",
    "detect_topology",
    "hierarchical_all_gather",
    "init_distributed",
    "quantized_all_gather",
    "quantized_reduce_scatter",
    "rank",
    "reduce_scatter",
    "set_stall_timeout",
    "sparse_all_reduce",
    "sparse_reduce_scatter",
    "stall_timeout",
    "traffic",
    "two_hop_groups",
    "wire_sends",
    "world_size",
]
