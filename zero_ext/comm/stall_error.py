"""CollectiveStallError, apart from the watch that raises it, so that the store and diagnosis
modules below the watch can let it through their own error handling: the watch's signal handlers
(comm/watch.py's _on_terminate and _on_interrupt) raise it in the main thread wherever that
thread is, including inside the `except RuntimeError` of a store call's retry, which must not
swallow it."""

from __future__ import annotations


class CollectiveStallError(RuntimeError):
    """A collective did not complete within the stall timeout, or ranks issued different
    collectives; the message is the same report on every rank."""

    def __reduce__(self):
        return (type(self), self.args)
