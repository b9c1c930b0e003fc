"""The runs tests/test_accelerate.py compares, in one launch of 2 CPU ranks.

    torchrun --nproc_per_node=2 tests/accelerate_script.py OUT
    ZERO_EXT_CONFIG=ds.json accelerate launch --multi_gpu --num_processes 2 \
        tests/accelerate_script.py OUT --env-config

One training loop written for accelerate (`train` below: accumulate, backward, clip_grad_norm_,
optimizer / scheduler step, gather) runs with plain `accelerate.Accelerator` (DDP over gloo,
fp32: the reference) and with zero_ext's Accelerator given a DeepSpeed-style config through
`DeepSpeedPlugin(hf_ds_config=...)`, at stages 1, 2 and 3: 44 samples, micro-batch 2 per
rank, 2 accumulation steps, so each epoch ends with a one-micro-batch window, 2 epochs, AdamW
with weight decay, a warm-up LambdaLR, clipping to 0.5. Stage 2 also stops after STOP_AT
micro-batches of the second epoch with save_state, and a new model (other initial weights)
and Accelerator load_state there and finish. The config-optimizer path (DummyOptim) runs
against DDP with the same AdamW; stage 3 writes save_model and logs to TensorBoard; an fp16
run skips its first steps on overflow; a tiny transformers GPT-2 at stage 3 checks the
zero3_init_flag warning, a build under zero_ext.Init and the save_state / load_state pre-hooks
(transformers_model_cases); misuse cases record their error messages. Rank 0
writes OUT/results.json, every run's final weights in OUT/weights.pt, and OUT/zero3_saved/
(save_model), OUT/zero3_logs/ (TensorBoard).
`--env-config` runs the stage-2 loop once more, its config from ZERO_EXT_CONFIG, into
OUT/results_env.json.
"""

import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator as PlainAccelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.deepspeed import DummyOptim
from torch import nn

from zero_ext.integrations.accelerate import Accelerator

SAMPLES, MICRO, ACCUMULATION, EPOCHS, STOP_AT = 44, 2, 2, 2, 4
CLIP = 0.5
OPTIM = {"lr": 2e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))


def dataset():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 8, generator=g)
    return torch.utils.data.TensorDataset(x, torch.sin(x[:, :4] * 2) + x[:, 4:] ** 2)


def ds_config(stage: int, **extra) -> dict:
    """A config as a DeepSpeed + accelerate user writes it: "auto" where accelerate fills it."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": CLIP, "zero_optimization": {"stage": stage}, **extra}


def fresh_state() -> None:
    """A new Accelerator per run in this process (accelerate keeps one shared state)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def train(make_accelerator, *, seed=0, config_optimizer=False, schedule=True, resume_from=None,
          stop_at=None, save_to=None, log=False, rmsprop=False):
    """The loop under test: exactly what an accelerate user writes (`make_accelerator` is the
    one line that differs). Returns the record of losses, grad norms and learning rates.
    `rmsprop`: a torch RMSprop in place of the AdamW (run on the engine's shards)."""
    fresh_state()
    accelerator = make_accelerator()
    model = build_model(seed)
    if config_optimizer:
        optimizer = DummyOptim(model.parameters(), lr=OPTIM["lr"],
                               weight_decay=OPTIM["weight_decay"])
    elif rmsprop:
        optimizer = torch.optim.RMSprop(model.parameters(), lr=OPTIM["lr"] / 4, momentum=0.5)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **OPTIM)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 6)) if schedule else None
    loader = torch.utils.data.DataLoader(dataset(), batch_size=MICRO, shuffle=False)
    prepared = accelerator.prepare(model, optimizer, loader, *([scheduler] if scheduler else []))
    model, optimizer, loader = prepared[:3]
    scheduler = prepared[3] if scheduler else None
    if log:
        accelerator.init_trackers("run")
    record = {"losses": [], "grad_norms": [], "lrs": [], "skipped": []}
    start_epoch, skip = 0, 0
    if resume_from is not None:
        accelerator.load_state(resume_from)
        start_epoch, skip = 1, STOP_AT
    batches = 0
    for epoch in range(start_epoch, EPOCHS):
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for x, y in epoch_loader:
            with accelerator.accumulate(model):
                loss = F.mse_loss(model(x).float(), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), CLIP)
                    record["grad_norms"].append(float(norm))
                    record["lrs"].append(optimizer.param_groups[0]["lr"])
                    record["skipped"].append(optimizer.step_was_skipped)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad()
            record["losses"].extend(accelerator.gather(loss.detach()[None]).tolist())
            if log and accelerator.sync_gradients:
                accelerator.log({"train/loss": loss.item()}, step=len(record["lrs"]))
            batches += 1
            if stop_at is not None and epoch == 1 and batches - len(loader) == stop_at:
                accelerator.save_state(save_to)
                return record, accelerator, model
    # Evaluation through the prepared model, a loader prepared later on its own: 10 samples
    # over 2 ranks in batches of 3, so gather_for_metrics drops the padding duplicates.
    model.eval()
    evaluation = accelerator.prepare(torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset(), range(10)), batch_size=3))
    with torch.no_grad():
        for x, y in evaluation:
            errors = F.mse_loss(model(x), y, reduction="none").mean(dim=1)
            record.setdefault("eval", []).extend(accelerator.gather_for_metrics(errors).tolist())
    if log:  # end_training() would also end the process group, which the next runs need
        for tracker in accelerator.trackers:
            tracker.finish()
    return record, accelerator, model


