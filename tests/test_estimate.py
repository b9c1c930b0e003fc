"""zero_ext.estimate: exact against the engine's own accounting, the formulas against hand
arithmetic, the command line and its advice on bad input.

One process group per world size builds an engine for every case (start-up dominates on 2
cores); the per-case tests read its results.
"""

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from zero_ext.estimate import estimate, estimate_from_config, host_bytes_needed, main, parse_count

import estimate_cases
from dist_harness import run_group

CASES = [(stage, dtype, acc, None, None) for stage in (0, 1, 2, 3)
         for dtype in ("fp32", "bf16") for acc in (1, 2)]
# A bf16 model reducing gradients in fp32 (communication_data_type).
CASES += [(0, "bf16", 2, "fp32", None), (3, "bf16", 1, "fp32", None)]
OFFLOAD_CASES = [(1, "fp32", 2, None, "optimizer"), (2, "bf16", 2, None, "optimizer"),
                 (3, "bf16", 1, None, "optimizer"), (3, "fp32", 1, None, "both"),
                 (3, "bf16", 2, None, "both"),
                 # offload_param alone: the units' optimizer state (and staging) on the device.
                 (3, "fp32", 1, None, "param"), (3, "bf16", 1, None, "param"),
                 # offload_optimizer.ratio: half the optimizer state on the host.
                 (2, "bf16", 1, None, "ratio"), (3, "fp32", 2, None, "ratio")]
# Compressed communication's state: error feedback at stages 1-3, top-k at 0-2.
COMPRESSION_CASES = [(1, "bf16", 2, None, None, "int8_ef"), (3, "bf16", 1, None, None, "int8_ef"),
                     (2, "fp32", 1, None, None, "int4"), (0, "bf16", 1, None, None, "topk"),
                     (2, "bf16", 2, None, None, "topk_no_momentum")]
# data_types.grad_accum_dtype fp32: stages 0-1 hold padded fp32 windows between boundaries.
ACCUM_CASES = [(0, "bf16", 2, None, None, "fp32_accum"), (1, "bf16", 2, None, None, "fp32_accum")]
GiB = 2**30


@functools.cache
def _measured(world_size):
    return run_group(world_size, estimate_cases.estimate_cases,
                     CASES + OFFLOAD_CASES + COMPRESSION_CASES + ACCUM_CASES)


