"""Checkpoints never run code, never go silently wrong, and refuse misuse clearly (issue 13).

The distributed cases run in one 2-rank gloo group (tests/checkpoint_safety_cases.py); the
consolidation cases, which need no process group, run here. References: the values saved
(weights, optimizer groups), DeepSpeed's documented behaviour (load_checkpoint without a
`latest` returns (None, None); save_checkpoint refuses an empty directory; exclude_frozen_
parameters leaves frozen parameters out), and the filesystem itself (files that must or must
not exist).
"""

import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings

import checkpoint_safety_cases
import pytest
import torch

from zero_ext.checkpoint import consolidate
from zero_ext.checkpoint import format as checkpoint_format
from zero_ext.checkpoint.data_only import ALLOWED_TYPES

from dist_harness import run_group


@functools.cache
def _root() -> str:
    return tempfile.mkdtemp(prefix="zero_ext_safety_")


def teardown_module():
    shutil.rmtree(_root(), ignore_errors=True)


@functools.cache
def _results():
    return run_group(2, checkpoint_safety_cases.run_all, _root())


def _each(case: str, key: str):
    return [result[case][key] for result in _results()]


def _on_every_rank(case: str, key: str, *words: str) -> None:
    for rank, message in enumerate(_each(case, key)):
        assert message.startswith("CheckpointError"), (rank, message)
        for word in words:
            assert word in message, (rank, word, message)


# -- 1: a checkpoint is data, never code --------------------------------------------------------
def test_crafted_client_state_does_not_run_and_is_refused():
    _on_every_rank("crafted", "evil", "engine_state.pt holds something other than plain data",
                   "posix.system", "never runs code")
    assert not any(_each("crafted", "evil_marker"))
    assert not os.path.exists(os.path.join(_root(), "crafted", "marker"))
    assert all(_each("crafted", "unchanged"))


@pytest.mark.parametrize("name, words", [
    ("absolute", ["is a path, not a directory name"]),
    ("dotdot", ["'../good/t' is a path"]),
    ("separator", ["'sub/t' is a path"]),
    ("empty", ["latest is empty"]),
])
def test_latest_that_leaves_the_save_directory_is_refused(name, words):
    _on_every_rank("crafted", name, *words)


@pytest.mark.parametrize("tag, problem", [
    (" run1", "white space"), ("run1\n", "white space"),
    ("metadata.json", "its own files"), ("zero_shard_0_of_2.safetensors", "its own files"),
    ("latest", "its own files"), ("run.1-b_2", None)])
def test_tags_that_could_not_be_loaded_back_are_refused(tag, problem):
    # `latest` is read back stripped, and a save_dir holding a tag named like a checkpoint's
    # own file looks like a checkpoint itself: such tags were saved and never found again.
    found = checkpoint_format.tag_problem(tag)
    assert (found is None) if problem is None else (problem in found), found


def test_client_state_that_is_not_data_is_refused_at_save_and_data_round_trips():
    for key, place, hint in (("save_object", "client_state['sampler']", "state_dict()"),
                             ("save_numpy", "client_state['rng'] is a numpy.float64",
                              ".tolist()")):
        _on_every_rank("crafted", key, place, "Allowed: None, bool, int", hint,
                       "Nothing was written")
    assert not any(_each("crafted", "obj_written"))
    # What the save check lets through, the data-only load reads back unchanged.
    result = _results()[0]["crafted"]
    plain, back = result["plain"], result["plain_back"]
    assert set(back) == set(plain)
    for key, value in plain.items():
        if torch.is_tensor(value):
            assert torch.equal(back[key], value), key
        else:
            assert back[key] == value and type(back[key]) is type(value), key
    # Every allowed type is among the values (dict and tuple as the containers around them).
    covered = {type(v) for v in plain.values()} | {dict, tuple, torch.nn.Parameter}
    assert set(ALLOWED_TYPES) <= covered


