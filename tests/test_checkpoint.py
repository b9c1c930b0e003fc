"""Checkpoints: exact resume, resharding across world sizes and stages, consolidation, crash
safety and corruption (gloo on CPU).

Saving and loading run in separate process groups, as a stopped and restarted job does. Exact
resume compares bitwise with an uninterrupted run; resharding compares with an uninterrupted
run within fp32 reduction-order tolerance (the sums of a different number of ranks round
differently).
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from torch.testing import assert_close

from zero_ext.checkpoint import CheckpointError, consolidate

import checkpoint_cases
import engine_cases
from dist_harness import run_group


@functools.cache
def _root() -> str:
    return tempfile.mkdtemp(prefix="zero_ext_ckpt_")


def teardown_module():
    shutil.rmtree(_root(), ignore_errors=True)


# -- exact resume ---------------------------------------------------------------------------
@functools.cache
def _resume(world_size: int):
    root = os.path.join(_root(), f"resume{world_size}")
    saved = run_group(world_size, checkpoint_cases.resume_save, root)
    loaded = run_group(world_size, checkpoint_cases.resume_load, root)
    return saved, loaded


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("case", checkpoint_cases.RESUME_CASES,
                         ids=[f"stage{s}-{d}-acc{a}" for s, d, a in
                              checkpoint_cases.RESUME_CASES])
def test_resume_is_bitwise_exact(world_size, case):
    saved, loaded = _resume(world_size)
    for rank in range(world_size):
        want = saved[rank][case]["uninterrupted"]
        got = loaded[rank][case]["resumed"]
        for name, value in want["params"].items():
            assert torch.equal(got["params"][name], value), f"rank {rank} {name}"
        assert len(got["shards"]) == len(want["shards"])
        for index, (g, w) in enumerate(zip(got["shards"], want["shards"])):
            for kind, a, b in zip(("master", "exp_avg", "exp_avg_sq"), g[:3], w[:3]):
                assert torch.equal(a, b), f"rank {rank} bucket {index} {kind}"
            # AdamW's step count: every optimizer step that was not skipped.
            assert g[3] == w[3] == 6 - want["counters"][2], f"rank {rank} step count"
        assert got["lr"] == want["lr"], rank
        assert got["counters"] == want["counters"], rank
        assert got["loss_scale"] == want["loss_scale"], rank
        assert loaded[rank][case]["client_state"] == {"epoch": 7, "note": [1, 2]}
        # Each rank's RNG comes back as it was at the save.
        assert torch.equal(loaded[rank][case]["rng_after_load"],
                           saved[rank][case]["rng_at_save"]), rank


def test_resume_counts_fp16_loss_scale_and_schedule():
    """The fp16 case must actually exercise a changing loss scale and LR, or the equalities
    above would hold vacuously."""
    saved, _ = _resume(2)
    fp16 = saved[0][(2, "fp16", 1)]["uninterrupted"]
    # Doubled once, on clean step 4 (DeepSpeed: window + 1 clean steps after the start, window
    # 3); the next doubling would come at step 7.
    assert fp16["loss_scale"] == 2.0 ** 8 * 2
    assert fp16["lr"][0] != 1e-2 and fp16["lr"][0] > 0  # decaying after 2 warmup steps


def test_checkpoint_files_and_latest():
    saved, _ = _resume(2)
    path = saved[0][(1, "fp32", 1)]["path"]
    save_dir = os.path.dirname(path)
    assert os.path.basename(path) == "global_step3"
    with open(os.path.join(save_dir, "latest")) as f:
        assert f.read() == "global_step3"
    names = sorted(os.listdir(path))
    assert names == sorted(["manifest.json", "metadata.json", "engine_state.pt",
                            "model_states.safetensors",
                            "zero_shard_00000_of_00002.safetensors",
                            "zero_shard_00001_of_00002.safetensors"])
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    for name, record in manifest["files"].items():
        assert os.path.getsize(os.path.join(path, name)) == record["bytes"]
    # Each rank's shard holds 1/N of every bucket's fp32 master and two moments (+ RNG).
    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    padded = sum(layout["padded_numel"] for layout in meta["layouts"])
    shard = os.path.getsize(os.path.join(path, "zero_shard_00001_of_00002.safetensors"))
    assert 3 * 4 * padded // 2 < shard < 3 * 4 * padded // 2 + 32 * 1024


# -- resharding -----------------------------------------------------------------------------
@functools.cache
def _reshard():
    root = os.path.join(_root(), "reshard")
    saved = {point: run_group(point[0], checkpoint_cases.reshard_save, root, point)
             for point in checkpoint_cases.RESHARD_POINTS}
    loaded = {point: run_group(point[0], checkpoint_cases.reshard_load, root, point)
              for point in checkpoint_cases.RESHARD_POINTS}
    return saved, loaded


_RESHARDS = [(a, b) for a in checkpoint_cases.RESHARD_POINTS
             for b in checkpoint_cases.RESHARD_POINTS if a != b]  # same: exact-resume tests


@pytest.mark.parametrize("saved_at, loaded_at", _RESHARDS,
                         ids=[f"{checkpoint_cases.point_name(a)}-to-"
                              f"{checkpoint_cases.point_name(b)}" for a, b in _RESHARDS])
def test_reshard_world_size_stage_and_offload(saved_at, loaded_at):
    saved, loaded = _reshard()
    at_save = saved[saved_at][0]["full_state"]
    # The uninterrupted run at the loading configuration is the reference.
    reference = saved[loaded_at][0]["uninterrupted"]
    for rank, result in enumerate(loaded[loaded_at]):
        got = result[saved_at]
        assert got["steps"] == 6
        # Right after the load the weights are exactly those saved: resharding is copying.
        for name, value in got["loaded"].items():
            assert torch.equal(value, at_save[name].float()), f"rank {rank} {name}"
        assert_close(torch.tensor(got["norms"]), torch.tensor(reference["norms"][3:]),
                     rtol=1e-5, atol=0)
        for name, value in reference["params"].items():
            assert_close(got["params"][name], value, rtol=1e-5,
                         atol=1e-5 * value.abs().max().item(), msg=f"rank {rank} {name}")


# -- consolidation --------------------------------------------------------------------------
def test_consolidate_equals_full_state_dict_and_loads_into_a_plain_model(tmp_path):
    saved, _ = _reshard()
    full = saved[(3, 3, False)][0]["full_state"]
    out = consolidate(os.path.join(_root(), "reshard", "ws3-stage3"), tmp_path / "m")
    assert out == str(tmp_path / "m" / "model.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(out)
    assert set(tensors) == set(full)
    for key, value in full.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    model = engine_cases.build_model(seed=5)
    model.load_state_dict(tensors)  # strict: every key, no extra
    assert torch.equal(model.fc1.weight, full["fc1.weight"])


@pytest.mark.parametrize("saved_at", checkpoint_cases.RESHARD_POINTS,
                         ids=[checkpoint_cases.point_name(p) for p in checkpoint_cases.RESHARD_POINTS])
def test_save_16bit_model_equals_full_state_dict(saved_at):
    from safetensors.torch import load_file

    saved, _ = _reshard()
    files = {result["model_file"] for result in saved[saved_at]}
    assert len(files) == 1  # every rank returns the path rank 0 wrote
    tensors = load_file(files.pop())
    full = saved[saved_at][0]["full_state"]
    assert set(tensors) == set(full)
    for key, value in full.items():
        assert torch.equal(tensors[key], value), key


def test_consolidate_cli_bf16(tmp_path):
    saved, _ = _reshard()
    full = saved[(2, 1, False)][0]["full_state"]
    result = subprocess.run(
        [sys.executable, "-m", "zero_ext.consolidate",
         os.path.join(_root(), "reshard", "ws2-stage1"), str(tmp_path / "w.safetensors"),
         "--dtype", "bf16"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "w.safetensors")
    for key, value in full.items():
        assert torch.equal(tensors[key], value.to(torch.bfloat16)), key
    missing = subprocess.run([sys.executable, "-m", "zero_ext.consolidate",
                              str(tmp_path / "nothing"), str(tmp_path / "o")],
                             capture_output=True, text=True, check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


@functools.cache
def _llama():
    root = os.path.join(_root(), "hf")
    return root, run_group(2, checkpoint_cases.hf_llama_save, root)


def test_hf_model_consolidates_and_saves_for_from_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    root, results = _llama()
    full = results[0]["full_state"]
    out_dir = tmp_path / "hf"
    consolidate(os.path.join(root, "llama"), out_dir, dtype="bf16")
    assert (out_dir / "config.json").exists()
    each = [os.path.dirname(result["each"]) for result in results]
    assert len(set(each)) == len(results)
    for source in (out_dir, os.path.dirname(results[0]["file"]), *each):
        model = LlamaForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        state = model.state_dict()
        for key, value in full.items():
            assert torch.equal(state[key], value), (source, key)
    # The keys save_pretrained writes: a tied weight once (under its embedding's name)
    from safetensors import safe_open
    LlamaForCausalLM(checkpoint_cases.tiny_llama_config()).save_pretrained(tmp_path / "plain")
    with safe_open(tmp_path / "plain" / "model.safetensors", "pt") as f:
        expected = set(f.keys())
    assert "lm_head.weight" not in expected and "model.embed_tokens.weight" in expected
    for source in (out_dir, *each):
        with safe_open(os.path.join(source, "model.safetensors"), "pt") as f:
            assert set(f.keys()) == expected, (source, set(f.keys()) ^ expected)
    # save_16bit_model writes what save_pretrained writes beside the weights: the class and
    # dtype in config.json, and the generation settings
    saved = os.path.dirname(results[0]["file"])
    with open(os.path.join(saved, "config.json")) as f:
        written = json.load(f)
    assert (written["architectures"], written["dtype"]) == (["LlamaForCausalLM"], "bfloat16")
    model = LlamaForCausalLM.from_pretrained(saved)
    generation = model.generation_config
    assert (generation.eos_token_id, generation.do_sample, generation.temperature) == (
        [1, 5], True, 0.6), generation


def test_moe_weights_load_and_save_in_the_checkpoint_layout_transformers_uses(tmp_path):
    """transformers 5 holds a mixture of experts' per-expert matrices stacked (gate_up_proj,
    down_proj) and converts from and to the per-expert checkpoint layout in from_pretrained and
    save_pretrained: load_weights reads save_pretrained's files into a stage-3 model built
    under zero_ext.Init, and save_16bit_model writes the names save_pretrained writes, which
    from_pretrained reads back."""
    from safetensors import safe_open

    moe = _llama()[1][0]["moe"]
    source = checkpoint_cases.tiny_mixtral()
    assert moe["unexpected"] == []
    for key, value in source.state_dict().items():
        assert torch.equal(moe["loaded"][key], value), key
    with safe_open(os.path.join(moe["source"], "model.safetensors"), "pt") as f:
        expected = set(f.keys())
    assert any(".experts.0.w1.weight" in k for k in expected)  # the per-expert layout
    with safe_open(moe["file"], "pt") as f:
        assert set(f.keys()) == expected, set(f.keys()) ^ expected
    reloaded = type(source).from_pretrained(os.path.dirname(moe["file"])).state_dict()
    for key, value in moe["trained"].items():
        assert torch.equal(reloaded[key], value), key


# -- crash safety and corruption --------------------------------------------------------------
def test_killed_rank_mid_save_leaves_the_previous_checkpoint_loadable():
    root = os.path.join(_root(), "crash")
    # Rank 0 may report the dead peer before the harness sees rank 1's exit code.
    with pytest.raises(RuntimeError, match="rank 1 exited with code -9|Connection (closed|reset) by peer"):
        run_group(2, checkpoint_cases.crash_save, root, timeout=300)
    with open(os.path.join(root, "latest")) as f:
        assert f.read() == "good"
    assert not os.path.exists(os.path.join(root, "bad"))
    # Killed mid-file: rank 1's shard exists only as its temporary, never under its name.
    partial = sorted(os.listdir(os.path.join(root, "bad.partial")))
    assert any(n.startswith("zero_shard_00001_of_00002.safetensors.tmp.") for n in partial)
    assert "zero_shard_00001_of_00002.safetensors" not in partial
    assert "manifest.json" not in partial
    results = run_group(2, checkpoint_cases.crash_load, root)
    for rank, result in enumerate(results):
        assert result["path"] == os.path.join(root, "good")
        want = torch.load(os.path.join(root, f"good_params_{rank}.pt"))
        for name, value in want.items():
            assert torch.equal(result["params"][name], value), name
        assert "incomplete" in result["bad"] and "bad.partial" in result["bad"], result["bad"]
    assert any("bad.partial" in w and "incomplete" in w for w in results[0]["warnings"])


def _damaged_copies(root: str, source: str) -> dict[str, str]:
    """Copies of one good checkpoint, each damaged one way; returns tag -> expected words."""
    expected = {}

    def copy(tag):
        shutil.copytree(source, os.path.join(root, tag))
        return os.path.join(root, tag)

    shard = "zero_shard_00001_of_00002.safetensors"
    path = os.path.join(copy("truncated"), shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    expected["truncated"] = f"{shard} is .* bytes, the manifest recorded"
    path = os.path.join(copy("flipped"), shard)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    expected["flipped"] = f"{shard} fails its checksum"
    os.remove(os.path.join(copy("no_manifest"), "manifest.json"))
    expected["no_manifest"] = "has no manifest.json"
    os.remove(os.path.join(copy("missing_shard"), shard))
    expected["missing_shard"] = f"{shard} is missing"
    return expected


def test_corrupt_checkpoints_raise_their_errors_on_every_rank():
    saved, _ = _resume(2)
    source = saved[0][(2, "fp32", 1)]["path"]
    root = os.path.join(_root(), "corrupt")
    os.makedirs(root)
    expected = _damaged_copies(root, source)
    results = run_group(2, checkpoint_cases.load_checks, root, sorted(expected), source)
    for tag, pattern in expected.items():
        for rank, result in enumerate(results):
            assert re.search(pattern, result[tag]), (tag, rank, result[tag])
        # Consolidation reads the same files and refuses the same way.
        with pytest.raises(CheckpointError, match=pattern):
            consolidate(os.path.join(root, tag), os.path.join(root, tag + ".out"))
        assert not os.path.exists(os.path.join(root, tag + ".out", "model.safetensors"))
    # The intact checkpoint (stage 2) at stage 1, weights only: exactly the saved weights, a
    # fresh optimizer.
    want = saved[0][(2, "fp32", 1)]["params_at_save"]
    for result in results:
        got = result["weights_only"]
        assert got["moments_zero"] and set(got["steps"]) == {0.0}
        assert got["global_steps"] == 3
        for name, value in want.items():
            assert torch.equal(got["params"][name], value), name
    for result in results:
        assert "different tags" in result["disagree"] and "['t0', 't1']" in result["disagree"]
        assert not result["disagree_written"]


# -- pretrained weights ------------------------------------------------------------------------
def test_pretrained_weights_load_into_shards_at_any_stage(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(checkpoint_cases.tiny_llama_config())
    # Small shards: several files and an index, as large models are saved.
    model.save_pretrained(tmp_path / "pretrained", max_shard_size="20KB")
    assert (tmp_path / "pretrained" / "model.safetensors.index.json").exists()
    want = model.state_dict()
    save_file({"x": torch.zeros(3)}, str(tmp_path / "wrong.safetensors"))
    results = run_group(3, checkpoint_cases.pretrained_load, str(tmp_path / "pretrained"),
                        str(tmp_path / "wrong.safetensors"))
    for rank, result in enumerate(results):
        for (stage, dtype), got in ((k, v) for k, v in result.items() if isinstance(k, tuple)):
            assert got["unexpected"] == [] and got["masters_fp32"]
            assert set(got["state"]) == set(want), (stage, dtype)
            for key, value in want.items():
                expected = value if dtype == "fp32" else value.to(torch.bfloat16)
                assert torch.equal(got["state"][key], expected), (rank, stage, dtype, key)
        assert result["bf16_trained"]
    masters = tmp_path / "masters.safetensors"
    consolidate(str(tmp_path / "bf16_ckpt"), str(masters))
    for key, value in load_file(masters).items():
        assert value.dtype == torch.float32 and torch.equal(value, want[key]), key
        assert "does not fit this model's trainable parameters: missing" in result["wrong"]
        assert "model.embed_tokens.weight" in result["wrong"]

