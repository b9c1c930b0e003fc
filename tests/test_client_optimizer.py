"""Optimizers other than AdamW at stages 1-3 (zero/client_optimizer.py; cases in
tests/client_optimizer_cases.py, one process group per world size): torch's element-wise
optimizers on this rank's fp32 master shards train as the same optimizer on the whole batch in
one process; their state is checkpointed and resumed at another world size; what cannot run
or be resharded is refused, naming the fix."""

from __future__ import annotations

import functools

import client_optimizer_cases as cases
import pytest
import torch
from torch.testing import assert_close

from dist_harness import run_group

WORLD_SIZES = [2, 3]  # 2 saves the checkpoint that 3 (uneven shards) resumes


@functools.cache
def _run(world_size: int, directory: str):
    if world_size != 2:
        _run(2, directory)  # writes the checkpoint the others resume
    return run_group(world_size, cases.client_optimizer_cases, directory)[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("client_optimizer"))
    return lambda world_size: _run(world_size, directory)


def _close(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for name, value in want.items():
        assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=f"{what}: {name}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("name", "stage"), [(name, stage) for name, stages in
                                             cases.STAGES.items() for stage in stages])
def test_torch_optimizer_on_shards_trains_as_on_whole_parameters(results, world_size, name,
                                                                 stage):
    out = results(world_size)
    _close(out["got"][f"{name}_stage{stage}"], out["reference"][name],
           f"{name} at stage {stage}, {world_size} ranks")
    # It moved the weights (the reference did too): not a comparison of two untrained models.
    assert any(not torch.equal(w, cases._model().state_dict()[n])
               for n, w in out["reference"][name].items())


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_weights_are_written_from_the_stepped_masters(results, world_size, stage):
    out = results(world_size)
    bf16 = out[f"bf16_stage{stage}"]
    reference = out["reference"]["sgd_nesterov"]
    initial = cases._model().state_dict()
    for name, master in bf16["masters"].items():
        # The model's weight is its master rounded to bf16, after the last step.
        assert bf16["weights"][name].dtype == torch.bfloat16
        assert torch.equal(bf16["weights"][name], master.to(torch.bfloat16)), name
        # Trained as fp32 SGD is, within bf16's rounding of the forward and the gradients.
        assert_close(master, reference[name], rtol=0, atol=2e-2, msg=name)
    moved = max((reference[n] - initial[n]).abs().max().item() for n in reference)
    assert moved > 0.1  # the tolerance above tells trained from untrained


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize(("name", "stage"), [("sgd_nesterov", 2), ("rmsprop", 3),
                                             ("adam_amsgrad", 3)])
def test_offloaded_with_zero_force_ds_cpu_optimizer_false(results, world_size, name, stage):
    # DeepSpeed's key: false steps the optimizer on the host shards (stage 3: deferred behind
    # the next forward; Adam with amsgrad with offload_param too).
    out = results(world_size)
    _close(out["got"][f"{name}_offload{stage}"], out["reference"][name],
           f"{name}, offload_optimizer, stage {stage}, {world_size} ranks")
    assert out[f"{name}_offload{stage}_warnings"] == []
    # One bucket's shard per call of its step(), each shard once per step: its groups hold
    # the shards being stepped, not every shard (a call per shard visited all of them).
    seen, shards = out[f"{name}_offload{stage}_seen"]
    assert shards > 1 and len(seen) == cases.STEPS * shards and set(seen) == {1}, (seen, shards)
    # The host memory check budgets the state this optimizer keeps (SGD's momentum 4 bytes an
    # element, centered RMSprop with momentum and Adam with amsgrad 12), not AdamW's 8: past
    # the budget a run met the OOM killer, short of it one that fits was refused. A step
    # count per shard adds a few bytes to what is held (rounded away in the budget).
    planned, held, numel = out[f"{name}_offload{stage}_state_bytes"]
    width = {"sgd_nesterov": 4, "rmsprop": 12, "adam_amsgrad": 12}[name]
    kind = f"{cases.OPTIMIZERS[name][0].__name__} state"
    assert planned == {kind: width * numel}, planned
    assert width * numel <= held <= width * numel + 8 * shards, (held, numel)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_clipping_accumulation_and_a_schedule_on_the_users_optimizer(results, world_size):
    out = results(world_size)
    _close(out["got"]["clip_accumulate_schedule"], out["reference"]["clip_accumulate_schedule"],
           "SGD, clipped, 2 micro-steps, LambdaLR")
    lr = cases.OPTIMIZERS["sgd_nesterov"][1]["lr"]
    # LambdaLR's factor after 4 steps, on each group's own lr.
    assert out["lr"] == pytest.approx([lr / 5, lr / 2 / 5])
    assert out["mom"] == [0.9, 0.9]  # engine.get_mom(): SGD's momentum, as in DeepSpeed


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_state_is_sharded_and_read_back_whole(results, world_size):
    out = results(world_size)
    # Centered RMSprop with momentum: square_avg, grad_avg, momentum_buffer per element, an
    # fp32 step per shard; this rank's share only.
    assert out["state_bytes"] == 3 * 4 * out["shard_numel"] + 4 * out["shards"]
    assert out["shard_numel"] < sum(p.numel() for p in cases._model().parameters())
    model = cases._model()
    opt = torch.optim.RMSprop(cases._groups(model, 0.01), **cases.OPTIMIZERS["rmsprop"][1])
    x, y = cases._batch(0, world_size)
    model(x, y).backward()
    opt.step()
    assert_close(out["square_avg"], opt.state[model.mid.weight]["square_avg"], rtol=1e-5,
                 atol=1e-7)