# -- item 6: a re-save interrupted between its renames ------------------------------------------
@pytest.mark.parametrize("point, listing, which", [
    ("before_first_rename", ["last", "last.partial", "latest"], "old"),
    ("between_renames", ["last.partial", "last.replaced", "latest"], "new"),
    ("before_removing_old", ["last", "last.replaced", "latest"], "new"),
])
def test_crash_during_resave_leaves_a_complete_copy_that_loads(point, listing, which):
    for rank, result in enumerate(_each("resave", point)):
        assert "Crash" in result["crashed"], result["crashed"]
        assert result["listing"] == listing, (rank, result["listing"])
        assert result["loaded"] == "ok", (rank, result["loaded"])
        assert result["which"] == which, rank
        assert result["global_steps"] == (2 if which == "new" else 1)
        # The next save of the tag cleans up.
        assert [n for n in result["after"] if not n.startswith(".")] == ["last", "latest"]
    if point == "between_renames":
        assert any("between its two renames" in w and "last.partial" in w
                   for w in _each("resave", point)[0]["warnings"])


# -- item 7: a failed load leaves the engine as it was ---------------------------------------------
@pytest.mark.parametrize("case, words", [
    ("scheduler", ["has no LR scheduler state", "load_lr_scheduler_states=False"]),
    ("groups", ["2 optimizer parameter groups, this engine 1"]),
    ("shape", ["frozen_shift is (24,)", "(25,) in the model"]),
])
def test_failed_load_changes_nothing(case, words):
    _on_every_rank("failed", case, *words)
    assert all(_each("failed", case + "_unchanged"))


# -- item 9: resume with a changed config --------------------------------------------------------
def test_changed_hyperparameters_are_named_once_and_the_checkpoints_win():
    results = _results()
    outcome, seen, _ = results[0]["changed"]["values"]
    assert outcome == "ok" and len(seen) == 1, seen
    for words in ("group 0 lr: 0.01 in the checkpoint, 0.003 configured",
                  "group 0 weight_decay: 0.1 in the checkpoint, 0.2 configured",
                  "group 0 betas: (0.9, 0.999) in the checkpoint, (0.8, 0.99) configured",
                  "group 0 eps: 1e-08 in the checkpoint, 1e-06 configured"):
        assert words in seen[0], words
    assert results[1]["changed"]["values"][:2] == ("ok", [])  # rank 0 alone says it
    for result in results:
        assert result["changed"]["groups_after"] == result["changed"]["saved_groups"]


def test_optimizer_type_change_is_refused_unless_the_optimizer_starts_fresh():
    _on_every_rank("changed", "adam", "saved by AdamW (decoupled weight decay)",
                   "runs Adam (L2 weight decay)", "load_optimizer_states=False")
    assert all(_each("changed", "adam_unchanged"))
    for result in _results():
        assert result["changed"]["adam_fresh"] == "ok"
        for name, value in result["changed"]["params_at_save"].items():
            assert torch.equal(result["changed"]["adam_fresh_params"][name], value), name


# -- item 5: DeepSpeed's API -------------------------------------------------------------------
@pytest.mark.parametrize("name, where", [("empty", "latest does not exist"),
                                         ("missing", "missing does not exist")])
def test_load_without_a_checkpoint_returns_none_with_a_warning(name, where):
    for rank, (outcome, seen, value) in enumerate(_each("api", name)):
        assert outcome == "ok" and value == (None, None), rank
        assert (rank == 0) == any(where in w and "(None, None)" in w for w in seen), (rank, seen)
    assert all(_each("api", "none_unchanged"))


def test_save_into_an_empty_directory_name_is_refused():
    _on_every_rank("api", "empty_dir", "save_dir is ''")
    assert _each("api", "cwd_listing") == [[], []]


