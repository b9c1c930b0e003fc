"""The Lightning runs tests/test_lightning.py compares, all in one launch of 2 CPU ranks.

    torchrun --nproc_per_node=2 tests/lightning_cases.py OUT

The same tiny LightningModule (an MLP regression, fp32) on the same data, 5 batches per rank
and epoch with accumulate_grad_batches=2 (so each epoch ends with a one-batch window),
gradient_clip_val small enough to clip, a step-wise StepLR and max_steps=6 (two epochs):
Lightning's own DDP strategy (the reference), then ZeroStrategy at stages 1, 2 (by its
registered name, with a CSVLogger) and 3 (every parameter partitioned; a ModelCheckpoint
after the first epoch's last step, from which a new Trainer resumes with ckpt_path, once
more with strict_loading False and a buffer the checkpoint lacks, and from the last one
validate() loads; once more with the network built in configure_model, under
zero_ext.Init). Also: bf16-mixed and 16-true runs; a config that contradicts the Trainer;
manual optimization without clipping under DDP and ZeroStrategy; a config "optimizer" section
against DDP with that AdamW; a second fit() on one Trainer; a dict batch of token ids (tokens/s
in the logger); the standalone pytorch_lightning package. Rank 0 writes OUT/results.json: per run the losses of
rank 0's micro-batches, the learning rate and global gradient norm at each optimizer step,
trainer.global_step, the engine's step counts, the model summary's counts and the final
weights (as lists).
"""

import importlib.util
import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zero_ext.integrations.lightning import ZeroStrategy, convert_zero_checkpoint_to_fp32_state_dict
from zero_ext.zero.construction import is_init_partitioned

BATCH, BATCHES_PER_EPOCH, ACCUMULATE, MAX_STEPS = 4, 5, 2, 6
STEPS_PER_EPOCH = 3  # windows of 2, 2 and 1 batches
CLIP = 0.05
TOKENS_PER_SAMPLE = 6
STAGE3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    n = BATCH * BATCHES_PER_EPOCH * 2  # two ranks
    x = torch.randn(n, 8, generator=generator)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh() + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


class RegressionSteps:
    """The module's behaviour, on either package's LightningModule."""

    def __init__(self, seed: int = 0, lr: float = 0.02):
        super().__init__()
        self.save_hyperparameters()  # an AttributeDict in the checkpoint
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                 nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class Regression(RegressionSteps, pl.LightningModule):
    pass


class ManualRegression(Regression):
    """Manual optimization: one manual_backward and one opt.step() per batch, the schedule
    stepped by hand; Lightning then neither accumulates nor clips."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.lr_schedulers().step()
        return loss


class SGDRegression(Regression):
    """A torch SGD with its StepLR: run on the engine's fp32 shards (no AdamW to adopt)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9,
                                    weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class SwitchingRegression(Regression):
    """AdamW in the first fit, SGD in the second: the engine kept the first one's state."""

    fits = 0

    def configure_optimizers(self):
        self.fits += 1
        if self.fits == 1:
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class UnscheduledRegression(Regression):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)


class LateRegression(Regression):
    """The same network, built in configure_model (at stage 3 under zero_ext.Init)."""

    def __init__(self):
        super().__init__()
        del self.net
        self.built_partitioned = None

    def configure_model(self):
        if hasattr(self, "net"):
            return
        torch.manual_seed(self.hparams.seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                 nn.Linear(16, 1))
        self.built_partitioned = all(is_init_partitioned(p) for p in self.net.parameters())


class LooseRegression(Regression):
    """A buffer the checkpoint lacks (the module gained it since the save), with
    LightningModule.strict_loading False: the resume keeps the module's own value for it."""

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.register_buffer("extra", torch.full((3,), 7.0))
        self.strict_loading = False


class TokenRegression(pl.LightningModule):
    """Token ids inside a dict batch (as a language model's): the engine counts them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.head(self.embed(batch["ids"])).mean(1), batch["y"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def token_loader() -> DataLoader:
    x, y = dataset().tensors
    ids = (x[:, :TOKENS_PER_SAMPLE].abs() * 5).long().clamp(max=15)
    return DataLoader([{"ids": i, "y": t} for i, t in zip(ids, y)], batch_size=BATCH)


class Record(pl.Callback):
    """Per micro-batch loss, and per optimizer step the learning rate and the global gradient
    norm before clipping (DDP: from the all-reduced .grad; zero_ext: the engine's)."""

    def __init__(self):
        self.losses, self.lrs, self.norms = [], [], []
        self.engine_steps = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        if not isinstance(trainer.strategy, ZeroStrategy):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning's `loss` output is the loss divided by accumulate_grad_batches.
        self.losses.append(outputs["loss"].item() * ACCUMULATE)
        engine = getattr(trainer.strategy, "engine", None)
        if engine is not None and engine.global_steps != self.engine_steps:
            if self.engine_steps is not None:
                self.norms.append(engine.get_global_grad_norm())
            self.engine_steps = engine.global_steps

    def on_train_start(self, trainer, pl_module):
        engine = getattr(trainer.strategy, "engine", None)
        self.engine_steps = engine.global_steps if engine is not None else None


def trainer_for(strategy, max_steps=MAX_STEPS, callbacks=(), **kwargs):
    record = Record()
    kwargs = {"logger": False, "accumulate_grad_batches": ACCUMULATE, "gradient_clip_val": CLIP,
              "enable_model_summary": False, **kwargs}
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, num_nodes=1, strategy=strategy, max_steps=max_steps,
        callbacks=[record, *callbacks], enable_checkpointing=bool(callbacks),
        enable_progress_bar=False, num_sanity_val_steps=0, **kwargs)
    return trainer, record


