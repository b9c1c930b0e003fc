"""benchmarks/gpu_check.sh, the one prepared call a GPU session gets, checked here on CPU so that
its minutes go to the GPU: the script's plan fits the deadline, its CUDA-test selection misses no
CUDA test, bench_step.py runs its rows and counts MFU right, and the world-size-2 parity script
passes over gloo (and falls back to it when NCCL cannot start)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
# The priority order; bench_step runs last, on whatever time is left.
STEPS = ["machine", "build", "env", "cuda_tests", "nccl_parity", "adamw_cuda", "adamw_cpu16",
         "quant_cuda", "bench_zero", "sanitizer", "bench_step", "fused_cuda"]


def _gpu_check(tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[tuple[str, str, int]]]:
    """A dry run (nothing executed); its closing table as (step, status, seconds)."""
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_ONLY": "", "GPU_CHECK_BUDGET": "480",
           **env}
    result = subprocess.run(["bash", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=60, env=env, check=False)
    table = re.findall(r"^(\w+) +(.+?) +(\d+) s$", result.stdout, flags=re.MULTILINE)
    return result, [(name, status, int(seconds)) for name, status, seconds in table]


def _planned(table) -> dict[str, int]:
    """The steps a dry run's table plans, with their timeouts."""
    return {name: seconds for name, status, seconds in table if status == "planned"}


def test_gpu_check_parses_and_its_worst_case_fits_the_deadline(tmp_path):
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    # The first call, with the extension gpu_prebuild.sh built (its record matches): every
    # step of the list fits even if each used its whole timeout, the training
    # benchmark and issue 18's GPU figures included.
    result, table = _gpu_check(tmp_path / "first", GPU_CHECK_PREBUILT=_prebuilt(tmp_path))
    assert [name for name, _, _ in table] == STEPS, result.stdout
    assert all(status == "planned" and seconds > 0 for _, status, seconds in table), table
    assert sum(seconds for _, _, seconds in table) <= 480, table
    assert re.search(r"== gpu_check: (\d+) s of 480", result.stdout)
    assert (tmp_path / "first" / "summary.txt").read_text() in result.stdout
    # Building there instead (no extension, or one that does not match or load) costs up to
    # 165 s: the two benchmarks on the time left are then left to the rerun.
    result, table = _gpu_check(tmp_path / "building")
    planned = _planned(table)
    assert list(planned) == STEPS[:-2] and planned["build"] == 165, table
    assert sum(planned.values()) <= 480, table
    # The summary comes last (the device tool returns only the output's last 12,000
    # characters): the table, then the rerun of what did not run or failed.
    lines = result.stdout.rstrip().splitlines()
    for line, step in zip(lines[-3:-1], STEPS[-2:]):
        assert line.startswith(f"{step} ") and "SKIPPED" in line, lines[-3:]
    assert lines[-1] == ('rerun (fresh machine, timeout_s 200): GPU_CHECK_ONLY=build,bench_step,'
                         'fused_cuda GPU_CHECK_BUDGET=170 bash benchmarks/gpu_check.sh "$OUT"'), \
        lines[-1]


def test_gpu_check_skips_what_the_deadline_leaves_no_room_for_and_reruns_a_selection(tmp_path):
    result, table = _gpu_check(tmp_path / "short", GPU_CHECK_BUDGET="250")
    status = {name: s for name, s, _ in table}
    assert status["build"] == "planned" and status["sanitizer"] == "SKIPPED (deadline)", table
    assert sum(seconds for _, _, seconds in table) <= 250
    assert "== sanitizer: SKIPPED" in result.stdout and result.returncode == 1
    result, table = _gpu_check(tmp_path / "rerun", GPU_CHECK_ONLY="build,nccl_parity")
    assert [name for name, s, _ in table if s == "planned"] == ["build", "nccl_parity"], table
    # A rerun with the extension the first run brought back: the build step only puts it in
    # place (selected whether named or not), leaving the budget to the steps named.
    prebuilt = _prebuilt(tmp_path)
    # (folder, GPU_CHECK_ONLY, budget, the steps planned, a line of the command shown): the
    # rerun; issue 15's rows and the stall watch over NCCL, run only when named.
    for folder, only, budget, planned, shown in (
            ("prebuilt", "nccl_parity", "170", {"build": 10, "nccl_parity": 55}, ""),
            ("offload", "offload_b16,offload_13b", "560",
             {"build": 10, "offload_b16": 250, "offload_13b": 160},
             "--model 13b --batch 8 --ratio 0.6"),
            ("deepspeed", "offload_ds", "560", {"build": 10, "offload_ds": 300}, ""),
            ("stall", "nccl_stall", "170", {"build": 10, "nccl_stall": 90},
             "ZERO_EXT_TEST_UNBOUNDED_BACKEND=nccl")):
        result, table = _gpu_check(tmp_path / folder, GPU_CHECK_ONLY=only,
                                   GPU_CHECK_PREBUILT=prebuilt, GPU_CHECK_BUDGET=budget)
        assert _planned(table) == planned, table
        assert shown in result.stdout
    result, table = _gpu_check(tmp_path / "default")
    assert not [name for name, _, _ in table if name.startswith("offload_")
                or name == "nccl_stall"], table
    # Run for real where the GPU is smaller than an H200 (here: none), the rows are skipped
    # with the reason, not run out of memory.
    result, table = _gpu_check(tmp_path / "small", GPU_CHECK_DRY="0",
                               GPU_CHECK_ONLY="offload_b16,offload_13b,offload_ds")
    for row in ("offload_b16", "offload_13b", "offload_ds"):
        assert (row, "SKIPPED (GPU memory)", 0) in table, table
    assert "== offload_b16: SKIPPED: it needs an H200" in result.stdout


