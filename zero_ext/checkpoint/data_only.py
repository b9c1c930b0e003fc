"""engine_state.pt: the checkpoint's one torch-serialized file, restricted to plain data.

Written by save_checkpoint (rank 0) and read by load_checkpoint (every rank). It holds what
has no fixed tensor layout: the optimizer's hyperparameters, the LR scheduler's state, a
stage-0 torch optimizer's state and the user's `client_state`. A pickle can name any callable
to run when it is read, and whoever can write a checkpoint can write its manifest too, so the
checksums do not help: the file is read with `torch.load(weights_only=True)`, whose unpickler
builds only containers, numbers, strings and tensors and refuses everything else.

So that no checkpoint is written that cannot be read back, the same rule is checked at save
time, before anything is written, with an error that names the offending value's place
(`client_state['sampler']`) and its type. DeepSpeed accepts any picklable client_state (and
runs whatever it holds when loading); zero_ext accepts the types listed in ALLOWED_TYPES.
"""

from __future__ import annotations

import collections
import io
import pickle

import torch

__all__ = ["ALLOWED_TYPES", "check_data_only", "dumps", "first_disallowed",
           "first_unwritable", "loads"]

# Exactly the types torch's weights_only unpickler rebuilds by itself (tests/
# test_checkpoint_safety.py round-trips each); subclasses are refused (a NamedTuple, an
# IntEnum, a numpy scalar pickle as their class).
ALLOWED_TYPES: tuple[type, ...] = (
    type(None), bool, int, float, complex, str, bytes, bytearray,
    dict, collections.OrderedDict, list, tuple, set,
    torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device,
)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set)
_ALLOWED_TEXT = ("None, bool, int, float, complex, str, bytes, and dict / OrderedDict / list / "
                 "tuple / set of them, torch tensors, torch.Size, torch.dtype, torch.device")


def _hint(value) -> str:
    module = type(value).__module__
    if module == "numpy":
        return "; convert numpy values with .tolist() or torch.from_numpy()"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return "; store a NamedTuple as value._asdict()"
    if isinstance(value, collections.defaultdict):
        return "; store it as dict(value)"
    return "; store its state as plain data (e.g. its state_dict()) and rebuild it after loading"


def _walk(value, where: str):
    """(place, item) of `value` and of everything inside its allowed containers, in order
    (iteratively: no recursion limit; a container met twice is entered once)."""
    stack = [(where, value)]
    seen: set[int] = set()
    while stack:
        place, item = stack.pop()
        yield place, item
        kind = type(item)
        if kind not in _CONTAINERS or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                stack.append((f"{place}[{key!r}]", sub))
                stack.append((f"{place} (the key {key!r})", key))
        else:
            ordered = list(item)
            stack.extend((f"{place}[{i}]" if kind is not set else f"{place} (a member)", sub)
                         for i, sub in reversed(list(enumerate(ordered))))


def first_disallowed(value, where: str) -> tuple[str, object] | None:
    """(place, value) of the first value in `value` that is not plain data, or None."""
    return next(((place, item) for place, item in _walk(value, where)
                 if type(item) not in ALLOWED_TYPES), None)


def first_unwritable(value, where: str) -> tuple[str, torch.Tensor, str] | None:
    """(place, tensor, torch.save's error) of the first tensor in `value` that torch.save
    cannot write (a mkldnn tensor has no storage to write), or None. Each tensor is tried
    alone: called once a save of the whole has failed."""
    for place, item in _walk(value, where):
        if isinstance(item, torch.Tensor):
            try:
                dumps(item)
            except Exception as error:  # noqa: BLE001 - any failure names the tensor
                return place, item, f"{type(error).__name__}: {error}"
    return None


def check_data_only(value, where: str, caller: str) -> None:
    """Raises TypeError naming the first value under `where` that a data-only load would refuse
    (and that a pickle would otherwise run code to rebuild)."""
    found = first_disallowed(value, where)
    if found is None:
        return
    place, item = found
    name = f"{type(item).__module__}.{type(item).__qualname__}"
    raise TypeError(
        f"{caller}: {place} is a {name}, which a checkpoint cannot hold: checkpoints are read "
        f"back as data only, never by running code they name. Allowed: {_ALLOWED_TEXT}"
        f"{_hint(item)}. Nothing was written")


def dumps(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def loads(data: bytes, what: str):
    """`data` unpickled as plain data only (torch's weights_only unpickler): a value that names
    a callable to run is refused with an error, the callable never runs."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, TypeError,
            ValueError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[0] if lines else repr(error)
        for line in lines:  # torch names what it refused on a line of its own
            if "unsupported" in line.lower() and "default value" not in line:
                detail = line
                break
        raise ValueError(f"{what} holds something other than plain data ({detail}); zero_ext "
                         f"reads checkpoints as data only and never runs code from them. It was "
                         f"not written by zero_ext's save_checkpoint, or was altered") from None