def plain():
    return PlainAccelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)


def zero(stage, **kwargs):
    """The changed line: zero_ext's Accelerator, a DeepSpeed plugin as with DeepSpeed."""
    config = kwargs.pop("config", None) or ds_config(stage)
    return lambda: Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION,
                               deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), **kwargs)


def final_weights(accelerator, model) -> dict:
    """The full weights (collective for the engine), as CPU tensors; {} on the ranks that get
    none (at stage 3 zero_ext, as DeepSpeed, returns them on the main process only)."""
    return {k: v.detach().to("cpu", copy=True)
            for k, v in (accelerator.get_state_dict(model) or {}).items()}


def error_of(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def misuse(out: str) -> dict:
    errors = {}
    fresh_state()
    errors["two_configs"] = error_of(lambda: Accelerator(
        cpu=True, zero_config=ds_config(2), deepspeed_plugin=DeepSpeedPlugin(
            hf_ds_config=ds_config(2))))
    fresh_state()
    errors["no_config"] = error_of(lambda: Accelerator(cpu=True))

    def clip_mismatch():
        fresh_state()
        accelerator = zero(2)()
        model = build_model(0)
        optimizer = torch.optim.AdamW(model.parameters(), **OPTIM)
        loader = torch.utils.data.DataLoader(dataset(), batch_size=MICRO)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        x, y = next(iter(loader))
        accelerator.backward(F.mse_loss(model(x), y))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)

    errors["clip_mismatch"] = error_of(clip_mismatch)

    def optimizer_twice():
        fresh_state()
        accelerator = zero(2, config=ds_config(2, optimizer={"type": "AdamW",
                                                             "params": {"lr": 1e-3}}))()
        model = build_model(0)
        accelerator.prepare(model, torch.optim.AdamW(model.parameters()),
                            torch.utils.data.DataLoader(dataset(), batch_size=MICRO))

    errors["optimizer_twice"] = error_of(optimizer_twice)
    return errors


def transformers_model_cases(out: str) -> dict:
    """A transformers model (a tiny GPT-2) at stage 3, whose DeepSpeedPlugin has zero3_init_flag
    on (the default at stage 3), as DeepSpeed + accelerate scripts build and save it: built
    plainly, prepare() says the flag had no effect (transformers built it whole; under DeepSpeed
    it would be partitioned); built under zero_ext.Init, it is partitioned as built, nothing is
    said, and it trains. Its save_state / load_state pre-hooks get what they get under
    DeepSpeed: the models list holding the engine, `weights` empty, and for loading no models;
    the save hook writes `unwrap_model(model).save_pretrained(...)` with get_state_dict's
    weights, as diffusers' and PEFT's scripts do."""
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    import zero_ext
    from zero_ext.zero.construction import is_init_partitioned

    architecture = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=8)
    config = ds_config(3, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(2))
    results = {}

    def prepare(accelerator, model):
        optimizer = torch.optim.AdamW(model.parameters(), **OPTIM)
        loader = torch.utils.data.DataLoader(ids, batch_size=MICRO)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prepared = accelerator.prepare(model, optimizer, loader)
        said = [str(w.message) for w in caught if "zero3_init_flag" in str(w.message)]
        return prepared, said

    fresh_state()
    accelerator = zero(3, config=config)()
    results["flag"] = accelerator.zero_plugin.zero3_init_flag
    torch.manual_seed(0)
    _, results["said_plain"] = prepare(accelerator, GPT2LMHeadModel(architecture))

    fresh_state()
    accelerator = zero(3, config=config)()
    hooks = {}

    def save_hook(models, weights, output_dir):
        hooks["save"] = [type(m).__name__ for m in models], len(weights)
        for model in models:
            module = accelerator.unwrap_model(model)
            hooks["unwrapped"] = type(module).__name__
            module.save_pretrained(os.path.join(output_dir, "hf"),
                                   is_main_process=accelerator.is_main_process,
                                   save_function=accelerator.save,
                                   state_dict=accelerator.get_state_dict(model))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(
        lambda models, input_dir: hooks.setdefault("load", [type(m).__name__ for m in models]))
    torch.manual_seed(0)
    with zero_ext.Init(config=config):
        model = GPT2LMHeadModel(architecture)
    partitioned = all(is_init_partitioned(p) and p.is_meta for p in model.parameters())
    every_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every_rank, partitioned)
    results["built_partitioned"] = every_rank
    (model, optimizer, loader), results["said_init"] = prepare(accelerator, model)
    losses = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    results["losses"] = losses
    folder = os.path.join(out, "gpt2_state")
    accelerator.save_state(folder)
    weights = final_weights(accelerator, model)
    accelerator.load_state(folder)
    results["hooks"] = hooks
    results["files"] = sorted(os.listdir(folder))
    if accelerator.is_main_process and "hf" in results["files"]:
        # what save_pretrained wrote loads as the trained weights
        reloaded = GPT2LMHeadModel.from_pretrained(os.path.join(folder, "hf")).state_dict()
        results["reloaded_error"] = max(
            (reloaded[name] - value).abs().max().item() for name, value in weights.items())
        results["reloaded_names"] = sorted(reloaded) == sorted(weights)
    return results