def test_exclude_frozen_parameters_leaves_them_out_and_loads():
    for result in _results():
        api = result["api"]
        assert "frozen_shift" not in api["model_states_keys"]
        assert api["nofrozen_load"] == "ok"
        for name, value in api["params_at_save"].items():
            if name == "frozen_shift":  # not in the checkpoint: the model's own value stays
                assert torch.equal(api["nofrozen_params"][name], torch.full_like(value, 0.25))
            else:
                assert torch.equal(api["nofrozen_params"][name], value), name


def test_tag_directory_passed_as_the_save_directory_is_named():
    for message in _each("api", "tag_dir"):
        assert "is itself a checkpoint" in message and "pass the parent directory" in message
        assert message.rstrip().endswith("and tag='t'"), message


# -- never save a worse or diverged state -------------------------------------------------------
def test_non_finite_masters_are_refused_naming_bucket_and_parameter():
    result = _results()[0]["worse"]
    _on_every_rank("worse", "nan", "rank 1: the optimizer state is not finite",
                   f"bucket {result['nan_bucket']}", f"the first in {result['nan_param']}",
                   "Nothing was written")
    assert _each("worse", "nan_listing") == [["global_step1", "latest"]] * 2


def test_replacing_a_tag_at_the_same_step_is_said():
    outcome, seen, _ = _results()[0]["worse"]["same_step"]
    assert outcome == "ok"
    assert any("replacing" in w and "global_step1" in w and "same step counts" in w
               for w in seen), seen


def test_diverged_step_counts_are_named_at_save():
    for message in _each("worse", "diverged"):
        assert "different numbers of optimizer steps (rank 0 4, rank 1 3)" in message, message
        assert "tag" not in message


# -- item 12: clear errors ---------------------------------------------------------------------
@pytest.mark.parametrize("key, words", [
    ("version_str", ["manifest.json is malformed", "'version' is '1' (str)"]),
    ("no_files", ["manifest.json is malformed", "no 'files'"]),
    ("save_into_file", ["a_file is a file, not a directory"]),
    ("load_from_file", ["a_file is a file, not a directory"]),
    ("tag_is_file", ["tagfile/t is a file, so tag 't' cannot be saved"]),
    ("load_tag_file", ["tagfile/t is a file, not a checkpoint directory"]),
    ("locked", ["another job is saving into", "process", "on host", "give each job its own"]),
    ("full", ["the disk is full", "global_step1.partial was removed",
              "global_step0.partial (1,000 bytes)", "bytes and", "were free"]),
])
def test_misuse_errors_say_what_and_how(key, words):
    _on_every_rank("errors", key, *words)


def test_lock_of_a_running_job_blocks_and_a_dead_ones_is_taken_over():
    assert not any(_each("errors", "locked_written"))
    outcome, seen, _ = _results()[0]["errors"]["stale"]
    assert outcome == "ok" and any("took over" in w and "which is gone" in w for w in seen)
    assert _results()[0]["errors"]["stale_listing"] == ["global_step1", "latest"]


def test_consolidate_removes_a_killed_runs_temporaries(tmp_path):
    _results()  # wrote the checkpoint
    source = os.path.join(_root(), "crafted", "good")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "model.safetensors"
    leftover = tmp_path / f"model.safetensors.tmp.{dead.pid}"  # an older version's name
    leftover.write_bytes(b"half")
    named = tmp_path / f"model.safetensors.tmp.{socket.gethostname()}.{dead.pid}"
    named.write_bytes(b"half")
    alive = tmp_path / f"model.safetensors.tmp.{os.getppid()}"  # a writer still running
    alive.write_bytes(b"busy")
    # A writer on another host (shared storage, save_on_each_node): its pid means nothing
    # here, so its file stays (it was removed mid-write, and that save failed).
    elsewhere = tmp_path / f"model.safetensors.tmp.other-node.example.{dead.pid}"
    elsewhere.write_bytes(b"busy")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        consolidate(source, out)
    assert out.exists() and not leftover.exists() and not named.exists()
    assert alive.exists() and elsewhere.exists()
    assert any(leftover.name in str(w.message) and "killed" in str(w.message) for w in seen)