@pytest.mark.parametrize("name", ["adagrad", "sgd_mixed"])
def test_state_resumes_at_another_world_size(results, name):
    out = results(3)
    # Saved by 2 ranks at stage 2 after 2 steps, resumed by 3 at stage 3 for 2 more (SGD's
    # second group keeps no momentum buffer).
    _close(out["got"][f"resumed_{name}"], out["reference"][f"resumed_{name}"],
           f"{name} resumed 2 -> 3 ranks")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_what_cannot_run_or_be_saved_is_refused(results, world_size):
    errors = results(world_size)["errors"]
    assert errors["lbfgs"].startswith("TypeError") and "closure" in errors["lbfgs"]
    assert "zero_allow_untested_optimizer" in errors["untested"]
    assert "BlockScaled" in errors["untested"]
    assert "offload_optimizer" in errors["offload"] and "SGD" in errors["offload"]
    assert '"zero_force_ds_cpu_optimizer": false' in errors["offload"]
    assert "once per shard" in errors["offload_untested"]
    assert "CountingSGD" in errors["offload_untested"]
    assert "compress_momentum" in errors["compress_momentum"] and "SGD" in \
        errors["compress_momentum"]
    # With DeepSpeed's key it runs (and says what running on shards means, and at its first
    # step that its per-block state binds its checkpoints to this world size and buckets).
    assert "flat fp32 shards" in errors["untested_warning"]
    assert "BlockScaled" in errors["bound_warning"]
    assert errors["untested_moved"] is True
    # State a checkpoint cannot hold: said at the first step (rank 0), not first found at the
    # first save hours later, and the save refused on every rank, naming it.
    assert "'seen' is a list" in errors["unsaveable_warning"]
    ranks = ", ".join(map(str, range(world_size)))
    assert "'seen' is a list" in errors["unsaveable"] and f"ranks {ranks}" in \
        errors["unsaveable"]
    assert "AdamW moments" in errors["adamw_into_rmsprop"] and "RMSprop" in \
        errors["adamw_into_rmsprop"]
    assert "RMSprop state" in errors["rmsprop_into_adamw"]
    assert "load_optimizer_states=False" in errors["rmsprop_into_adamw"]
    assert errors["weights_only"] == "loaded"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_the_optimizers_own_group_settings_and_the_users_writes_reach_its_step(results,
                                                                               world_size):
    # CountingSGD keeps a step counter in its groups (as Prodigy keeps `d`); the user sets a
    # group's lr to 0 on the optimizer they passed, after initialize. Both as in one process.
    counting = results(world_size)["counting"]
    _close(counting["got"], counting["reference"], "CountingSGD")
    assert counting["k"] == [4, 4]  # the engine's groups show the optimizer's counter
    # A key its step removes leaves the engine's group too: taken once, not at every step.
    assert counting["one_shots"] == [1, 0] and counting["one_shot_left"] == [False, False]


def test_bf16_int_and_1d_scalar_state_resumes_at_another_world_size(results):
    counting = results(3)["counting"]
    # Saved by 2 ranks after 2 steps, resumed by 3: each kind of state as it was kept.
    assert counting["loaded_state"] == {
        "buf": ("Tensor", "torch.bfloat16"), "n": ("int", "", (), 2.0),
        "t0": ("Tensor", "torch.float32", (), 2.0), "t1": ("Tensor", "torch.float64", (1,), 1.0)}
    _close(counting["resumed"], counting["reference_resumed"], "CountingSGD resumed 2 -> 3")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_subclasses_per_shard_statistics_and_unfrozen_parameters(results, world_size):
    counting = results(world_size)["counting"]
    # State bound to the shards (one statistic per shard, found on one rank or only across
    # ranks; per-block scales): resumed at the same world size and buckets, exactly the
    # uninterrupted run; at another world size, refused, naming both fixes.
    names = ["norm3", "norm2", "block3"] + (["bnb8"] if "bound_bnb8" in counting else [])
    if "bound_bnb8" in counting:  # its moments really are 8-bit codes
        assert "torch.uint8" in counting["bound_bnb8_dtypes"]
    for name in names:
        assert counting[f"bound_{name}"] == 0.0, name
        if world_size != 2:
            refused = counting[f"bound_{name}_elsewhere"]
            assert "resumes at 2 ranks, with the same buckets only" in refused, refused
            assert "load_optimizer_states=False" in refused
    # A subclass with a step of its own is not SGD on shards; one without is.
    assert "zero_allow_untested_optimizer" in counting["lars"] and "Lars" in counting["lars"]
    assert counting["named_sgd"] == "NamedSGD"
    assert "ScheduleFree has train()/eval()" in counting["schedule_free"]
    # Frozen when saved, trained now: no state to give it.
    assert "['norm.bias', 'norm.weight'] were frozen when" in counting["unfrozen"]
    assert "load_optimizer_states=False" in counting["unfrozen"]


def test_state_width_is_measured_on_a_copy_that_leaves_the_optimizer_as_it_was():
    # What the host memory check budgets per element and group: SGD's momentum (none in a
    # group without it), Adam's two moments plus amsgrad's maximum, bitsandbytes-free.
    from zero_ext.zero.client_optimizer import state_bytes_per_element

    weight, bias = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([{"params": [weight]}, {"params": [bias], "momentum": 0.0}],
                          lr=0.1, momentum=0.9)
    calls = []
    sgd.register_step_pre_hook(lambda *args: calls.append("pre"))
    sgd.register_step_post_hook(lambda *args: calls.append("post"))
    assert state_bytes_per_element(sgd) == [4.0, 0.0]
    assert calls == [] and len(sgd.state) == 0
    assert [g["params"] for g in sgd.param_groups] == [[weight], [bias]]
    adam = torch.optim.Adam([weight], amsgrad=True)
    (width,) = state_bytes_per_element(adam)
    assert 12 <= width < 12.001 and len(adam.state) == 0  # + the step count, a scalar
