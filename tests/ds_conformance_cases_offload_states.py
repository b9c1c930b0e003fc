"""Ported cases: engine.offload_states() / reload_states(), which RLHF frameworks call to free the
training engine's accelerator memory while a colocated inference engine generates.

From DeepSpeed's tests/unit/runtime/zero/test_offload_states.py (TestOffloadStatesZero12,
TestOffloadStatesZero3: each state alone, then all of them, after a step; the gradients between
a backward and its step). There, after offload_states the named states are on the CPU and the
device's allocated memory has dropped, and after reload_states they are back with the values
they had. Without a GPU the device memory is host memory too, so here a move is seen by
identity: every tensor of a named state is on new storage (pinned where CUDA is), the engine
holds no reference left to the old one (it was freed), and memory_by_location() moves the bytes
from "device" to "host". Each case also trains a twin engine that never offloads, through the
same steps, and requires the same losses and, bit for bit, the same weights and moments after
it; and it checks what is refused while the states are away, and that a forward runs meanwhile
unless lp_params were moved.
"""

from __future__ import annotations

import time
import warnings

import torch

import zero_ext
from zero_ext.utils import safe_get_full_optimizer_state

from ds_conformance_cases import (
    SimpleModel,
    batch,
    build_engine,
    case,
    expect_zero_ext_error,
    full_params,
    rank,
)

OFFLOAD = "test_offload_states.py::"
KINDS = ("optim_states", "hp_params", "lp_params", "lp_grads", "contiguous_grad_buffer")
GAS = 2


def _config(stage: int, dtype: str, **zero) -> dict:
    """Adam with weight decay in two accumulated micro-steps; small buckets (several per
    model), and at stage 3 every parameter partitioned."""
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": GAS,
              "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.1}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 60,
                                    "stage3_param_persistence_threshold": 0, **zero}}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def _state_tensors(engine, kind: str) -> list[torch.Tensor]:
    """What DeepSpeed's test checks the device of, as this engine holds it: the sharded
    AdamW's moments and fp32 masters (those apart from the model's weights), the model's
    parameters with stage 3's shards, the gradients a window holds."""
    replicated = engine.replicated_optimizer
    shards = [] if replicated is not None else engine.optimizer.shards
    if engine.offload is not None:  # offload_optimizer's host-stepped shards stay on the host
        shards = [s for s in shards if all(s is not h for h in engine.offload.shards)]
    if kind == "optim_states" and replicated is not None:
        return [t for state in replicated.state.values() for t in state.values()]
    if kind == "optim_states":
        return [t for s in shards for t in (s.exp_avg, s.exp_avg_sq)]
    if kind == "hp_params":
        return [s.master for s in shards if s.weights_16bit is not None]
    if kind == "lp_params":
        params = [p for p in engine.module.parameters() if p.numel() > 0]
        units = engine.partitioned.units if engine.partitioned is not None else []
        return params + [shard for unit in units for shard in unit.shards]
    buckets = engine.grad_buckets.buckets
    if kind == "lp_grads":
        return [t for b in buckets for t in (b.grad, b.accumulated, b.window,
                                             *(p.grad for p in b.params)) if t is not None]
    return [b.flat for b in buckets if b.flat is not None]


def _storages(tensors: list[torch.Tensor]) -> dict[int, torch.UntypedStorage]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}