# -- stage3_gather_16bit_weights_on_model_save ----------------------------------------------------
def test_save_16bit_model_writes_at_stage3_and_says_where_deepspeed_would_not():
    from safetensors.torch import load_file

    result = _results()[0]["model"]
    for gather in (False, True):
        outcome, seen, file = result[gather]
        assert outcome == "ok"
        named = any("stage3_gather_16bit_weights_on_model_save is false" in w for w in seen)
        assert named == (not gather), seen
        tensors = load_file(file)
        assert set(tensors) == set(result[f"{gather}_full"])
        for key, value in result[f"{gather}_full"].items():
            assert torch.equal(tensors[key], value), key
    assert _results()[1]["model"][False][1] == []  # rank 0 alone warns


# -- a parameter frozen when saved and trainable now ----------------------------------------------
def _adamw_from(states: dict, step: float) -> dict:
    """The loading model (fc1 and frozen_shift trainable) set to the loaded fp32 masters, with
    the loaded moments and step count, trained two steps by torch AdamW on the whole batch."""
    from engine_cases import SEQ, build_model, global_batch, host_params, param_groups

    model = build_model(seed=1)
    model.frozen_shift.requires_grad_(True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (master, _, _) in states.items():
            params[name].copy_(master)
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2, eps=1e-8)
    for name, (_, exp_avg, exp_avg_sq) in states.items():
        opt.state[params[name]] = {"step": torch.tensor(step), "exp_avg": exp_avg.clone(),
                                   "exp_avg_sq": exp_avg_sq.clone()}
    for step_index in range(2):
        tokens, targets = global_batch(step_index, 2, 1)
        opt.zero_grad()
        model(tokens[0].reshape(-1, SEQ), targets[0].reshape(-1, SEQ)).backward()
        for param in params.values():  # no gradient: steps with zeros, as the engine
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    return host_params(model)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_parameter_frozen_when_saved_trains_on_from_its_saved_values(stage):
    """Kept whole when saved (model_states: every frozen parameter at stages 0-2, and
    frozen_shift at 3) or partitioned (fc1 at stage 3, the frozen shards), a parameter that
    trains now loads its saved values with zero moments, the others their saved state, and
    trains on as torch AdamW started from that state does, and as at stage 3."""
    unfrozen = {"fc1.weight", "fc1.bias", "frozen_shift"}
    result = _results()[0]["unfrozen"][stage]
    assert result["loaded"] == "ok", result["loaded"]
    kept = "frozen" if stage == 3 else "state"
    assert [result["sources"][k] for k in ("fc1.weight", "fc1.bias", "frozen_shift")] == \
        [kept, kept, "state"]
    saved = result["saved"]
    assert set(result["steps"]) == set(saved["steps"]) == {2.0}
    for name, (master, exp_avg, exp_avg_sq) in result["states"].items():
        if name in unfrozen:
            assert torch.equal(master, saved["params"][name]), name
            assert not exp_avg.any() and not exp_avg_sq.any(), name
        else:
            for got, want in zip((master, exp_avg, exp_avg_sq), saved["states"][name]):
                assert torch.equal(got, want), name
    want = _adamw_from(result["states"], saved["steps"][0])
    for name, value in result["trained"].items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(value, _results()[0]["unfrozen"][3]["trained"][name],
                                   rtol=1e-5, atol=1e-6, msg=name)
    assert _results()[1]["unfrozen"][stage]["loaded"] == "ok"


# -- `latest`'s temporaries ----------------------------------------------------------------------
def _temporaries(listing: list[str]) -> list[str]:
    return [name for name in listing if name.startswith("latest.tmp.")]