def _prebuilt(folder, root=ROOT, **record_changes) -> str:
    """An extension file with the record gpu_prebuild.sh writes beside it (for the tree at
    `root` and the torch of the script's python3), with `record_changes` made to the record."""
    path = folder / "_C.abi3.so"
    path.write_bytes(b"")
    subprocess.run(["python3", os.path.join(root, "benchmarks", "extension_digest.py"),
                    "--record", f"{path}.json"], check=True, capture_output=True)
    record = json.loads((folder / "_C.abi3.so.json").read_text())
    (folder / "_C.abi3.so.json").write_text(json.dumps({**record, **record_changes}))
    return str(path)


def test_gpu_check_builds_instead_of_using_an_extension_built_from_other_sources(tmp_path):
    """An extension brought along is used only where its record matches the tree and the torch
    it would run with: a stale one (sources changed since) or one for another torch is never
    loaded; the build step builds, with its full timeout, and the summary says why."""
    one = {"GPU_CHECK_ONLY": "nccl_parity", "GPU_CHECK_BUDGET": "480"}
    for folder, changes, why in [
            ("stale", {"sources": "0123456789abcdef"}, "built from sources '0123456789abcdef'"),
            ("torch", {"torch": "2.10.0+cu128 (CUDA 12.8)"}, "built from torch '2.10.0+cu128"),
            ("unrecorded", None, "its record")]:
        (tmp_path / folder).mkdir()
        prebuilt = _prebuilt(tmp_path / folder, **(changes or {}))
        if changes is None:
            os.remove(f"{prebuilt}.json")
        result, table = _gpu_check(tmp_path / folder / "out", GPU_CHECK_PREBUILT=prebuilt, **one)
        planned = _planned(table)
        assert planned == {"build": 165, "nccl_parity": 55}, (folder, table)
        assert f"not using {prebuilt}: the extension does not match" in result.stdout, folder
        assert why in result.stdout, (folder, result.stdout)
    # The matching one is put in place: a copy, 10 s at most.
    result, table = _gpu_check(tmp_path / "out", GPU_CHECK_PREBUILT=_prebuilt(tmp_path), **one)
    assert {name: seconds for name, s, seconds in table if s == "planned"} == \
        {"build": 10, "nccl_parity": 55}, table
    assert "not using" not in result.stdout


