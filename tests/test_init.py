"""zero_ext.Init, GatheredParameters and partitioned-parameter misuse, at 2 and 3 ranks.

One process group per world size runs every case of tests/init_cases.py; the tests read its
results. References: the same model built plainly under the same seed, and single-process torch
training from the same values.
"""

import functools

import pytest
import torch
from torch.testing import assert_close

import init_cases
from dist_harness import run_group

WORLD_SIZES = [2, 3]


@functools.cache
def _results(world_size):
    return run_group(world_size, init_cases.all_cases)


def _assert_trains_like(params, reference, what):
    for name, ref in reference.items():
        assert_close(params[name], ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(),
                     msg=f"{what} {name}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("model", ["custom", "llama"])
def test_init_gives_the_values_of_a_plain_build_with_the_same_seed(world_size, model):
    for rank, result in enumerate(_results(world_size)):
        case = result[model]
        assert case["all_meta"] and case["still_meta"], rank
        plain = case["plain"]
        for when in ("before_initialize", "after_initialize"):
            assert case[when].keys() == plain.keys(), (rank, when)
            for name, value in plain.items():
                # Bitwise: the constructors' own initialization ran on the same random draws.
                assert torch.equal(case[when][name], value), (rank, when, name)
        for name, value in plain.items():
            assert torch.equal(case["bf16"][name], value.to(case["bf16"][name].dtype)), \
                (rank, "bf16", name)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_an_init_model_broadcasts_its_buffers_as_placed_on_the_training_device(world_size):
    # Its buffers were broadcast as built (on the CPU, in fp32) and only then moved and cast:
    # an NCCL group refuses CPU tensors, so initialize failed on GPUs at more than one rank.
    for rank, result in enumerate(_results(world_size)):
        case = result["llama"]
        assert case["buffers"], rank  # the rotary embedding's inv_freq, cast to bf16
        assert case["buffers_not_broadcast"] == [], rank
        assert case["broadcast_off_device"] == [], rank


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_init_holds_shards_and_about_one_module_while_building(world_size):
    for rank, result in enumerate(_results(world_size)):
        memory = result["memory"]
        assert memory["matches_plain"], rank  # the model measured is the right one
        # The shards of everything built so far, plus some copies of the largest module's own
        # parameters (the module being built, or a gathered parameter and its temporaries).
        bound = memory["model_bytes"] / world_size + 6 * memory["largest_module_bytes"]
        assert bound < memory["model_bytes"] <= memory["plain_peak"], (rank, memory)
        assert memory["init_peak"] <= bound, (rank, memory, bound)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gathered_parameters_with_modifier_rank_after_initialize_on_an_init_model(world_size):
    results = _results(world_size)
    reference = results[0]["after"]["reference"]
    for rank, result in enumerate(results):
        after = result["after"]
        assert after["inside"] == (init_cases.VOCAB, init_cases.engine_cases.DIM), rank
        # Gathered, the parameter is a plain nn.Parameter: no per-operation check.
        assert after["plain_class_inside"] and after["released_class"] == "_ReleasedParameter"
        written = after["written"]
        assert torch.equal(written["head.weight"], init_cases.written_head()), rank
        assert bool((written["blocks.1.weight"][2] == -1.0).all()), rank
        _assert_trains_like(after["params"], reference, f"rank {rank}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gathered_parameters_before_initialize_reads_and_keeps_rank0_writes(world_size):
    for rank, result in enumerate(_results(world_size)):
        before = result["before"]
        assert torch.equal(before["read"], before["plain"]), rank
        assert torch.equal(before["got"], before["expected"]), rank
        # A copy into the placeholders outside GatheredParameters would change nothing.
        assert "holds no values until zero_ext.initialize" in before["load_error"], rank
        assert "zero_ext.GatheredParameters(params, modifier_rank=0)" in before["load_error"]
        # Rank 0's write through .data in a read-only context: refused on every rank, undone
        # (the trained-from values above are the modifier's alone).
        assert "changed inside GatheredParameters(modifier_rank=None) (rank 0: " \
            in (before["read_only_error"] or ""), (rank, before["read_only_error"])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_register_external_parameter_on_an_init_model(world_size):
    for rank, result in enumerate(_results(world_size)):
        external = result["external"]
        assert external["gathered_at_start"], rank
        _assert_trains_like(external["params"], external["reference"], f"rank {rank}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_partitioned_parameter_used_outside_a_forward_errors_at_first_use(world_size):
    for rank, result in enumerate(_results(world_size)):
        outside = result["outside"]
        error = outside["error"]
        assert "parameter head.weight is used outside any forward" in error, error
        assert "zero_ext.GatheredParameters(param)" in error
        assert "zero_ext.register_external_parameter(module, param)" in error
        # Gathered around the use (TRL's pattern), it trains as single-process torch.
        _assert_trains_like(outside["params"], outside["reference"], f"rank {rank}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_change_without_modifier_rank_is_an_error_on_every_rank_and_undone(world_size):
    for rank, result in enumerate(_results(world_size)):
        for kept, case in result["unmodified"].items():
            assert case["unchanged"], (rank, kept)
            assert case["error"] is not None and "changed inside GatheredParameters(" \
                "modifier_rank=None) (rank 0: head.weight)" in case["error"], (rank, kept)


def test_a_class_first_defined_inside_init_keeps_its_decorators_constructor():
    """transformers' use_experts_implementation wraps an experts class's constructor (with
    functools.wraps) after the class statement, which Init has already wrapped; leaving the
    block restored Init's original and dropped the decorator's, so MoE modules first imported
    inside Init were built without their attributes ever after. Single process: no group."""
    import zero_ext

    def sets_flag(cls):
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.flag = True

        cls.__init__ = __init__
        return cls

    with zero_ext.Init():
        @sets_flag
        class Experts(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.ones(4, 4))

        built = [Experts()]
    built.append(Experts())
    with zero_ext.Init():
        built.append(Experts())
    built.append(Experts())
    assert [getattr(m, "flag", None) for m in built] == [True] * 4
