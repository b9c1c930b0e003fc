"""An unmodified Hugging Face script on zero_ext (zero_ext.run, apply(), ZERO_EXT_CONFIG), and
what the Trainer shows of the engine (its logs and report_to, the learning rate, the parameter
count).

The distributed cases share one launch, `torchrun --nproc_per_node=2 -m zero_ext.run
tests/hf_run_cases.py` (see there): the script under the plain Trainer with DDP is the
reference for the same script with `--deepspeed ds.json` at stages 2 and 3 and with
ZERO_EXT_CONFIG. Where the configs come from, and the errors for two of them, are checked in
this process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

from zero_ext.integrations import _hf_apply
from zero_ext.integrations._hf_apply import ENV
from zero_ext.integrations.transformers import ZeroTrainer, apply, zero_trainer

from launch import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "hf_run_cases.py")
ZERO_RUNS = ("stage2", "stage3", "env3")
STEPS, WARMUP, LR = 6, 2, 1e-2  # as in hf_run_cases.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf_run"))
    # ZERO_EXT_PROGRESS=1 would force the engine's bar on: under the Trainer it must stay off.
    result = torchrun(["-m", "zero_ext.run", CASES, out], timeout=300,
                      env={"ZERO_EXT_PROGRESS": "1"}, unset=(ENV,))
    def load(name):
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)

    return {name: load(name) for name in ("ddp", *ZERO_RUNS)}, result.stdout + result.stderr


def _steps(run):
    return [entry for entry in run["history"] if "loss" in entry]


@pytest.mark.parametrize("name", ZERO_RUNS)
def test_unmodified_script_trains_on_zero_ext_like_the_plain_trainer(runs, name):
    results, _ = runs
    zero, ddp = _steps(results[name]), _steps(results["ddp"])
    assert len(zero) == len(ddp) == STEPS
    # The engine trained (its figures are in the logs), not DDP; no DeepSpeed engine built.
    assert all("zero_ext/tokens_per_s" in e for e in zero)
    assert not any(key.startswith("zero_ext/") for e in ddp for key in e)
    assert not results[name]["deepspeed_engines"] and not results[name]["zero3_enabled"]
    assert zero[-1]["loss"] < 0.95 * zero[0]["loss"]
    torch.testing.assert_close([e["loss"] for e in zero], [e["loss"] for e in ddp],
                               rtol=1e-5, atol=0)
    torch.testing.assert_close([e["grad_norm"] for e in zero], [e["grad_norm"] for e in ddp],
                               rtol=1e-5, atol=0)


def _schedule(steps_done: int) -> float:
    """The Trainer's linear schedule with warmup: the rate after `steps_done` scheduler steps."""
    if steps_done < WARMUP:
        return LR * steps_done / WARMUP
    return LR * (STEPS - steps_done) / (STEPS - WARMUP)


@pytest.mark.parametrize("name", ZERO_RUNS)
def test_logged_learning_rate_is_the_one_hf_with_deepspeed_logs(runs, name):
    # A plain Trainer logs the rate read before its scheduler step: the rate step k used.
    # Under DeepSpeed the engine has stepped the schedule inside accelerator.backward before
    # the Trainer reads get_last_lr(): the rate after step k, i.e. the plain Trainer's next one.
    results, _ = runs
    ddp = [e["learning_rate"] for e in _steps(results["ddp"])]
    zero = [e["learning_rate"] for e in _steps(results[name])]
    assert ddp == pytest.approx([_schedule(k) for k in range(STEPS)], abs=1e-12)
    assert zero == pytest.approx([_schedule(k + 1) for k in range(STEPS)], abs=1e-12)
    assert zero[:-1] == pytest.approx(ddp[1:], abs=1e-12)


@pytest.mark.parametrize("name", ZERO_RUNS)
def test_trainer_reports_the_real_trainable_parameter_count(runs, name):
    results, _ = runs
    with open(os.path.join(os.path.dirname(HERE), "examples", "data", "zen_of_python.txt"),
              encoding="utf-8") as f:
        vocab_size = len(set(f.read()))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    expected = sum(p.numel() for p in model.parameters())
    assert results["ddp"]["param_counts"] == [expected]
    assert results[name]["param_counts"] == [expected]