def main(out: str) -> None:
    results, weights = {}, {}
    record, accelerator, model = train(plain)
    results["plain"], weights["plain"] = record, final_weights(accelerator, model)
    for stage in (1, 2, 3):
        logged = {"log_with": "tensorboard", "project_dir": os.path.join(out, "zero3_logs")}
        record, accelerator, model = train(zero(stage, **(logged if stage == 3 else {})),
                                           log=stage == 3)
        results[f"zero{stage}"] = record
        weights[f"zero{stage}"] = final_weights(accelerator, model)
        # Which ranks got the weights: the main process alone (one host copy, not one per rank)
        held = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(held, bool(weights[f"zero{stage}"]))
        results[f"zero{stage}_weights_on"] = [rank for rank, got in enumerate(held) if got]
        results[f"zero{stage}_prepared"] = [type(model).__name__, model.stage,
                                            type(accelerator.unwrap_model(model)).__name__]
        if stage == 3:
            accelerator.save_model(model, os.path.join(out, "zero3_saved"))

    # A torch RMSprop: no sharded AdamW to adopt it, it steps the engine's fp32 shards.
    for name, make in (("zero3_rmsprop", zero(3)), ("plain_rmsprop", plain)):
        record, accelerator, model = train(make, rmsprop=True)
        results[name], weights[name] = record, final_weights(accelerator, model)

    # The Accelerator's dynamo_backend: the engine compiles the model (aot_eager: torch's
    # kernels, so the losses are the eager run's).
    record, accelerator, model = train(zero(3, dynamo_backend="aot_eager"))
    results["zero3_compiled"] = record
    results["zero3_compiled_is_compiled"] = model.is_compiled

    # Stopped with save_state mid-epoch, resumed by a new model and Accelerator.
    checkpoint = os.path.join(out, "checkpoint")
    record, _, _ = train(zero(2), stop_at=STOP_AT, save_to=checkpoint)
    results["zero2_stopped"] = record
    record, accelerator, model = train(zero(2), seed=5, resume_from=checkpoint)
    results["zero2_resumed"] = record
    weights["zero2_resumed"] = final_weights(accelerator, model)

    # The optimizer from the config, a DummyOptim in the loop, against DDP with that AdamW.
    adamw = {"type": "AdamW", "params": {"lr": "auto", "betas": list(OPTIM["betas"]),
                                         "eps": OPTIM["eps"], "weight_decay": "auto"}}
    record, accelerator, model = train(zero(2, config=ds_config(2, optimizer=adamw)),
                                       config_optimizer=True, schedule=False)
    results["zero2_config_optimizer"] = record
    weights["zero2_config_optimizer"] = final_weights(accelerator, model)
    record, accelerator, model = train(plain, schedule=False)
    results["plain_config_optimizer"] = record
    weights["plain_config_optimizer"] = final_weights(accelerator, model)

    # fp16 with a loss scale too large at first: the engine skips those steps, and the loop's
    # scheduler (accelerate's wrapper) stays where it was after each of them.
    fp16 = {"enabled": "auto", "auto_cast": True, "initial_scale_power": 20, "hysteresis": 1}
    record, _, _ = train(zero(2, config=ds_config(2, fp16=fp16), mixed_precision="fp16"))
    results["zero2_fp16"] = record

    results["transformers"] = transformers_model_cases(out) \
        if importlib.util.find_spec("transformers") else None
    results["errors"] = misuse(out)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f)
        torch.save(weights, os.path.join(out, "weights.pt"))


def main_env_config(out: str) -> None:
    """Under `accelerate launch --multi_gpu`, the config from ZERO_EXT_CONFIG: the loop's
    Accelerator line carries no zero_ext argument at all."""
    record, _, model = train(lambda: Accelerator(cpu=True,
                                                 gradient_accumulation_steps=ACCUMULATION))
    record["prepared"] = [type(model).__name__, model.stage]
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "results_env.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    if sys.argv[2:] == ["--env-config"]:
        main_env_config(sys.argv[1])
    else:
        main(sys.argv[1])