def test_no_temporary_of_latest_outlives_a_save():
    for rank, result in enumerate(_each("latest_tmp", "normal")):
        # (the lock: rank 0 may not have released it yet when rank 1 lists)
        assert [n for n in result if not n.startswith(".")] == ["first", "latest"], rank
    left = _results()[0]["latest_tmp"]["left"]
    assert len(_temporaries(left)) == 2, left
    # A load goes by `latest` alone; the next save removes what the interrupted one left.
    for rank, result in enumerate(_results()):
        assert result["latest_tmp"]["load"] == ("ok", []), (rank, result["latest_tmp"]["load"])
        assert result["latest_tmp"]["save"][0] == "ok"
        assert _temporaries(result["latest_tmp"]["after_save"]) == [], rank
    seen = _results()[0]["latest_tmp"]["save"][1]
    assert any("removed" in w and all(n in w for n in _temporaries(left)) for w in seen), seen
    # A rename of `latest` that fails: an error on every rank, and no temporary left.
    _on_every_rank("latest_tmp", "failed_rename", "Input/output error")
    for rank, result in enumerate(_each("latest_tmp", "after_failed_rename")):
        assert _temporaries(result) == [], (rank, result)


# -- load_weights from files without checksums ------------------------------------------------
@pytest.mark.parametrize("case, words", [
    ("unknown_dtype", ["'frozen_shift'", "has dtype F17, which zero_ext does not read"]),
    ("wrong_dtype", ["header of", "is corrupt", "'frozen_shift' is F16 of shape [24] (48 bytes)",
                     "span 96 bytes"]),
    ("truncated", ["is truncated"]),
    ("complex", ["frozen_shift in", "complex64 there and float32 here", "imaginary parts"]),
])
def test_load_weights_refuses_a_corrupt_unchecksummed_file_before_writing(case, words):
    _on_every_rank("weights", case, *words)
    assert all(_each("weights", case + "_unchanged"))
    assert _each("weights", "good") == ["ok", "ok"]


# -- compressed communication's state saved with one method, loaded with another ----------------
def test_compression_switch_drops_what_has_no_place_before_writing_and_keeps_the_residuals():
    """top-k with momentum saved, int8 error feedback loaded: the momentum (int8 keeps none)
    is dropped with one warning naming both methods, decided before anything is written (it
    raised half way, the weights already loaded); the undelivered gradient mass carries
    over within fp8's rounding."""
    results = _results()
    for rank, result in enumerate(_each("switch", "int8")):
        outcome, seen = result
        assert outcome == "ok", (rank, outcome)
        named = [w for w in seen if "top-k momentum" in w]
        if rank == 0:
            assert len(named) == 1, seen
            for words in ("top-k (momentum 0.9)", "int8 with error feedback",
                          "keeps no momentum", "residuals (undelivered gradient) are kept"):
                assert words in named[0], (words, named[0])
        else:
            assert named == [], seen
    for rank, result in enumerate(results):
        switch = result["switch"]
        assert switch["int8_steps"] == 3 and switch["int8_trains"] == "ok"
        for name, value in switch["saved_params"].items():
            assert torch.equal(switch["int8_params"][name], value), (rank, name)
        saved, loaded = switch["saved_mass"], switch["int8_mass"]
        assert set(saved) == set(loaded) and any(m.abs().sum() > 0 for m in saved.values())
        for bucket, mass in saved.items():
            error = (loaded[bucket] - mass).norm() / mass.norm().clamp_min(1e-30)
            assert error < 0.07, (rank, bucket, float(error))


def test_resharded_compression_totals_are_checked_before_anything_is_written():
    # Every rank reads every shard's totals when the method (or world size) changed; one a
    # shard lacks was found only half way through the load.
    _on_every_rank("switch", "no_total", "zero_shard_00001_of_00002.safetensors",
                   "lacks the compression totals ['0.ef_total']")
    assert all(_each("switch", "no_total_unchanged"))