@pytest.mark.parametrize("case", COMPRESSION_CASES, ids=lambda c: f"stage{c[0]}-{c[5]}")
def test_compression_state_estimate_equals_the_engine(case):
    for rank, results in enumerate(_measured(3)):
        result = results[case]
        est = result["estimate"]
        held = result["after_step"].get("compression", 0)
        assert est.device.compression == held, (rank, est.device.compression, held)
        # The rest is what the same engine holds without compression.
        for kind in ("params", "master", "exp_avg", "exp_avg_sq"):
            assert getattr(est.device, kind) == result["after_step"][kind], (rank, kind)
    stage, method = case[0], case[5]
    est = _measured(3)[0][case]["estimate"]
    padded = est.padded_numel
    if method == "int4":  # no error feedback: nothing kept
        assert est.device.compression == 0
    elif method == "int8_ef":  # 1 byte per element, 4 per chunk (3 ranks) per bucket
        assert padded < est.device.compression < padded + 4 * 3 * 64
    else:  # fp32 residual (+ momentum) (+ stage 0's owned chunk)
        copies = 2 if method == "topk" else 1
        assert est.device.compression == 4 * copies * padded + (
            4 * padded // 3 if stage == 0 else 0)
    assert _measured(1)[0][case]["estimate"].device.compression == 0  # one rank sends nothing


def _case_id(case):
    stage, dtype, acc, comm, offload = case
    return f"stage{stage}-{dtype}-acc{acc}-comm{comm or dtype}" + (
        f"-offload_{offload}" if offload else "")


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("case", CASES + ACCUM_CASES,
                         ids=[_case_id(c[:5]) + "".join(f"-{x}" for x in c[5:])
                              for c in CASES + ACCUM_CASES])
def test_estimate_equals_engine_memory_breakdown(world_size, case):
    for rank, results in enumerate(_measured(world_size)):
        result = results[case]
        est = result["estimate"]
        assert result["same_for_real_model"], "meta and real models must estimate the same"
        assert est.host.total == 0
        # Parameters, fp32 master weights and Adam moments: after engine.step(), between steps.
        for kind in ("params", "master", "exp_avg", "exp_avg_sq"):
            assert getattr(est.device, kind) == result["after_step"][kind], (rank, kind)
        # Gradients: the most held right after any engine.backward of a step, before its
        # engine.step() (stage 0/1 between boundaries hold whole .grad, the boundary holds the
        # reduced buckets or shards; stage 2/3 the shard, fp32 when accumulating).
        assert est.device.grads == max(result["grads"]), (rank, result["grads"])
        assert est.device.frozen == result["frozen"], rank


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("case", OFFLOAD_CASES, ids=[_case_id(c) for c in OFFLOAD_CASES])
def test_offload_estimate_equals_engine_memory_by_location(world_size, case):
    for rank, results in enumerate(_measured(world_size)):
        result = results[case]
        est = result["estimate"]
        # After engine.step(): each kind wherever it lives, and the host total the engine
        # reports (optimizer state, gradient copies, upload buffers, parameter shards).
        for kind in ("params", "master", "exp_avg", "exp_avg_sq", "offload_buffers"):
            expected = getattr(est.device, kind) + getattr(est.host, kind)
            assert expected == result["after_step"].get(kind, 0), (rank, kind)
        assert est.host.total == result["by_location"]["host"], rank
        assert est.device.grads == max(result["grads"]), (rank, result["grads"])


@pytest.mark.parametrize("world_size", [1, 3])
def test_stage3_gathered_bound_holds_inside_forward_and_backward(world_size):
    for result in _measured(world_size):
        for case, measured in result.items():
            if case[0] != 3:
                continue
            est = measured["estimate"]
            width = 2 if case[1] == "bf16" else 4
            assert est.largest_unit_numel == measured["largest_unit"]
            # Parameter bytes seen from hooks during both steps: the resident shards and
            # whole-kept buckets, plus at most the estimate's gathered units. The prefetch
            # budget is smaller than every block, so the next block alone is gathered ahead:
            # the bound is the largest unit plus the largest other one, and the largest unit
            # with the block prefetched beside it was indeed held at some point.
            resident = est.device.params + est.host.params  # shards on the host: offload
            extra = max(measured["params_seen"]) - resident
            assert est.device.gathered == width * (est.largest_unit_numel
                                                   + measured["second_unit"])
            assert width * est.largest_unit_numel < extra <= est.device.gathered, case


def _paper(stage, world_size, psi, *, width=2, accumulation=1):
    """DESIGN.md's table, written out: (params, grads, master, exp_avg, exp_avg_sq)."""
    n = world_size
    master = 4 * psi if width == 2 else 0
    if stage == 0:
        return width * psi, width * psi, master, 4 * psi, 4 * psi
    state = (master // n, 4 * psi // n, 4 * psi // n)
    if stage == 1:
        return (width * psi, width * psi if accumulation > 1 else width * psi // n) + state
    grads = 4 * psi // n if accumulation > 1 else width * psi // n
    return (width * psi if stage == 2 else width * psi // n, grads) + state


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype, width", [("bf16", 2), ("fp32", 4)])
@pytest.mark.parametrize("accumulation", [1, 4])
def test_formulas_for_7b_on_8_ranks(stage, dtype, width, accumulation):
    # 7e9 = 14 buckets of 5e8 elements, each a multiple of 8 ranks * 16: no padding, so the
    # numbers are the paper's exactly.
    psi = 7 * 10**9
    est = estimate(psi, stage=stage, world_size=8, dtype=dtype,
                   gradient_accumulation_steps=accumulation)
    d = est.device
    assert (d.params, d.grads, d.master, d.exp_avg, d.exp_avg_sq) == _paper(
        stage, 8, psi, width=width, accumulation=accumulation)
    assert est.padded_numel == psi and not est.exact


def test_formula_totals_in_gib_for_7b_bf16_on_8_ranks():
    totals = [estimate(7 * 10**9, stage=s, world_size=8).device.total for s in range(3)]
    # 16 bytes per parameter; 2 + 2 + 12/8; 2 + (2 + 12)/8 (grads and state sharded).
    assert totals == [112 * 10**9, 26.25 * 10**9, 26.25 * 10**9]
    accumulating = estimate(7 * 10**9, stage=1, world_size=8, gradient_accumulation_steps=4)
    assert accumulating.device.total == 38.5 * 10**9  # 2 + 2 + 12/8: the paper's stage 1
    # Stage 3: 16/8 bytes per parameter, plus the largest unit (0.2B) and the next one, which
    # is gathered ahead though it exceeds the prefetch budget (DeepSpeed's default 5e7
    # elements), at most as large, in bf16.
    stage3 = estimate(7 * 10**9, stage=3, world_size=8, largest_unit=parse_count("0.2B"))
    assert stage3.device.total == 14 * 10**9 + 2 * (2 * 10**8 + 2 * 10**8)


def test_bucket_padding_of_a_bare_count():
    # 1000 elements on 3 ranks: one bucket padded to a multiple of 3 * 16 = 48, i.e. 1008.
    est = estimate(1000, stage=2, world_size=3, dtype="fp32")
    assert est.padded_numel == 1008
    assert est.device.grads == 4 * 336 and est.device.exp_avg == 4 * 336
    assert est.device.params == 4 * 1008


def test_offload_moves_optimizer_state_and_param_shards_to_the_host():
    psi, n = 7 * 10**9, 8
    est = estimate(psi, stage=2, world_size=n, offload_optimizer=True)
    assert (est.host.master, est.host.exp_avg, est.host.exp_avg_sq) == (4 * psi // n,) * 3
    assert est.device.master == est.device.exp_avg == est.device.exp_avg_sq == 0
    # The device keeps the bf16 parameters only: each gradient shard is copied to the host
    # and freed during backward.
    assert est.device.total == 2 * psi and est.device.grads == 0
    assert est.host.total == 14 * psi // n
    # An fp32 model's master weights alias it on the device, but not across to the host.
    assert estimate(psi, stage=2, world_size=n, dtype="fp32",
                    offload_optimizer=True).host.master == 4 * psi // n
    # Host buffers for the CPU step: a bf16 copy of the gradient shard, in which the new bf16
    # weights then go back to the device ...
    assert est.host.offload_buffers == 2 * psi // n
    # ... except when the gradients accumulate in fp32: a separate bf16 upload buffer.
    accumulated = estimate(psi, stage=2, world_size=n, offload_optimizer=True,
                           gradient_accumulation_steps=4)
    assert accumulated.host.offload_buffers == 4 * psi // n + 2 * psi // n
    both = estimate(psi, stage=3, world_size=n, offload_optimizer=True, offload_param=True)
    # The parameter shards live on the host, so no upload buffer: 2 + 12 + 2 bytes per
    # parameter, over 8 ranks.
    assert both.host.total == 16 * psi // n and both.device.params == 0
    config = {"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}
    assert host_bytes_needed(psi, config, n) == 16 * psi // n
    assert host_bytes_needed(psi, {"zero_optimization": {"stage": 3}}, n) == 0


def test_stage3_prefetch_counts_the_next_unit_and_units_that_fit_its_budget():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 32, bias=False),
                              nn.Linear(32, 64, bias=False))
    # Units of 256, 512 and 2048 elements, one rank (no padding beyond 16s), fp32.
    def gathered(prefetch):
        return estimate(model, stage=3, world_size=1, dtype="fp32",
                        stage3_param_persistence_threshold=0,
                        stage3_prefetch_bucket_size=prefetch).device.gathered
    assert gathered(100) == 4 * (2048 + 512)     # none fits: the next unit still comes ahead
    assert gathered(600) == 4 * (2048 + 600)     # 256 and 512 fit; in flight at most 600
    assert gathered(10**6) == 4 * (2048 + 768)   # everything else prefetched
    assert gathered(0) == 4 * 2048


def test_largest_count_is_laid_out_without_a_layout_per_bucket():
    # 10**15 elements are 2 million reduce_bucket_size buckets (each a multiple of 8 * 16);
    # the estimate lays out two and repeats the second, so it answers at once.
    est = estimate_from_config(10**15, {"zero_optimization": {"stage": 2}}, 8)
    assert est.padded_numel == 10**15 and est.device.exp_avg == 4 * 10**15 // 8


def test_api_errors_say_what_to_do():
    with pytest.raises(ValueError, match="parameter offload needs stage 3"):
        estimate(10**6, stage=2, world_size=2, offload_param=True)
    with pytest.raises(ValueError, match="is not one of"):
        estimate(10**6, stage=2, world_size=2, dtype="fp8")
    with pytest.raises(ValueError, match="positive parameter count"):
        estimate_from_config(-5, {}, 2)
    with pytest.raises(ValueError, match=r"^1e\+30 parameters is more than zero_ext.estimate "
                       r"handles \(1e\+15, .*check the count"):
        estimate_from_config(10**30, {}, 2)
    with pytest.raises(ValueError, match="largest_unit is for a bare parameter count"):
        estimate(nn.Linear(2, 2), stage=3, world_size=2, largest_unit=10)


def _llama_config(path):
    config = {"model_type": "llama", "vocab_size": 37, "hidden_size": 32,
              "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 16,
              "tie_word_embeddings": False}
    path.write_text(json.dumps(config))
    return config


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "zero_ext.estimate", *args],
                          check=False, capture_output=True, text=True, timeout=120)


def test_cli_prints_a_table_for_a_parameter_count():
    done = _cli("--params", "70B", "--world-sizes", "8")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("70.00B parameters")
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "ranks"])
    assert lines[header].split() == ["stage", "ranks", "params", "grads", "master", "Adam",
                                     "m+v", "gathered", "device"]
    rows = {int(line.split()[0]): line.split() for line in lines[header + 1:header + 5]}
    # Stage 0: 16 bytes per parameter; stage 2: 2 + 14/8.
    assert float(rows[0][-1]) == pytest.approx(16 * 70e9 / GiB, abs=0.01)
    assert float(rows[2][-1]) == pytest.approx((2 + 14 / 8) * 70e9 / GiB, abs=0.01)


