"""The runs tests/test_trainer.py compares, in as few process launches as possible.

    torchrun --nproc_per_node=2 tests/trainer_script.py distributed OUT   # ZeroTrainer, 2 ranks
    python tests/trainer_script.py single OUT                           # after `distributed`

`distributed`, for stages 1, 2 and 3: an uninterrupted run of STEPS optimizer steps, runs
whose epochs end with a short accumulation window, and a run stopped after STOP_AT steps (with
a checkpoint there) then resumed by a new ZeroTrainer to the end; stage 3 also evaluates
(halfway and after training) and predicts, and trains in bf16, with activation
checkpointing and torch.compile'd (torch_compile_backend). `single`, in one process: the plain Trainer (no zero_ext) on the same data and
global batch (and on the short-window data), the stage-2 checkpoint resumed at one rank, an
fp16 run whose first steps overflow, a stage-3 run that loads its best checkpoint at the end,
the plain Trainer's evaluation of the stage-3 final weights, and a model built under
zero_ext.Init that reads pretrained weights into its shards. Rank 0 writes
OUT/<name>.json (logged losses, grad norms, learning rates, metrics) and each run's final
weights under OUT/<name>/ (model.safetensors).
"""

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
from hf_trainer import TEXT, CharWindows, tiny_llama

import zero_ext
from zero_ext.integrations.transformers import ZeroTrainer

