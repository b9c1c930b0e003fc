"""The runs tests/test_hf_run.py compares, in one launch of 2 ranks through zero_ext.run:

    torchrun --nproc_per_node=2 -m zero_ext.run tests/hf_run_cases.py OUT

Each case runs the unmodified tests/hf_clm_script.py as __main__ through zero_ext.run.main
(what `torchrun -m zero_ext.run hf_clm_script.py ARGS` does in each process) with its own
arguments and environment: `ddp` without a zero_ext config (the plain Trainer under DDP: the
reference), `stage2` and `stage3` with `--deepspeed ds.json` (stage 2 also reports to
TensorBoard), `env3` with ZERO_EXT_CONFIG naming the stage-3 config and no --deepspeed. Rank 0
writes OUT/<case>.json: the script's log history, the "Number of trainable parameters" the
Trainer logged, whether deepspeed was imported, and for stage 2 the TensorBoard event file's
scalars (read with tensorboard's EventAccumulator).
"""

import glob
import json
import logging
import os
import sys

import torch

import zero_ext.run
from zero_ext.integrations._hf_apply import ENV

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "hf_clm_script.py")
TEXT = os.path.join(os.path.dirname(HERE), "examples", "data", "zen_of_python.txt")
STEPS, WARMUP, LR = 6, 2, 1e-2
# "auto" where the arguments decide, as in the Hugging Face docs' DeepSpeed configs; no
# "scheduler" section: the Trainer's own (linear with warmup), stepped by the engine.
# steps_per_print 1: the engine's own report line would print at every step, were it not off.
CONFIG = {"steps_per_print": 1, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "gradient_clipping": "auto",
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}}}

# Stage 3 with the docs' "auto" sizes (from hidden_size 32): every weight matrix of a layer is
# above the persistence threshold (320 elements), so the layers are really partitioned.
ZERO = {2: {"reduce_bucket_size": "auto"},
        3: {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto"}}


class ParamCount(logging.Handler):
    """Keeps the count the Trainer logs as "Number of trainable parameters = N"."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.counts = []

    def emit(self, record):
        message = record.getMessage()
        if "Number of trainable parameters" in message:
            self.counts.append(int(message.rsplit("=", 1)[1].replace(",", "")))


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def _record_deepspeed_engines() -> list:
    """A list that every DeepSpeed engine built from here on is appended to (none while
    DeepSpeed is not installed). accelerate imports deepspeed whenever it is installed
    (`extract_model_from_parallel`), so the import alone says nothing; an engine would."""
    built = []
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        return built
    original = DeepSpeedEngine.__init__

    def init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    DeepSpeedEngine.__init__ = init
    return built


def run(out, name, extra_args=(), env=None):
    deepspeed_engines = _record_deepspeed_engines()
    run_dir = os.path.join(out, name)
    args = [SCRIPT, "--train_file", TEXT, "--output_dir", run_dir, "--use_cpu",
            "--max_steps", str(STEPS), "--learning_rate", str(LR), "--warmup_steps", str(WARMUP),
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
            "--weight_decay", "0.1", "--max_grad_norm", "0.5", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--seed", "0", *extra_args]
    handler = ParamCount()
    logger = logging.getLogger("transformers.trainer")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    saved_env = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    try:
        zero_ext.run.main(args)
    finally:
        logger.removeHandler(handler)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    if int(os.environ.get("RANK", "0")) != 0:
        return
    with open(os.path.join(run_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    result = {"history": history, "param_counts": handler.counts,
              "deepspeed_engines": deepspeed_engines,
              "zero3_enabled": is_deepspeed_zero3_enabled()}
    if "tensorboard" in extra_args:
        result["tensorboard"] = scalars(run_dir)  # under output_dir/runs/
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f)


def main(out):
    torch.set_num_threads(1)
    configs = {}
    for stage in (2, 3):  # every rank writes the same file (no process group exists yet)
        configs[stage] = os.path.join(out, f"ds{stage}.json")
        partial = f"{configs[stage]}.{os.environ.get('RANK', '0')}"
        with open(partial, "w") as f:
            json.dump({**CONFIG, "zero_optimization": {"stage": stage, **ZERO[stage]}}, f)
        os.replace(partial, configs[stage])
    run(out, "ddp")
    run(out, "stage2", ["--deepspeed", configs[2], "--report_to", "tensorboard"])
    run(out, "stage3", ["--deepspeed", configs[3]])
    run(out, "env3", env={ENV: configs[3]})


if __name__ == "__main__":
    main(sys.argv[1])
