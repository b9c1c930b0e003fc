"""State that every checkpoint carries besides the model and optimizer: objects registered with
``engine.register_checkpoint_state(name, obj)`` (zero_ext.ElasticSampler's data position, a
user's own counters). engine_state.py saves their ``state_dict()`` into engine_state.pt as plain
data (rank 0's: the objects hold the same state on every rank); loading.py checks the saved
states in its validation phase and applies them after the engine's counters, so an object can
anchor itself to the restored ``global_steps``.

A saved state whose object is not registered yet waits, and is applied when it is registered
(a sampler built after ``initialize`` resumed the job). An object registered but missing from
the checkpoint is an error: resuming it from its initial state would repeat data silently.
"""

from __future__ import annotations

from typing import Any, Protocol


class CheckpointState(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RegisteredStates:
    """The engine's registered objects, by name, and saved states waiting for their object."""

    def __init__(self):
        self._objects: dict[str, CheckpointState] = {}
        self._pending: dict[str, Any] = {}

    def register(self, name: str, obj: CheckpointState) -> None:
        caller = "engine.register_checkpoint_state"
        if not isinstance(name, str) or not name:
            raise TypeError(f"{caller}: name must be a non-empty str, got {name!r}")
        missing = [m for m in ("state_dict", "load_state_dict") if not callable(
            getattr(obj, m, None))]
        if missing:
            raise TypeError(f"{caller}: {type(obj).__qualname__} has no {' or '.join(missing)}"
                            f"(); a checkpointed object needs both")
        if name in self._objects and self._objects[name] is not obj:
            raise ValueError(f"{caller}: {name!r} is already registered (a "
                             f"{type(self._objects[name]).__qualname__}); pick another name")
        self._objects[name] = obj
        if name in self._pending:
            state = self._pending.pop(name)
            problem = _problem(obj, state)
            if problem is not None:
                raise ValueError(f"{caller}: the loaded checkpoint's {name!r} state does not "
                                 f"fit this object: {problem}")
            obj.load_state_dict(state)

    def names_of(self, kind: type) -> list[str]:
        """The names of the registered objects of class `kind`."""
        return [name for name, obj in self._objects.items() if isinstance(obj, kind)]

    def state(self) -> dict[str, Any]:
        """What a checkpoint saves: every registered object's state_dict()."""
        return {name: obj.state_dict() for name, obj in self._objects.items()}

    def problems(self, saved: dict[str, Any] | None, path: str) -> list[str]:
        """Why `saved` (a checkpoint's registered states; None: saved before they existed)
        cannot be applied; empty when it can."""
        saved = saved or {}
        found = []
        for name, obj in self._objects.items():
            if name not in saved:
                found.append(f"{path} has no {name!r} state, which this engine has registered "
                             f"(a {type(obj).__qualname__}); it was saved without it. Load it "
                             f"before registering {name!r}, or register under the name it "
                             f"was saved with ({sorted(saved) or 'none saved'})")
            else:
                problem = _problem(obj, saved[name])
                if problem is not None:
                    found.append(f"{path}: the {name!r} state does not fit: {problem}")
        return found

    def apply(self, saved: dict[str, Any] | None) -> None:
        """Loads `saved` (checked by problems()) into the registered objects; the rest wait."""
        saved = dict(saved or {})
        for name, obj in self._objects.items():
            obj.load_state_dict(saved.pop(name))
        self._pending = saved


def _problem(obj, state) -> str | None:
    check = getattr(obj, "state_problem", None)
    return check(state) if callable(check) else None