STEPS, STOP_AT = 8, 5       # 32 samples, global batch 8: two epochs, stopped mid-epoch
MICRO, GLOBAL_BATCH = 2, 8
CONFIG = {  # "auto" wherever the Trainer has the value; absent keys are filled the same way
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    "zero_optimization": {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}


class RecordingWindows(CharWindows):
    """Remembers which samples this rank read, to check that ranks read different ones."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = []

    def __getitem__(self, i):
        self.read.append(int(i))
        return super().__getitem__(i)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def data(count=32):
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    return RecordingWindows(text, 16, count), CharWindows(text, 16, 8)


# 28 samples: 7 micro-batches per rank and epoch at 2 ranks, so every epoch ends with a window
# of one micro-batch (two of four in one process).
SHORT = {"short": {}, "short_mean": {"model_accepts_loss_kwargs": False}}


def short_window_run(make_trainer, name):
    """A run over SHORT's dataset; `_mean` turns off the loss's normalisation by the window's
    token count, so the Trainer divides each micro-batch's mean by the window's length."""
    train, _ = data(28)
    trainer = make_trainer(train)
    for attribute, value in SHORT[name].items():
        setattr(trainer, attribute, value)
    trainer.train()
    return trainer


# The model's activation checkpointing switch: gradient_checkpointing's new name where this
# transformers has it (5.17, the GPU machine's, has only the old one).
CHECKPOINTING_ARGUMENT = next(
    name for name in ("activation_checkpointing", "gradient_checkpointing")
    if name in {f.name for f in dataclasses.fields(TrainingArguments)})


def arguments(out, world_size, **kw):
    return TrainingArguments(**{
        "output_dir": out, "max_steps": STEPS, "learning_rate": 1e-2, "weight_decay": 0.1,
        "max_grad_norm": 0.5, "per_device_train_batch_size": MICRO,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO * world_size), "logging_steps": 1,
        "report_to": "none", "disable_tqdm": True, "seed": 0, "use_cpu": True,
        "save_strategy": "no", **kw})


def record(trainer, out, name, **extra):
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = dict(losses=[e["loss"] for e in logs], grad_norms=[e["grad_norm"] for e in logs],
                  lrs=[e["learning_rate"] for e in logs], **extra)
    trainer.save_model(os.path.join(out, name))  # collective under ZeroTrainer
    if trainer.is_world_process_zero():
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(result, f)


def zero_trainer(stage, run_dir, train, evaluation=None, compression=None, own=None, **kw):
    """`own`: None (the config's AdamW), "args" (no optimizer section: TrainingArguments.optim
    runs, as under transformers' DeepSpeed integration) or a function model -> (optimizer,
    scheduler) given as the Trainer's `optimizers`."""
    vocab = len(train.vocab)
    config = {**CONFIG, "zero_optimization": {**CONFIG["zero_optimization"], "stage": stage}}
    if own is not None:
        del config["optimizer"]
    if compression is not None:
        config["zero_ext"] = {"compression": compression}
    model = tiny_llama(vocab)
    optimizers = own(model) if callable(own) else (None, None)
    return ZeroTrainer(model=model, args=arguments(run_dir, dist_world(), **kw),
                       train_dataset=train, eval_dataset=evaluation, zero_config=config,
                       optimizers=optimizers)


# Optimizers of the Trainer's own, without an optimizer section in the config: Adagrad from
# TrainingArguments.optim, and an SGD with a StepLR passed as `optimizers`.
def own_sgd(model):
    sgd = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    return sgd, torch.optim.lr_scheduler.StepLR(sgd, step_size=3, gamma=0.5)


OWN = {"adagrad": ("args", {"optim": "adagrad"}), "sgd": (own_sgd, {})}


# Compressed communication under the Trainer: stage 2 with int8 gradients, stage 3 with int4
# gradients and int8 weights, both with error feedback (docs/compression.md).
COMPRESSED = {
    2: {"gradients": {"method": "int8", "error_feedback": True}},
    3: {"gradients": {"method": "int4", "error_feedback": True},
        "weights": {"method": "int8"}},
}


def trained(trainer) -> dict:
    """trainer.train(), and the bytes each collective put on the wire meanwhile (rank 0)."""
    zero_ext.comm.traffic.reset()
    trainer.train()
    return {"wire": dict(zero_ext.comm.traffic.bytes)}


def dist_world():
    # From torchrun's environment: the process group only exists once TrainingArguments do.
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed(out):
    for stage in (1, 2, 3):
        train, evaluation = data()
        # Stage 3 also evaluates halfway: gathers without a backward, between training steps.
        evaluating = {"eval_strategy": "steps", "eval_steps": STEPS // 2} if stage == 3 else {}
        trainer = zero_trainer(stage, os.path.join(out, f"scratch{stage}"), train, evaluation,
                               **evaluating)
        wire = trained(trainer)
        wrapped = [trainer.model_wrapped, *trainer.accelerator._models]
        extra = {**wire, "ddp": any(isinstance(m, DistributedDataParallel) for m in wrapped),
                 "world_size": trainer.args.world_size,
                 # each rank's first epoch
                 "reads": [r[:len(train) // 2] for r in gather(train.read)]}
        if stage == 3:
            extra["eval_loss"] = trainer.evaluate(evaluation)["eval_loss"]
            prediction = trainer.predict(evaluation)
            extra["predictions_shape"] = list(prediction.predictions.shape)
        record(trainer, out, f"zero{stage}", **extra)

        if stage == 3:
            # The engine owns mixed precision (bf16 weights, fp32 masters); the model's own
            # activation checkpointing replays forwards that gather their units again.
            for name, option in (("bf16", {"bf16": True}),
                                 ("ckpt", {CHECKPOINTING_ARGUMENT: True}),
                                 ("compiled", {"torch_compile_backend": "aot_eager"})):
                train, _ = data()
                variant = zero_trainer(stage, os.path.join(out, f"scratch_{name}"), train, **option)
                variant.train()
                record(variant, out, f"zero3_{name}", compiled=variant.engine.is_compiled)

        if stage == 2:
            for name, (own, kw) in OWN.items():
                train, _ = data()
                variant = zero_trainer(stage, os.path.join(out, f"scratch_{name}"), train,
                                       own=own, **kw)
                variant.train()
                record(variant, out, f"zero2_{name}",
                       inner=type(variant.engine.optimizer.optimizer).__name__)

        if stage in COMPRESSED:
            train, _ = data()
            variant = zero_trainer(stage, os.path.join(out, f"scratch_compressed{stage}"), train,
                                   compression=COMPRESSED[stage])
            record(variant, out, f"zero{stage}_compressed", **trained(variant))

        for name in SHORT:
            trainer = short_window_run(
                lambda train, stage=stage: zero_trainer(
                    stage, os.path.join(out, "scratch_short"), train),
                name)
            record(trainer, out, f"zero{stage}_{name}")

        run_dir = os.path.join(out, f"run{stage}")
        train, _ = data()
        first = zero_trainer(stage, run_dir, train, save_strategy="steps",
                             save_steps=STOP_AT)
        first.add_callback(StopAt(STOP_AT))
        first.train()
        train, _ = data()
        resumed = zero_trainer(stage, run_dir, train)
        resumed.train(resume_from_checkpoint=os.path.join(run_dir, f"checkpoint-{STOP_AT}"))
        record(resumed, out, f"zero{stage}_resumed")


def gather(value):
    values = [None] * dist_world()
    dist.all_gather_object(values, value)
    return values


def single(out):
    train, evaluation = data()
    reference = Trainer(model=tiny_llama(len(train.vocab)),
                        args=arguments(os.path.join(out, "scratch_plain"), 1), train_dataset=train)
    reference.train()
    record(reference, out, "plain")
    for name in SHORT:
        trainer = short_window_run(lambda train: Trainer(
            model=tiny_llama(len(train.vocab)), train_dataset=train,
            args=arguments(os.path.join(out, "scratch_plain"), 1)), name)
        record(trainer, out, f"plain_{name}")

    for name, (own, kw) in OWN.items():
        train, _ = data()
        model = tiny_llama(len(train.vocab))
        plain = Trainer(model=model, train_dataset=train,
                        args=arguments(os.path.join(out, "scratch_plain"), 1, **kw),
                        optimizers=own(model) if callable(own) else (None, None))
        plain.train()
        record(plain, out, f"plain_{name}")

    # Label smoothing: the Trainer shifts a causal LM's labels by the model's class name.
    for name, make in (
            ("plain_smooth", lambda train: Trainer(
                model=tiny_llama(len(train.vocab)), train_dataset=train,
                args=arguments(os.path.join(out, "scratch_plain"), 1,
                               label_smoothing_factor=0.1))),
            ("zero2_smooth", lambda train: zero_trainer(
                2, os.path.join(out, "scratch_smooth"), train, label_smoothing_factor=0.1))):
        train, _ = data()
        smoothed = make(train)
        smoothed.train()
        record(smoothed, out, name)

    # A model built under zero_ext.Init, its weights read from save_pretrained's files into
    # the shards; lr 0, so the saved model must equal the pretrained one.
    torch.manual_seed(11)
    train, _ = data()
    source = tiny_llama(len(train.vocab))
    source.save_pretrained(os.path.join(out, "pretrained"), max_shard_size="20KB")
    with zero_ext.Init():
        empty = tiny_llama(len(train.vocab))
    loaded = ZeroTrainer(model=empty, train_dataset=train,
                         args=arguments(os.path.join(out, "scratch_pre"), 1, learning_rate=0.0,
                                        max_steps=1),
                         pretrained_weights=os.path.join(out, "pretrained"),
                         zero_config={"zero_optimization": {"stage": 3}})
    loaded.train()
    record(loaded, out, "zero3_pretrained")

    # Saved at two ranks, resumed at one.
    train, _ = data()
    resumed = zero_trainer(2, os.path.join(out, "run2"), train)
    resumed.train(resume_from_checkpoint=os.path.join(out, "run2", f"checkpoint-{STOP_AT}"))
    record(resumed, out, "zero2_resumed_1rank")

    # resume_from_checkpoint on a checkpoint whose engine state would run a command when
    # unpickled (its manifest re-made to match): refused, the command never runs.
    import shutil

    from checkpoint_safety_cases import RunsCode, rewrite_manifest

    from zero_ext.checkpoint import CheckpointError
    evil = os.path.join(out, "evil", f"checkpoint-{STOP_AT}")
    shutil.copytree(os.path.join(out, "run2", f"checkpoint-{STOP_AT}"), evil)
    marker = os.path.join(out, "evil_marker")
    state = os.path.join(evil, f"global_step{STOP_AT}", "engine_state.pt")
    crafted = torch.load(state, weights_only=False)
    crafted["client_state"] = RunsCode(marker)
    torch.save(crafted, state)
    rewrite_manifest(os.path.dirname(state), lambda manifest: None)
    train, _ = data()
    try:
        zero_trainer(2, os.path.join(out, "evil"), train).train(resume_from_checkpoint=evil)
        outcome = "resumed"
    except CheckpointError as error:
        outcome = str(error)
    with open(os.path.join(out, "evil.json"), "w") as f:
        json.dump({"outcome": outcome, "marker": os.path.exists(marker)}, f)

    # fp16 with a loss scale that overflows the first steps: they are skipped, and the LR
    # schedule starts with the first step taken.
    train, _ = data()
    fp16 = ZeroTrainer(model=tiny_llama(len(train.vocab)),
                       args=arguments(os.path.join(out, "scratch_fp16"), 1, fp16=True),
                       train_dataset=train, zero_config={
                           "fp16": {"enabled": "auto", "initial_scale_power": 24, "hysteresis": 1},
                           "zero_optimization": {"stage": 2}})
    fp16.train()
    engine = fp16.engine
    record(fp16, out, "fp16", skipped_steps=engine.skipped_steps,
           global_steps=engine.global_steps, scheduler_steps=engine.lr_scheduler.last_epoch)

    # load_best_model_at_end with "higher loss is better": the halfway checkpoint wins.
    train, evaluation = data()
    best = zero_trainer(3, os.path.join(out, "best"), train, evaluation, eval_strategy="steps",
                        eval_steps=STEPS // 2, save_strategy="steps", save_steps=STEPS // 2,
                        load_best_model_at_end=True, metric_for_best_model="loss",
                        greater_is_better=True)
    best.train()
    record(best, out, "best", best_checkpoint=os.path.basename(best.state.best_model_checkpoint))

    model = LlamaForCausalLM.from_pretrained(os.path.join(out, "zero3"))
    metrics = Trainer(model=model, args=arguments(os.path.join(out, "scratch_eval"), 1)).evaluate(
        evaluation)
    with open(os.path.join(out, "plain_eval.json"), "w") as f:
        json.dump({"eval_loss": metrics["eval_loss"],
                   "dtype": str(next(model.parameters()).dtype)}, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], sys.argv[2]
    {"distributed": distributed, "single": single}[mode](out)