def test_cli_offload_ratio_says_the_share_the_buckets_give(capsys):
    # 12.6M parameters are one default-sized bucket: ratio 0.5 still steps all of it on the
    # host, which the table alone showed as if the ratio were 1.
    assert main(["--params", "12582912", "--world-sizes", "1", "--stages", "2",
                 "--offload-optimizer", "--offload-ratio", "0.5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "offload ratio 0.5: the optimizer state is split by whole gradient buckets (at " \
           "least one on the host), so the host steps 100% at stage 2 on 1 rank" in out, out
    share = estimate(int(7e9), stage=2, world_size=8, offload_ratio=0.5).host_state_share
    assert share == pytest.approx(0.5, abs=0.05)  # many buckets: close to the ratio


def test_cli_estimates_a_config_offloading_at_stage_0_as_the_engine_ignores_it(tmp_path, capsys):
    path = tmp_path / "stage0.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0, "offload_optimizer": {
        "device": "cpu"}}, "bf16": {"enabled": True}}))
    with pytest.warns(UserWarning, match="offload_optimizer .DeepSpeed reads it only at stages"):
        assert main(["--params", "7B", "--world-sizes", "8", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "optimizer offload" not in out and "staging" not in out, out
    plain = estimate(int(7e9), stage=0, world_size=8)
    assert f"{plain.device.total / GiB:.2f}" in out.split("device")[-1], out


def test_cli_with_optimizer_offload_adds_the_host_columns(capsys):
    assert main(["--params", "7B", "--world-sizes", "8", "--offload-optimizer"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "ranks"])
    assert lines[header].split()[-3:] == ["staging", "device", "host"]
    # Stage 0 cannot offload, so the table starts at stage 1.
    rows = {int(line.split()[0]): line.split() for line in lines[header + 1:header + 4]}
    assert sorted(rows) == [1, 2, 3]
    # Stage 2: 2 bytes per parameter on the device (gradient shards leave during backward);
    # 12/8 of state plus 2/8 of staging (the gradient copy, which then holds the new bf16
    # weights) on the host.
    assert float(rows[2][-2]) == pytest.approx(2 * 7e9 / GiB, abs=0.01)
    assert float(rows[2][-1]) == pytest.approx(14 / 8 * 7e9 / GiB, abs=0.01)


def test_cli_reads_a_transformers_config_and_plots(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = _llama_config(tmp_path / "config.json")
    config.pop("model_type")
    numel = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**config)).parameters())
    png = tmp_path / "mem.png"
    done = _cli("--hf-config", str(tmp_path / "config.json"), "--world-sizes", "1,2,4",
                "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert f"LlamaForCausalLM from {tmp_path / 'config.json'}" in done.stdout
    assert f"{numel / 1000:.2f}K parameters" in done.stdout
    assert len([line for line in done.stdout.splitlines() if line[:5].strip().isdigit()]) == 12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_takes_precision_accumulation_and_stage3_keys_from_a_config(tmp_path, capsys):
    config = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
              "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                    "stage3_prefetch_bucket_size": 10**8}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    assert main(["--params", "7B", "--largest-unit", "0.2B", "--config",
                 str(tmp_path / "ds.json"), "--world-sizes", "8,16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "accumulation 1,2" in lines[0]  # 64 / (4 * 8) and 64 / (4 * 16)
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "ranks"])
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [row[:2] for row in rows] == [["3", "8"], ["3", "16"]]  # the config's stage only
    for row, n in zip(rows, (8, 16)):
        est = estimate_from_config(7 * 10**9, config, n, largest_unit=2 * 10**8)
        assert float(row[-2]) == pytest.approx(est.device.total / GiB, abs=0.01)
        assert float(row[-1]) == pytest.approx(est.host.total / GiB, abs=0.01)
    # Accumulating at 8 ranks: the gradient shard is fp32.
    assert estimate_from_config(7 * 10**9, config, 8).device.grads == 4 * 7 * 10**9 // 8