def test_engine_figures_reach_tensorboard(runs):
    results, _ = runs
    board, logged = results["stage2"]["tensorboard"], _steps(results["stage2"])
    for key in ("zero_ext/samples_per_s", "zero_ext/tokens_per_s", "zero_ext/tflops_per_rank",
                "zero_ext/peak_memory_gib", "zero_ext/peak_memory_gib_rank0",
                "zero_ext/peak_memory_gib_rank1", "zero_ext/skipped_steps",
                "zero_ext/grad_norm", "loss", "learning_rate"):
        events = board[f"train/{key}"]
        assert [step for step, _ in events] == list(range(1, STEPS + 1)), key
        assert [value for _, value in events] == pytest.approx(
            [e[key] for e in logged], rel=1e-6), key
    # Each rank's peak memory, gathered: the largest is the one reported.
    for e in logged:
        assert e["zero_ext/peak_memory_gib"] == max(e["zero_ext/peak_memory_gib_rank0"],
                                                     e["zero_ext/peak_memory_gib_rank1"]) > 0
        assert e["zero_ext/tokens_per_s"] > 0 and e["zero_ext/skipped_steps"] == 0


def test_no_progress_bar_or_report_line_of_the_engine_under_the_trainer(runs):
    # steps_per_print 1 and ZERO_EXT_PROGRESS=1 would each print "[zero_ext] step ..." lines.
    _, output = runs
    assert "[zero_ext]" not in output


# -- where the config comes from (no processes launched) --------------------------------------
@pytest.fixture
def applied(monkeypatch):
    """apply() for one test: TrainingArguments.__post_init__ and the applied config are
    restored after. Trainer.__new__ stays (CPython keeps a deleted __new__'s slot in the
    subclasses): with no config in force it makes every Trainer its own class, as before."""
    post_init = TrainingArguments.__dict__["__post_init__"]
    monkeypatch.setitem(_hf_apply._APPLIED, "patched", False)
    monkeypatch.setitem(_hf_apply._APPLIED, "config", None)
    monkeypatch.delenv(ENV, raising=False)
    yield apply
    TrainingArguments.__post_init__ = post_init


def _configs(tmp_path):
    paths = {}
    for name, stage in (("a", 2), ("a_copy", 2), ("b", 3)):
        paths[name] = str(tmp_path / f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump({"zero_optimization": {"stage": stage}}, f)
    return paths


def _arguments(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                             **kw)


def _tiny_model():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1))


def test_deepspeed_argument_is_taken_before_transformers_sees_it(applied, tmp_path):
    paths = _configs(tmp_path)
    applied()
    # Another test in this process may have imported deepspeed already (accelerate imports it
    # whenever it is installed): what counts is that building the arguments did not.
    imported_before = "deepspeed" in sys.modules
    args = _arguments(tmp_path, deepspeed=paths["a"])
    assert args.deepspeed is None and args.deepspeed_plugin is None
    assert args.zero_ext_config[0] == paths["a"]
    assert "--deepspeed" in args.zero_ext_config[1]
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    assert not is_deepspeed_zero3_enabled()
    assert ("deepspeed" in sys.modules) == imported_before


def test_a_trainer_or_subclass_becomes_its_zero_ext_version(applied, tmp_path):
    paths = _configs(tmp_path)
    applied()

    class MyTrainer(Trainer):
        pass

    trainer = MyTrainer(model=_tiny_model(), args=_arguments(tmp_path, deepspeed=paths["b"]))
    assert type(trainer) is zero_trainer(MyTrainer) and isinstance(trainer, MyTrainer)
    assert trainer.zero_config == paths["b"]
    assert type(Trainer(_tiny_model(), _arguments(tmp_path, deepspeed=paths["b"]))) is \
        ZeroTrainer
    # Without a config anywhere, the plain Trainer, untouched.
    assert type(Trainer(model=_tiny_model(), args=_arguments(tmp_path))) is Trainer


def test_zero_trainer_is_one_class_per_trainer_class():
    class MyTrainer(Trainer):
        pass

    assert zero_trainer(Trainer) is ZeroTrainer and zero_trainer(ZeroTrainer) is ZeroTrainer
    assert zero_trainer(MyTrainer) is zero_trainer(MyTrainer)
    assert zero_trainer(MyTrainer).__mro__[2] is MyTrainer
    with pytest.raises(TypeError, match="expected transformers.Trainer or a subclass"):
        zero_trainer(TrainingArguments)