# -- a client_state that is plain data and torch.save still cannot write --------------------------
@pytest.mark.parametrize("case, words", [
    ("deep", ["client_state", "nested deeper than Python's recursion limit",
              "store it flatter"]),
    ("mkldnn", ["client_state['v'] is a torch._mkldnn tensor", "torch.save cannot write",
                ".to_dense()"]),
])
def test_unwritable_client_state_is_refused_on_every_rank_and_training_goes_on(case, words):
    if case == "mkldnn" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no mkldnn")
    _on_every_rank("unwritable", case, "rank 0: engine_state.pt", *words, "Nothing was written")
    assert _each("unwritable", case)[0] == _each("unwritable", case)[1]
    # Nothing written, and the ranks' collectives still line up: they train and save on.
    assert _each("unwritable", "listing") == [[], []]
    assert _each("unwritable", "trained_on") == ["ok", "ok"]
    assert _each("unwritable", "saved_after") == ["ok", "ok"]


# -- dtypes the safetensors format holds ----------------------------------------------------------
def _safetensors_dtypes() -> dict:
    """name -> torch dtype of every dtype safetensors' own torch reader maps (its _TYPES), and
    F8_E8M0, which its save_file and load_file take too (0.8)."""
    from safetensors import torch as safetensors_torch

    extra = {"F8_E8M0": getattr(torch, "float8_e8m0fnu", None)}
    return {name: dtype for name, dtype in {**safetensors_torch._TYPES, **extra}.items()
            if dtype is not None}


def _sample(dtype: torch.dtype) -> torch.Tensor:
    values = torch.tensor([[0.5, 2.0, -1.0], [3.0, 0.25, 1.0]])
    if dtype.is_complex:
        return torch.complex(values, -values).to(dtype)
    if dtype == torch.bool:
        return values > 0.6
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.tensor([[1, 2, 3], [60000, 0, 7]], dtype=torch.int64).to(dtype)
    if not dtype.is_floating_point:
        return values.abs().to(torch.int64).to(dtype)
    return values.abs().to(dtype) if "e8m0" in str(dtype) else values.to(dtype)


@pytest.mark.parametrize("name, dtype", sorted(_safetensors_dtypes().items()))
def test_every_safetensors_dtype_round_trips_with_the_safetensors_library(name, dtype, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from zero_ext.checkpoint.files import SafetensorsReader, TensorEntry, write_safetensors

    tensor = _sample(dtype)
    ours = tmp_path / "ours.safetensors"
    write_safetensors(str(ours), [TensorEntry("x", dtype, tuple(tensor.shape), lambda: tensor)])
    with safe_open(str(ours), "pt") as f:
        assert f.get_slice("x").get_dtype() == name
    back = load_file(str(ours))["x"]
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))
    theirs = tmp_path / "theirs.safetensors"
    save_file({"x": tensor}, str(theirs))
    reader = SafetensorsReader(str(theirs))
    got = reader.read("x")
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))
    part = torch.empty(2, dtype=dtype)
    reader.read_into("x", 3, part)
    assert torch.equal(part.view(torch.uint8), tensor.reshape(-1)[3:5].view(torch.uint8))


def test_dtypes_safetensors_lacks_are_refused_saying_so(tmp_path):
    from zero_ext.checkpoint.files import TensorEntry, write_safetensors

    def refusal(dtype) -> str:
        with pytest.raises(TypeError) as error:
            write_safetensors(str(tmp_path / "x.safetensors"),
                              [TensorEntry("freqs", dtype, (2,), lambda: None)])
        return str(error.value)

    message = refusal(torch.complex128)
    for words in ("freqs has dtype torch.complex128", "the safetensors format has no type for",
                  "complex64", "uint16", "torch.view_as_real", "persistent=False"):
        assert words in message, (words, message)
    if hasattr(torch, "float4_e2m1fn_x2"):  # the format has F4, counted in 4-bit values
        message = refusal(torch.float4_e2m1fn_x2)
        assert "no type" not in message and "view(torch.uint8)" in message, message
    assert not list(tmp_path.iterdir())