def test_gpu_check_builds_where_a_matching_extension_does_not_load(tmp_path):
    """A record that matches is not enough: an extension built on another machine's image may
    not load on the GPU machine's. The script imports it once and builds where that fails.
    Run for real (not dry) in a copy of the tree, with an extension file that is no library:
    the build step then builds (the copy's setup.py only says so and fails, whatever torch
    runs this: a CUDA build of torch would otherwise compile for minutes)."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "tests", "examples", "docs", "build", "gpu_runs", "*.so", "*.o", "__pycache__"))
    (tree / "setup.py").write_text("import sys\nsys.exit('setup.py: building')\n")
    (tmp_path / "ext").mkdir()
    prebuilt = _prebuilt(tmp_path / "ext", root=str(tree))
    result = subprocess.run(
        ["bash", str(tree / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "GPU_CHECK_ONLY": "none", "GPU_CHECK_PREBUILT": prebuilt,
             "GPU_CHECK_DRY": "0", "GPU_CHECK_BUDGET": "480"})
    assert f"not using {prebuilt}: it does not load here (" in result.stdout, result.stdout
    assert "compiled core (zero_ext._C) failed to load" in result.stdout, result.stdout
    assert re.search(r"\[gpu_check\] \d+ s: build \(timeout 165 s\): build_extension",
                     result.stdout), result.stdout
    assert re.search(r"^build +FAILED", result.stdout, flags=re.MULTILINE), result.stdout
    assert "setup.py: building" in result.stdout, result.stdout
    assert not (tree / "zero_ext" / "_C.abi3.so").exists()  # not left for the steps after
    # The import's log travels in the logs' archive (the device tool brings back few files).
    with tarfile.open(tmp_path / "out" / "logs.tar") as logs:
        assert "logs/prebuilt_load.log" in logs.getnames()
    assert not (tmp_path / "out" / "logs" / "prebuilt_load.log").exists()


def test_cuda_test_selection_collects_every_cuda_test(tmp_path):
    """Collected here as on a GPU (torch.cuda.is_available() answers True to the test modules,
    so their DEVICES lists and skipif marks read as they do there): every test with a cuda
    marker, a cuda parameter or a GPU skip condition must be among those gpu_check.sh selects."""
    with open(SCRIPT) as f:
        expression = re.search(r"^CUDA_TESTS='(.+)'$", f.read(), flags=re.MULTILINE).group(1)
    collector = r'''
import json, os, sys, torch
tests = os.path.join(os.getcwd(), "tests") + os.sep
real = torch.cuda.is_available
torch.cuda.is_available = lambda: sys._getframe(1).f_code.co_filename.startswith(tests) or real()
import pytest

def needs_cuda(item):
    params = getattr(item, "callspec", None)
    values = params.params.values() if params else ()
    reasons = [str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")]
    return (item.get_closest_marker("cuda") is not None
            or any(str(v) == "cuda" or getattr(v, "type", None) == "cuda" for v in values)
            or any("GPU" in r or "CUDA" in r for r in reasons))

class Everything:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items):
        self.ids = [i.nodeid for i in items if needs_cuda(i)]

class Selected:
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        self.ids = [i.nodeid for i in items]

everything, selected = Everything(), Selected()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests/", "-k",
                    sys.argv[1]], plugins=[everything, selected])
json.dump({"code": int(code), "cuda": everything.ids, "selected": selected.ids},
          open(sys.argv[2], "w"))
'''
    out = tmp_path / "collected.json"
    run = subprocess.run([sys.executable, "-c", collector, expression, str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    # A test module that does more with CUDA at import than ask whether it is there fails to
    # collect here: the output says which.
    assert run.returncode == 0 and json.loads(out.read_text())["code"] == 0, run.stdout[-3000:]
    collected = json.loads(out.read_text())
    cuda, selected = set(collected["cuda"]), set(collected["selected"])
    # The kernels' CUDA parametrizations and the -m cuda tests are all there (hundreds).
    assert len(cuda) > 300 and any("[cuda" in i or "-cuda" in i for i in cuda), len(cuda)
    assert cuda <= selected, sorted(cuda - selected)[:20]
    # ...and nothing that needs no GPU beyond names mentioning it (no nvcc compile checks).
    assert not [i for i in selected if "test_cuda_sources" in i]


def test_bench_step_tiny_runs_every_row_and_counts_mfu_analytically(tmp_path):
    out = tmp_path / "step.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_step.py"), "--tiny",
                    "--steps", "2", "--json", str(out)], check=True, capture_output=True,
                   timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    report = json.loads(out.read_text())
    shape, seq = report["shape"], report["seq"]
    h, inter, layers, vocab = (shape[k] for k in ("hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "vocab_size"))
    # Untied embedding and head, q/k/v/o (as many key-value heads as heads), gate/up/down, two
    # RMSNorms per layer and the final one.
    params = 2 * vocab * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    assert report["params"] == params
    rows = {r["impl"]: r for r in report["rows"]}
    assert list(rows) == ["torch", "fsdp2", "zero_ext_s2", "zero_ext_s3"]
    ran = {impl: r for impl, r in rows.items() if "skipped" not in r}
    assert {"torch", "zero_ext_s2", "zero_ext_s3"} <= ran.keys(), rows
    first = ran["torch"]["first_loss"]
    for impl, r in ran.items():
        seconds = r["s_per_step"]
        assert abs(r["tokens_per_s"] * seconds - report["batch"] * seq) < 1e-6 * seq
        peak = 989e12
        assert abs(r["mfu"] - 6 * params * r["tokens_per_s"] / peak) <= 1e-12, impl
        attention = 12 * layers * h * seq
        assert abs(r["mfu_attention"] - (6 * params + attention) * r["tokens_per_s"] / peak) \
            <= 1e-12, impl
        # Same seeded model, same tokens: the same first loss (bf16 rounding apart), and a step
        # that trains.
        assert abs(r["first_loss"] - first) < 1e-2 * first and r["last_loss"] < r["first_loss"]
    for impl in ("torch", "fsdp2", "zero_ext_s2"):  # freed before the next row starts
        assert impl not in ran or ran[impl]["released"], impl


def test_nccl_parity_script_falls_back_to_gloo_and_passes_at_two_ranks(tmp_path):
    out = tmp_path / "parity.json"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_nccl_parity.py"),
                             "--backends", "nccl,gloo", "--timeout", "240", "--json", str(out)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    attempts = json.loads(out.read_text())
    if not torch.cuda.is_available():  # NCCL cannot start without a GPU: gloo takes over
        assert attempts[0]["backend"] == "nccl" and not attempts[0]["ran"], attempts[0]
    last = attempts[-1]
    assert last["ran"] and len(last["cases"]) == 7 + 4 + 2, last  # compression 4, MoE 2
    assert set(last["cases"].values()) == {"pass"}, last["cases"]
    assert f"parity over {last['backend']}: PASS" in result.stdout