@pytest.mark.parametrize("args, advice", [
    (["--params", "7Q"], ["'7Q' is not a parameter count", "e.g. 70B"]),
    (["--params", "1e30"], ["'1e30' parameters is more than zero_ext.estimate handles",
                            "check the count"]),
    (["--params", "7B", "--world-sizes", "8,x"], ["not a list of rank counts", "1,8,64"]),
    (["--params", "7B", "--stages", "0", "--offload-optimizer"],
     ["stage 0: optimizer offload needs stage 1, 2 or 3", "--stages 1,2,3"]),
    (["--params", "7B", "--config", "missing.json"], ["missing.json: no such file"]),
    (["--params", "7B", "--config", "{typo}"],
     ["zero_optimization.stgae", "stage"]),
    (["--hf-config", "c.json", "--largest-unit", "1B"],
     ["--largest-unit goes with --params", "--hf-config finds the units"]),
    (["--hf-config", "missing.json"], ["missing.json: no such file", "config.json"]),
    (["--hf-config", "{bad}"], ["no \"model_type\" key", "--params"]),
    (["--world-sizes", "8"], ["one of the arguments --params --hf-config --measure-network is required"]),
])
def test_cli_errors_name_the_problem_and_the_fix(args, advice, tmp_path, capsys):
    if args[-1] == "{bad}":
        (tmp_path / "bad.json").write_text('{"hidden_size": 8}')
        args = [*args[:-1], str(tmp_path / "bad.json")]
    if args[-1] == "{typo}":
        (tmp_path / "ds.json").write_text('{"zero_optimization": {"stgae": 3}}')
        args = [*args[:-1], str(tmp_path / "ds.json")]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    for text in advice:
        assert text in message, message