def loader() -> DataLoader:
    return DataLoader(dataset(), batch_size=BATCH, shuffle=False)


def final_weights(trainer, module) -> dict:
    strategy = trainer.strategy
    state = strategy.engine.full_state_dict() if isinstance(strategy, ZeroStrategy) \
        else module.state_dict()
    return {k: v.float().flatten().tolist() for k, v in state.items()}


def summary(trainer, record, module) -> dict:
    out = {"losses": record.losses, "lrs": record.lrs, "norms": record.norms,
           "global_step": trainer.global_step, "weights": final_weights(trainer, module)}
    summaries = [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
    if summaries:  # the table Lightning printed at the start, as numbers
        table = summaries[0]._summary(trainer, module)
        out["summary"] = {"trainable": table.trainable_parameters,
                          "total": table.total_parameters, "per_layer": table.param_nums}
    if isinstance(trainer.strategy, ZeroStrategy):
        engine = trainer.strategy.engine
        out.update(engine_steps=engine.global_steps, engine_micro_steps=engine.micro_steps,
                   stage=engine.stage, dtype=str(engine.model_dtype),
                   partitioned=engine.partitioned is not None)
    return out


def fit(strategy, module=None, ckpt_path=None, **kwargs) -> dict:
    module = module or Regression()
    trainer, record = trainer_for(strategy, **kwargs)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return summary(trainer, record, module)


def refit(strategy, module=None) -> dict:
    """fit() twice on one Trainer, the second up to twice max_steps, with a module rate halved
    in between (a second phase, or lr_find's suggestion)."""
    module = module or Regression()
    trainer, record = trainer_for(strategy)
    trainer.fit(module, loader())
    trainer.fit_loop.epoch_loop.max_steps = 2 * MAX_STEPS
    module.hparams.lr /= 2
    trainer.fit(module, loader())
    return {"lrs": record.lrs, "global_step": trainer.global_step}


def fit_pytorch_lightning() -> dict:
    """The standalone package's Trainer with its ZeroStrategy, by registered name (stage 2)."""
    import pytorch_lightning as ptl

    import zero_ext.integrations.pytorch_lightning  # noqa: F401 - registers the names there

    class StandaloneRegression(RegressionSteps, ptl.LightningModule):
        pass

    module = StandaloneRegression()
    trainer = ptl.Trainer(
        accelerator="cpu", devices=2, num_nodes=1, strategy="zero_ext_stage_2",
        max_steps=MAX_STEPS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=CLIP,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, loader())
    return {"global_step": trainer.global_step, "strategy": type(trainer.strategy).__module__,
            "weights": {k: v.float().flatten().tolist()
                        for k, v in trainer.strategy.engine.full_state_dict().items()}}


def main(out: str) -> None:
    # Stage 3 also saves a checkpoint after the first epoch's last step (where Lightning's own
    # DDP resume is exact: from mid-epoch it replays the epoch's first batches, and from an
    # on_train_epoch_end checkpoint it runs one batch more).
    checkpoints = os.path.join(out, "checkpoints")
    every_epoch = ModelCheckpoint(dirpath=checkpoints, filename="{step}", save_top_k=-1,
                                  every_n_train_steps=STEPS_PER_EPOCH)
    results = {"ddp": fit("ddp", enable_model_summary=True),
               "zero1": fit(ZeroStrategy(stage=1)),
               "zero3": fit(ZeroStrategy(config=STAGE3), callbacks=[every_epoch],
                            enable_model_summary=True)}
    late = LateRegression()
    results["zero3_configure_model"] = fit(ZeroStrategy(config=STAGE3), late)
    results["zero3_configure_model"]["built_partitioned"] = late.built_partitioned
    # The registered name, with Lightning's CSV logger receiving the engine's figures.
    results["zero2"] = fit("zero_ext_stage_2", log_every_n_steps=1,
                           logger=CSVLogger(os.path.join(out, "csv"), name="run", version=0))
    trainer, _ = trainer_for(ZeroStrategy(stage=2), log_every_n_steps=1,
                             logger=CSVLogger(os.path.join(out, "csv"), name="tokens", version=0))
    trainer.fit(TokenRegression(), token_loader())
    # A new Trainer resumes from the first epoch's checkpoint, with a module whose own initial
    # weights differ (the checkpoint must replace them).
    ckpt = os.path.join(checkpoints, f"step={STEPS_PER_EPOCH}.ckpt")
    results["ckpt_is_dir"] = os.path.isdir(ckpt)
    results["resumed"] = fit(ZeroStrategy(config=STAGE3), Regression(seed=1), ckpt_path=ckpt)
    # The same resume with strict_loading False and a buffer the checkpoint lacks.
    loose = LooseRegression(seed=1)
    try:
        results["resumed_not_strict"] = fit(ZeroStrategy(config=STAGE3), loose, ckpt_path=ckpt)
        results["resumed_not_strict"]["extra"] = loose.extra.tolist()
    except Exception as error:  # noqa: BLE001 - the test names what failed
        results["resumed_not_strict"] = {"error": f"{type(error).__name__}: {error}"[:500]}
    # validate() loads the final checkpoint's weights into a fresh module and engine.
    trainer, _ = trainer_for(ZeroStrategy(config=STAGE3))
    final = os.path.join(checkpoints, f"step={MAX_STEPS}.ckpt")
    results["validated"] = trainer.validate(Regression(seed=1), loader(), ckpt_path=final,
                                            verbose=False)[0]["val_loss"]
    # Lightning's conversion to one file, which load_from_checkpoint reads without a strategy.
    if dist.get_rank() == 0:
        converted = convert_zero_checkpoint_to_fp32_state_dict(final, os.path.join(out, "f.pt"))
        loaded = Regression.load_from_checkpoint(os.path.join(out, "f.pt"))
        results["converted"] = {
            "global_step": converted["global_step"], "epoch": converted["epoch"],
            "weights": {k: v.flatten().tolist() for k, v in loaded.state_dict().items()}}

    # A config with an "optimizer" section: that one trains, configure_optimizers (AdamW and a
    # StepLR) is not called; the reference is DDP with the same AdamW and no schedule.
    results["ddp_unscheduled"] = fit("ddp", UnscheduledRegression())
    adamw = {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.1}}
    results["zero_config_optimizer"] = fit(ZeroStrategy(config={"optimizer": adamw}))

    results["ddp_sgd"] = fit("ddp", SGDRegression())
    results["zero_sgd"] = fit(ZeroStrategy(stage=2), SGDRegression())
    try:
        refit(ZeroStrategy(stage=2), SwitchingRegression())
        results["switched"] = "no error"
    except ValueError as error:
        results["switched"] = str(error)

    # Manual optimization, and no clipping (Lightning's default; zero_ext's would be 1.0).
    manual = {"accumulate_grad_batches": 1, "gradient_clip_val": None}
    results["ddp_manual"] = fit("ddp", ManualRegression(), **manual)
    results["zero_manual"] = fit(ZeroStrategy(stage=2), ManualRegression(), **manual)

    # A second fit() builds the optimizer and its schedule again under DDP: the schedule starts
    # again (ZeroStrategy's engine keeps its optimizer state, so only the rates compare).
    results["ddp_refit"] = refit("ddp")
    results["zero_refit"] = refit(ZeroStrategy(stage=2))
    # Without a schedule, the second fit's optimizer alone carries the new rate.
    results["ddp_refit_unscheduled"] = refit("ddp", UnscheduledRegression())
    results["zero_refit_unscheduled"] = refit(ZeroStrategy(stage=2), UnscheduledRegression())

    results["bf16"] = fit(ZeroStrategy(stage=2), precision="bf16-mixed")
    # fp16 weights with dynamic loss scaling (Lightning turns "16-mixed" into "bf16-mixed" on
    # CPU, so "16-true" here); a small initial scale, so that no step overflows.
    results["fp16"] = fit(ZeroStrategy(config={"fp16": {"initial_scale_power": 4}}),
                          precision="16-true", log_every_n_steps=1,
                          logger=CSVLogger(os.path.join(out, "csv"), name="fp16", version=0))

    try:
        fit(ZeroStrategy(config={"gradient_accumulation_steps": 4, "gradient_clipping": 1.0}))
        results["contradiction"] = None
    except ValueError as error:
        results["contradiction"] = str(error)

    results["pytorch_lightning"] = fit_pytorch_lightning() \
        if importlib.util.find_spec("pytorch_lightning") else None

    if dist.get_rank() == 0:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
