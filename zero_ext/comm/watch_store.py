"""The stall watch's access to the process group's store, every call bounded in time.

comm/watch.py publishes heartbeats and reads other ranks' through this. torchrun's TCPStore
lives on one node (node 0's agent); when the link to it goes down without a reset, a call on
the process group's own client blocks for the group's timeout (30 minutes). So for a TCPStore
the watch opens its own client connection with a short operation timeout: a cut-off node's
calls fail within seconds, the failure is remembered (since when, the error) so the watch can
say "node0 cannot be reached" at once, and the next call connects afresh, so a brief hiccup
heals. Other stores (the test harness's FileStore) are local and used as they are.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from zero_ext.comm.stall_error import CollectiveStallError

__all__ = ["STORE_ERRORS", "WatchStore"]

# What a store call raises when the store is gone or slow (DistStoreError and DistNetworkError
# are RuntimeErrors), or a payload cannot be read.
STORE_ERRORS = (RuntimeError, ValueError, OSError)


def _tcp_store(store) -> dist.TCPStore | None:
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store if isinstance(store, dist.TCPStore) else None


class WatchStore:
    """set / get / check / compare_set of the process group's store, each bounded by
    `timeout_s` (a TCPStore: through this object's own connection). Thread-safe: the heartbeat
    thread and the main thread's diagnosis share it."""

    def __init__(self, store, timeout_s: float):
        tcp = _tcp_store(store)
        self.address = f"{tcp.host}:{tcp.port}" if tcp is not None else None
        self.host = tcp.host if tcp is not None else None
        self._port = tcp.port if tcp is not None else None
        self._timeout_s = timeout_s
        self._client = store if tcp is None else None
        self.failing_since: float | None = None  # time.monotonic() of the first failed call
        self.last_error: Exception | None = None
        # Calls under way, by thread: when each started. A call on a cut link can take several
        # times the timeout to fail (measured ~8 s at 1-2 s); one longer than the timeout
        # already says the store does not answer.
        self._calls: dict[int, float] = {}

    def _connected(self):
        client = self._client
        if client is None:
            client = self._client = dist.TCPStore(self.host, self._port, is_master=False,
                                                  wait_for_workers=False,
                                                  timeout=timedelta(seconds=self._timeout_s))
        return client

    def _call(self, name: str, *args):
        thread = threading.get_ident()
        self._calls[thread] = time.monotonic()
        try:
            result = getattr(self._connected(), name)(*args)
        except CollectiveStallError:  # a signal handler's, not the store's: it says nothing
            raise                     # of the store (see comm/stall_error.py)
        except STORE_ERRORS as error:
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            self.last_error = error
            if self.address is not None:
                self._client = None  # a timed-out connection stays broken: connect afresh
            raise
        finally:
            self._calls.pop(thread, None)
        self.failing_since = None
        return result

    def unreachable_for(self) -> float:
        """Seconds the store has not answered: since the first of the calls that failed in a
        row, or since the start of a call still under way after more than the timeout; 0 when
        the last call worked and none is overdue."""
        now = time.monotonic()
        starts = [s for s in list(self._calls.values()) if now - s > self._timeout_s]
        if self.failing_since is not None:
            starts.append(self.failing_since)
        return now - min(starts) if starts else 0.0

    def set(self, key: str, value: str) -> None:
        self._call("set", key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)

    def compare_set(self, key: str, expected: str, desired: str) -> bytes:
        return self._call("compare_set", key, expected, desired)