# -- configs written for the Hugging Face Trainer ("auto" values) and the plot's layout -------
HF_ZERO3 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "configs", "trainer", "zero3.json")


def _table(out: str) -> tuple[float, dict]:
    """The table's unit in bytes and its rows by (stage, ranks)."""
    lines = out.splitlines()
    unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[
        next(line for line in lines if line.startswith("per rank,")).split()[2].rstrip(";")]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "ranks"])
    rows = {}
    for line in lines[header + 1:]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        rows[(int(cells[0]), int(cells[1]))] = [float(c) for c in cells[2:]]
    return unit, rows


def test_cli_fills_a_trainer_configs_autos_from_its_arguments(tmp_path, capsys):
    from zero_ext.estimate import load_hf_model

    _llama_config(tmp_path / "config.json")
    assert main(["--hf-config", str(tmp_path / "config.json"), "--config", HF_ZERO3,
                 "--micro-batch", "4", "--grad-accum", "2", "--dtype", "fp32",
                 "--world-sizes", "2,4"]) == 0
    out = capsys.readouterr().out
    # What DeepSpeed's Trainer integration would run: the arguments' batch, accumulation and
    # precision, the bucket sizes from hidden_size 32.
    concrete = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                "zero_optimization": {"stage": 3, "reduce_bucket_size": 32 * 32,
                                      "stage3_prefetch_bucket_size": int(0.9 * 32 * 32),
                                      "stage3_param_persistence_threshold": 320}}
    unit, rows = _table(out)
    model = load_hf_model(tmp_path / "config.json")
    for ranks in (2, 4):
        expected = estimate_from_config(model, concrete, ranks)
        assert rows[(3, ranks)][-1] == pytest.approx(expected.device.total / unit, abs=0.006)
    for said in ("train_micro_batch_size_per_gpu = 4: from --micro-batch",
                 "gradient_accumulation_steps = 2: from --gradient-accumulation-steps",
                 "bf16.enabled: from --dtype fp32",
                 "zero_optimization.reduce_bucket_size = 1024: hidden_size**2",
                 "zero_optimization.stage3_param_persistence_threshold = 320: 10 * hidden_size",
                 "scheduler: left out", "optimizer.params.lr: zero_ext's default"):
        assert said in out, out