def test_buffers_of_every_written_dtype_checkpoint_load_and_consolidate(tmp_path):
    """A complex64 rotary table (and uint16, uint64, float8_e4m3fnuz buffers): saved, loaded,
    written by save_16bit_model, read back by load_weights, consolidated; into a model that
    keeps the table real, refused before anything is written (the imaginary parts would go)."""
    from safetensors.torch import load_file

    results = _results()
    for rank, result in enumerate(results):
        dtypes = result["dtypes"]
        for key in ("save", "load", "weights"):
            assert dtypes[key] == "ok", (rank, key, dtypes[key])
        assert dtypes["model_save"][0] == "ok", dtypes["model_save"]
        saved = dtypes["buffers"]
        assert {v.dtype for v in saved.values()} >= {
            torch.complex64, torch.uint16, torch.uint64, torch.float8_e4m3fnuz}
        for loaded in (dtypes["loaded"], dtypes["weights_loaded"]):
            for key, value in saved.items():
                assert loaded[key].dtype == value.dtype, (rank, key)
                assert torch.equal(loaded[key].view(torch.uint8), value.view(torch.uint8)), key
    _on_every_rank("dtypes", "real", "freqs_cis cannot be loaded",
                   "complex64 there and float32 here", "imaginary parts would be lost")
    assert all(_each("dtypes", "real_unchanged"))
    out = tmp_path / "model.safetensors"
    consolidate(os.path.join(_root(), "dtypes", "ck", "t"), out)
    tensors = load_file(out)
    for key, value in results[0]["dtypes"]["buffers"].items():
        assert tensors[key].dtype == value.dtype, key
        assert torch.equal(tensors[key].view(torch.uint8), value.view(torch.uint8)), key


# -- trainable parameters that differ between the checkpoint and the model -----------------------
@pytest.mark.parametrize("strict", [True, False])
def test_renamed_parameters_are_named_on_both_sides_with_a_way_out_that_works(strict):
    _on_every_rank("mismatch", f"renamed_{strict}",
                   "in the checkpoint, not in the model: ['fc1.bias', 'fc1.weight']",
                   "in the model, not in the checkpoint: ['fc1_renamed.bias', "
                   "'fc1_renamed.weight']", "load_module_strict=False cannot fill",
                   "give renamed parameters their saved names", "zero_ext.consolidate(",
                   "rename its keys", "engine.load_weights")
    assert all(_each("mismatch", "renamed_unchanged"))
    # The way out the error gives loads the saved weights under the new names.
    for rank, result in enumerate(_results()):
        mismatch = result["mismatch"]
        assert mismatch["renamed_fix"] == "ok", (rank, mismatch["renamed_fix"])
        for name, value in mismatch["saved"].items():
            name = name.replace("fc1.", "fc1_renamed.")
            assert torch.equal(mismatch["renamed_params"][name], value), (rank, name)


@pytest.mark.parametrize("strict", [True, False])
def test_untied_parameter_is_named_as_tied_in_the_checkpoint(strict):
    _on_every_rank("mismatch", f"untied_{strict}",
                   "in the model, not in the checkpoint: ['head.weight']",
                   "head.weight trains on its own in this model but was tied to embed.weight "
                   "when saved (the checkpoint holds it once, as embed.weight)",
                   "tie head.weight to embed.weight again", "zero_ext.consolidate(",
                   "engine.load_weights")
    assert all(_each("mismatch", "untied_unchanged"))
    for rank, result in enumerate(_results()):
        mismatch = result["mismatch"]
        assert mismatch["untied_fix"] == "ok", (rank, mismatch["untied_fix"])
        params, saved = mismatch["untied_params"], mismatch["saved"]
        assert torch.equal(params["head.weight"], saved["embed.weight"]), rank
        for name, value in saved.items():
            assert torch.equal(params[name], value), (rank, name)