def test_environment_variable_and_deepspeed_argument_that_differ_are_one_error(
        applied, tmp_path, monkeypatch):
    paths = _configs(tmp_path)
    applied()
    monkeypatch.setenv(ENV, paths["b"])
    with pytest.raises(ValueError) as error:
        _arguments(tmp_path, deepspeed=paths["a"])
    text = str(error.value)
    assert text.startswith("zero_ext: two different zero_ext configs were given")
    assert paths["a"] in text and f"{ENV}={paths['b']}" in text
    assert "drop --deepspeed" in text and f"unset {ENV}" in text
    # The same content under two names is one config.
    monkeypatch.setenv(ENV, paths["a_copy"])
    assert _arguments(tmp_path, deepspeed=paths["a"]).zero_ext_config[0] == paths["a"]


def test_zero_config_beside_a_deepspeed_argument_is_an_error(applied, tmp_path):
    paths = _configs(tmp_path)
    applied()
    args = _arguments(tmp_path, deepspeed=paths["a"])
    with pytest.raises(ValueError, match="two different zero_ext configs were given: "
                                         "ZeroTrainer's zero_config=.*--deepspeed"):
        ZeroTrainer(model=_tiny_model(), args=args, zero_config=paths["b"])


def test_zero_config_beside_transformers_deepspeed_integration_is_an_error(tmp_path):
    # Without apply(), transformers takes `deepspeed` (when DeepSpeed is installed) and its
    # DeepSpeed integration runs beside the engine: refused before the Trainer is set up.
    args = _arguments(tmp_path)
    args.deepspeed = "ds_config.json"
    with pytest.raises(ValueError) as error:
        ZeroTrainer(model=_tiny_model(), args=args, zero_config={"zero_optimization": {}})
    text = str(error.value)
    assert "zero_config= (a dict) and TrainingArguments.deepspeed ('ds_config.json')" in text
    assert "apply()" in text and "drop deepspeed=" in text


def test_apply_config_and_environment_variable_that_differ_are_an_error(
        applied, tmp_path, monkeypatch):
    paths = _configs(tmp_path)
    monkeypatch.setenv(ENV, paths["b"])
    with pytest.raises(ValueError, match=f"apply\\(config=...\\) .*{ENV}"):
        applied(paths["a"])


def test_a_trainer_without_any_config_says_where_one_goes(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match="no zero_ext config for this Trainer: pass "
                                         "ZeroTrainer\\(zero_config=...\\).*--deepspeed.*"
                                         f"{ENV}"):
        ZeroTrainer(model=_tiny_model(), args=_arguments(tmp_path))


def test_run_without_a_script_prints_its_usage(capsys):
    import zero_ext.run
    with pytest.raises(SystemExit) as stop:
        zero_ext.run.main([])
    assert stop.value.code == 2 and "python -m zero_ext.run SCRIPT.py" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no script 'missing.py'"):
        zero_ext.run.main(["missing.py"])


def test_run_is_python_script_and_takes_deepspeeds_local_rank_first(tmp_path):
    """`python -m zero_ext.run X ...` runs X as `python X ...` would: its arguments, __file__
    absolute, sys.path[0] the script's folder; a folder with __main__.py too. DeepSpeed's launcher
    (`deepspeed --module zero_ext.run train.py ...`) puts --local_rank=N before the script:
    the script gets it first among its arguments, as under `deepspeed train.py ...`."""
    show = ("import os, sys, json; print(json.dumps([os.path.isabs(__file__), sys.argv, "
            "sys.path[0]]))")
    (tmp_path / "show.py").write_text(show)
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__main__.py").write_text(show)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    def run(*args):
        out = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        absolute, argv, path0 = json.loads(out.stdout.strip().splitlines()[-1])
        # argv[0] as the path given or made absolute: argparse's prog is its base name
        return absolute, [os.path.abspath(os.path.join(tmp_path, argv[0])), *argv[1:]], path0

    def zero_ext_run(*args):
        return run("-m", "zero_ext.run", *args)

    # (one launch each: zero_ext.run imports transformers, seconds per process)
    assert zero_ext_run("--local_rank=3", "show.py", "--x") == run("show.py", "--local_rank=3",
                                                                   "--x")
    assert zero_ext_run("app", "--y") == run("app", "--y")