def test_cli_states_what_it_assumes_for_autos_without_arguments(capsys):
    assert main(["--params", "7B", "--config", HF_ZERO3, "--world-sizes", "8"]) == 0
    out = capsys.readouterr().out
    for said in ("train_micro_batch_size_per_gpu = 1: assumed",
                 "gradient_accumulation_steps = 1: assumed",
                 "bf16.enabled = true: assumed bf16 weights (give --dtype)",
                 "zero_optimization.reduce_bucket_size = 500000000: zero_ext's default"):
        assert said in out, out
    assert "bf16 weights" in out.splitlines()[0]
    expected = estimate(7 * 10**9, stage=3, world_size=8, dtype="bf16")
    unit, rows = _table(out)
    assert rows[(3, 8)][-1] == pytest.approx(expected.device.total / unit, abs=0.006)


def test_auto_accumulation_follows_an_explicit_train_batch_size(tmp_path, capsys):
    (tmp_path / "ds.json").write_text(json.dumps({
        "train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2}}))
    assert main(["--params", "7B", "--config", str(tmp_path / "ds.json"),
                 "--world-sizes", "8,16"]) == 0
    out = capsys.readouterr().out
    assert "accumulation 1,2" in out.splitlines()[0]  # 64 / (4 * 16), 64 / (4 * 8)
    assert "gradient_accumulation_steps: train_batch_size / (micro batch * world size)" in out


def _drawn_figure(monkeypatch, argv):
    """The figure `main(argv)` saved with --plot."""
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    monkeypatch.setattr("matplotlib.pyplot.close", lambda *a, **k: None)
    assert main(argv) == 0
    (figure,) = saved
    figure.canvas.draw()
    return figure


def _overlaps(figure) -> list:
    """Pairs of drawn data marks that cover each other: markers closer than their size (in
    pixels), bars whose extents intersect."""
    axes = figure.axes[0]
    points = []
    for line in axes.get_lines():
        if line.get_marker() not in (None, "", "None"):
            diameter = line.get_markersize() * figure.dpi / 72
            points += [(tuple(p), diameter) for p in axes.transData.transform(line.get_xydata())]
    found = [(a, b) for i, (a, size) in enumerate(points) for b, _ in points[i + 1:]
             if ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 < size]
    boxes = [patch.get_window_extent() for patch in axes.patches]
    found += [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]
              if a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 and b.y0 < a.y1]
    return found


@pytest.mark.parametrize("offload", [[], ["--offload-optimizer"]])
def test_plot_with_one_world_size_draws_no_marks_over_each_other(monkeypatch, tmp_path,
                                                                  capsys, offload):
    figure = _drawn_figure(monkeypatch, ["--params", "7B", "--world-sizes", "8", *offload,
                                         "--plot", str(tmp_path / "m.png")])
    assert _overlaps(figure) == []
    # Every stage is drawn, device and (with offload) host, at the table's values.
    stages = [1, 2, 3] if offload else [0, 1, 2, 3]
    axes = figure.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in axes.patches)
    unit, rows = _table(capsys.readouterr().out)
    size = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[axes.get_ylabel().split("(")[1][:-1]]
    expected = sorted(round(rows[(s, 8)][i] * unit / size, 2) for s in stages
                      for i in ([-2, -1] if offload else [-1]))
    assert [round(h, 2) for h in heights] == pytest.approx(expected, abs=0.011)


def test_plot_over_world_sizes_draws_a_line_per_stage(monkeypatch, tmp_path):
    figure = _drawn_figure(monkeypatch, ["--params", "7B", "--world-sizes", "2,8,64",
                                         "--plot", str(tmp_path / "m.png")])
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [f"stage {s}" for s in range(4)]
    assert all(list(line.get_xdata()) == [2, 8, 64] for line in lines)


def test_deepspeeds_estimators_take_its_arguments_and_print_its_table(capsys):
    """deepspeed.runtime.zero.stage3 / stage_1_and_2's estimators under their names: the same
    parameters and defaults, the same table (rows and option columns, read from DeepSpeed's
    own output), with zero_ext's figures: per GPU what zero_ext.estimate gives one rank in fp16,
    per CPU the node's offloaded state or the fp32 model each rank builds without zero_init,
    times the buffer factor."""
    import inspect

    from deepspeed.runtime.zero import stage3, stage_1_and_2

    from zero_ext import estimate_deepspeed as ours

    theirs = {name: getattr(stage3 if "zero3" in name else stage_1_and_2, name)
              for name in ours.__all__}
    for name, function in theirs.items():
        want = [(p.name, p.default) for p in inspect.signature(function).parameters.values()]
        got = [(p.name, p.default) for p in
               inspect.signature(getattr(ours, name)).parameters.values()]
        assert got == want, name

    def table(print_table, *args, **kwargs):
        print_table(*args, **kwargs)
        # (DeepSpeed's accelerator notice may come first: a log line, not the table.)
        lines = [line for line in capsys.readouterr().out.splitlines()
                 if not line.startswith("[")]
        return lines[:4], [line.split("|") for line in lines[4:]]

    params, largest = 6_738_415_616, 131_072_000
    for name, args in (("estimate_zero3_model_states_mem_needs_all_cold", (params, largest)),
                       ("estimate_zero2_model_states_mem_needs_all_cold", (params,))):
        head, rows = table(getattr(ours, name), *args, num_gpus_per_node=8, num_nodes=2)
        ds_head, ds_rows = table(theirs[name], *args, num_gpus_per_node=8, num_nodes=2)
        assert head == ds_head
        assert [r[2].replace("OffloadDeviceEnum.", "") for r in ds_rows] == [r[2] for r in rows]
    cpu, gpu, gathered = ours.estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=8, num_nodes=2, zero_init=False)
    e = estimate(params, stage=3, world_size=16, dtype="fp16", offload_optimizer=True,
                 offload_param=True, largest_unit=largest)
    assert (gpu, gathered) == (e.device.total, e.device.gathered)
    assert cpu == int(max(8 * e.host.total, 4 * params * 8) * 1.5)
    cpu, gpu = ours.estimate_zero2_model_states_mem_needs(params, 8, 1, cpu_offload=False,
                                                          additional_buffer_factor=1.0)
    assert gpu == estimate(params, stage=2, world_size=8, dtype="fp16").device.total
    assert cpu == 4 * params * 8  # the fp32 model each rank builds
    # A live model: the engine's own layout (its gather units) decides the figures.
    with torch.device("meta"):
        model = estimate_cases.build()
    ours.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=2)
    lines = capsys.readouterr().out.splitlines()
    gpu_gib = float(lines[-1].split("|")[1].strip().removesuffix("GB"))
    want = estimate(model, stage=3, world_size=2, dtype="fp16").device.total / 2**30
    assert gpu_gib == pytest.approx(want, abs=0.006)
