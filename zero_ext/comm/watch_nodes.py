"""Which node each rank runs on, for the stall watch's reports (comm/watch.py).

Every heartbeat carries its rank's hostname; the watch learns the others' from them a few per
period while the store answers, so that a report can still name the nodes when it no longer
does: "rank(s) 2, 3 on node1 stopped responding", or, on a node cut off from torchrun's store on
node 0, "node0 is unreachable from node1: ... rank(s) 0, 1 on node0 stopped answering".
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

from zero_ext.comm.watch_store import WatchStore

__all__ = ["RankHosts"]

_HOSTS_PER_BEAT = 8  # other ranks' hostnames learnt per heartbeat, until all are known


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


class RankHosts:
    """rank -> hostname for one process group, and the sentences that name them."""

    def __init__(self, rank: int, size: int, store: WatchStore, key: Callable[[int], str]):
        self.rank, self.size, self.store = rank, size, store
        self._key = key                 # rank -> its heartbeat's store key
        self.host = socket.gethostname()
        self.hosts = {rank: self.host}
        self._store_ranks: list[int] | None = None  # the ranks on the store's host, once known

    def complete(self) -> bool:
        return len(self.hosts) == self.size

    def learn(self, r: int, host: str) -> None:
        self.hosts.setdefault(r, host)

    def learn_some(self) -> None:
        """A few more ranks' hostnames from their heartbeats (store calls: may raise)."""
        for r in [r for r in range(self.size) if r not in self.hosts][:_HOSTS_PER_BEAT]:
            if self.store.check([self._key(r)]):
                self.learn(r, json.loads(self.store.get(self._key(r)))["host"])

    def on_hosts(self, ranks: list[int]) -> str:
        """"rank(s) 2, 3 on node1", grouped by host."""
        by_host: dict[str, list[int]] = {}
        for r in ranks:
            by_host.setdefault(self.hosts.get(r, "an unknown host"), []).append(r)
        return "; ".join(f"rank(s) {_ranks(rs)} on {host}" for host, rs in by_host.items())

    def store_host_ranks(self) -> list[int]:
        """The ranks on the node that hosts the store (torchrun's: node 0), as far as known;
        else every rank known to be on another node than this one."""
        host = self.store.host
        if self._store_ranks is None and self.complete() and host:
            try:
                address = socket.gethostbyname(host)
                addresses = {h: socket.gethostbyname(h) for h in set(self.hosts.values())}
            except OSError:
                address, addresses = None, {}
            self._store_ranks = [r for r, h in sorted(self.hosts.items())
                                 if h == host or addresses.get(h) == address]
        return self._store_ranks or [r for r, h in sorted(self.hosts.items()) if h != self.host]

    def unreachable_report(self, doing: str, timeout: float, fix: str) -> str:
        """This node cannot reach the store: the node hosting it (its ranks named) is cut off,
        frozen or dead, or this node lost the network. `doing`: what this rank was doing."""
        store = self.store
        node = store.host or "its host"
        ranks = self.store_host_ranks()
        error = store.last_error
        cause = f"; {type(error).__name__}: {error}" if error is not None else ""
        culprits = (f"{self.on_hosts(ranks)} stopped answering" if ranks else
                    f"the ranks on {node} stopped answering")
        return (f"zero_ext: {node} is unreachable from {self.host}: rank {self.rank} {doing}, "
                f"and the process group's store on {node} ({store.address or 'not TCP'}) has "
                f"not answered for {store.unreachable_for():.1f} s{cause}. {culprits}, or "
                f"{self.host} lost the network (stall_timeout_s={timeout:g}).\n"
                f"Likely cause: {fix}.")