def _uses(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


def _released(storage: torch.UntypedStorage, seconds: float = 5.0) -> bool:
    """Whether the caller's handle is all that is left of `storage`: at once, or once gloo's
    worker thread lets go of the last collective on it (it drops a finished collective's
    tensors just after wait() returned, on its own time)."""
    deadline = time.monotonic() + seconds
    while _uses(storage) > 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _optimizer_state(engine) -> dict:
    """Collective: every parameter's moments, whole (stage 0's torch optimizer: its state)."""
    if engine.replicated_optimizer is not None:
        return {(n, key): value.clone() for n, p in engine.module.named_parameters()
                for key, value in engine.replicated_optimizer.state[p].items()}
    return {(n, key): safe_get_full_optimizer_state(p, key).clone()
            for n, p in engine.module.named_parameters() if p.requires_grad
            for key in ("exp_avg", "exp_avg_sq")}


def _round_trip(engine, twin, include, *, dtype: torch.dtype, pin_memory: bool,
                non_blocking: bool, via_optimizer: bool) -> None:
    """Offloads `include`, checks the move and what is refused, runs a forward on both
    engines when allowed, reloads and checks that the values came back."""
    kinds = KINDS if include is None else include
    # A CPU step offload_optimizer left running behind the last step still writes the weights
    # and moments: the values to compare with are those after it (offload_states waits for it
    # first too).
    engine._settle_step()
    held = {kind: _state_tensors(engine, kind) for kind in kinds}
    values = {kind: [t.detach().clone() for t in tensors] for kind, tensors in held.items()}
    old = {kind: _storages(tensors) for kind, tensors in held.items()}
    for kind in kinds:  # the handles just taken add one use to each storage
        assert all(_uses(s) > 1 for s in old[kind].values()), kind
    before = engine.memory_by_location()
    mover = engine.optimizer if via_optimizer else engine
    mover.offload_states(include=include, pin_memory=pin_memory, non_blocking=non_blocking)
    mover.offload_states(include=include)  # a second call moves nothing more (DeepSpeed's too)
    moved = 0
    for kind in kinds:
        new = _storages(held[kind])
        assert not set(new) & set(old[kind]), f"{kind}: still on its old storage"
        for storage in old[kind].values():
            # Only the handle taken above is left: the engine let go of it (freed).
            assert _released(storage), f"{kind}: the engine still holds its device storage"
            moved += storage.nbytes()
        pinned = pin_memory and torch.cuda.is_available()
        for tensor, value in zip(held[kind], values[kind]):
            assert tensor.device.type == "cpu" and tensor.is_pinned() == pinned, kind
            assert torch.equal(tensor, value), f"{kind}: offloaded values changed"
    after = engine.memory_by_location()
    assert before["device"] - after["device"] == moved == after["host"] - before["host"], (
        before, after, moved)

    expect_zero_ext_error(engine.step, "engine.step() while", "reload_states()")
    expect_zero_ext_error(lambda: engine.backward(torch.zeros((), requires_grad=True)),
                          "engine.backward() while")
    x, y = batch(9, 0, rank(), 2, dtype)
    expect_zero_ext_error(engine.full_state_dict, "reload_states()")
    with torch.no_grad():  # generation's forward: both engines, to keep them alike
        if "lp_params" in kinds:
            expect_zero_ext_error(lambda: engine(x, y), "a forward while", "lp_params")
        else:
            assert torch.equal(engine(x, y), twin(x, y))

    (engine.optimizer if via_optimizer else engine).reload_states(non_blocking=non_blocking)
    engine.reload_states()  # nothing left to reload
    assert engine.memory_by_location() == before
    for kind in kinds:
        for tensor, value in zip(held[kind], values[kind]):
            assert tensor.device == engine.device and not tensor.is_pinned(), kind
            assert torch.equal(tensor, value), f"{kind}: reloaded values differ"


def offload_round_trip(scratch: str, *, stage: int, include=None, dtype: str = "bf16",
                       at: tuple[int, int] = (1, GAS - 1), before_step: bool = False,
                       pin_memory: bool = True, non_blocking: bool = False,
                       via_optimizer: bool = False, sgd: bool = False, **zero) -> None:
    """Two engines built alike train three steps of GAS micro-steps; one offloads and reloads
    after micro-step `at` (its step() done, or with `before_step` between its backward and its
    step). Then both must be the same, bit for bit. `sgd`: stage 0 runs a torch SGD with
    momentum given to initialize."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    config = _config(stage, dtype, **zero)

    def build():
        if not sgd:
            return build_engine(config, seed=3, factory=lambda: SimpleModel(nlayers=3))
        torch.manual_seed(3)
        model = SimpleModel(nlayers=3)
        return zero_ext.initialize(
            model=model, config={k: v for k, v in config.items() if k != "optimizer"},
            optimizer=torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9))[0]

    engine, twin = build(), build()
    losses = ([], [])
    for step in range(3):
        for micro in range(GAS):
            for e, seen in zip((engine, twin), losses):
                loss = e(*batch(step, micro, rank(), 2, torch_dtype))
                e.backward(loss)
                seen.append(loss.float().item())
            for stepping in (False, True):
                if stepping:
                    engine.step()
                    twin.step()
                if (step, micro) == at and stepping != before_step:
                    _round_trip(engine, twin, include, dtype=torch_dtype,
                                pin_memory=pin_memory, non_blocking=non_blocking,
                                via_optimizer=via_optimizer)
    assert losses[0] == losses[1], losses
    for got, want in ((full_params(engine), full_params(twin)),
                      (_optimizer_state(engine), _optimizer_state(twin))):
        for key, value in want.items():
            assert torch.equal(got[key], value), key


# DeepSpeed's TestOffloadStatesZero12 (bf16): each state alone after a step, the gradients
# between the boundary backward and its step; pinned and blocking, then the other way round.
for _stage in (1, 2):
    for _state in ("optim_states", "lp_grads", "hp_params", "lp_params", None):
        case(f"{OFFLOAD}TestOffloadStatesZero12[{_state}-stage{_stage}]", stage=_stage,
             include=None if _state is None else [_state],
             before_step=_state == "lp_grads")(offload_round_trip)
    case(f"{OFFLOAD}TestOffloadStatesZero12[None-unpinned-non_blocking-stage{_stage}]",
         stage=_stage, pin_memory=False, non_blocking=True)(offload_round_trip)

# DeepSpeed's TestOffloadStatesZero3 (bf16, built under zero_ext.Init); lp_grads also between
# a backward and its step, where a window's gradients are live.
for _state in ("hp_params", "lp_params", "optim_states", "lp_grads", "contiguous_grad_buffer",
               None):
    case(f"{OFFLOAD}TestOffloadStatesZero3[{_state}]", stage=3,
         include=None if _state is None else [_state])(offload_round_trip)
case(f"{OFFLOAD}TestOffloadStatesZero3[lp_grads-before_step]", stage=3, include=["lp_grads"],
     before_step=True)(offload_round_trip)

# zero_ext's own: fp32 (the masters are the model's weights) at every stage, stage 0 (with
# zero_ext's AdamW, and with a torch optimizer it runs as given), the middle of an accumulation
# window (gradients summing), offload_optimizer (its host state stays, a deferred CPU step is
# waited for), and OpenRLHF's call on engine.optimizer with its states.
for _stage in (0, 1, 2, 3):
    case(f"{OFFLOAD}zero_ext[fp32-stage{_stage}]", stage=_stage, dtype="fp32")(
        offload_round_trip)
case(f"{OFFLOAD}zero_ext[bf16-stage0]", stage=0)(offload_round_trip)
case(f"{OFFLOAD}zero_ext[torch_sgd-stage0]", stage=0, sgd=True)(offload_round_trip)
for _stage in (1, 2, 3):
    case(f"{OFFLOAD}zero_ext[mid_window-stage{_stage}]", stage=_stage, at=(1, 0))(
        offload_round_trip)
for _stage in (2, 3):
    case(f"{OFFLOAD}zero_ext[offload_optimizer-stage{_stage}]", stage=_stage,
         offload_optimizer={"device": "cpu"})(offload_round_trip)
case(f"{OFFLOAD}zero_ext[openrlhf-engine.optimizer-stage3]", stage=3, via_optimizer=True,
     include=["optim_states", "contiguous_grad_buffer", "hp_params", "lp_grads"])(
    offload_round_trip)


@case(f"{OFFLOAD}zero_ext[refused]")
def offload_refusals(scratch: str) -> None:
    """What DeepSpeed refuses (offload_param, NVMe) and what would pass unseen (a state name
    that does not exist, which DeepSpeed's membership test ignores); device 'none' warns and
    moves nothing, as in DeepSpeed; one state may be given alone."""
    from zero_ext.zero.offload_states import OffloadStateTypeEnum

    engine = build_engine(_config(2, "bf16"), seed=3)
    expect_zero_ext_error(lambda: engine.offload_states(device="nvme"), "NVMe")
    expect_zero_ext_error(lambda: engine.offload_states(include=["optim_state"]),
                          "no state ['optim_state']", "optim_states")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.offload_states(device="none")
    assert any("nothing is moved" in str(w.message) for w in caught)
    assert engine.memory_by_location()["host"] == 0
    engine.offload_states(include=OffloadStateTypeEnum.optim_states)  # one state, not a list
    assert engine.memory_by_location()["host"] > 0
    engine.reload_states()
    assert engine.memory_by_location()["host"] == 0
    # Host memory running out part-way (the second buffer): what moved is recorded, refused
    # and reloaded; nothing stays re-pointed at a host buffer behind the engine's back.
    import zero_ext.zero.offload_states as offloading

    assert len(offloading._storages(offloading._tensors(engine, "optim_states"))) >= 2
    placed = [s.exp_avg.untyped_storage().data_ptr() for s in engine.optimizer.shards]
    real, calls = offloading.host_buffer, [0]

    def exhausted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("out of memory (cudaHostAlloc)")
        return real(*args, **kwargs)

    offloading.host_buffer = exhausted
    try:
        engine.offload_states(include=["optim_states"])
        raise AssertionError("no error was raised")
    except RuntimeError as error:
        assert "out of memory" in str(error), error
    finally:
        offloading.host_buffer = real
    hosted = {s.exp_avg.untyped_storage().data_ptr() for s in engine.optimizer.shards} - \
        set(placed)
    assert hosted and engine.memory_by_location()["host"] > 0
    expect_zero_ext_error(engine.step, "optim_states are offloaded")
    engine.reload_states()
    assert engine.memory_by_location()["host"] == 0
    assert not hosted & {s.exp_avg.untyped_storage().data_ptr() for s in engine.optimizer.shards}
    config = _config(3, "bf16", offload_param={"device": "cpu"})
    offloaded = build_engine(config, seed=3)
    expect_zero_ext_error(offloaded.offload_states, "offload_param", "DeepSpeed refuses")
