"""What each rank runs in test_elastic.py's in-process checks (2 ranks, one group): the
ElasticSampler's batches against the permutation DistributedSampler draws, keep_last, auto-resume
at initialize, and the errors of a data position that does not fit."""

from __future__ import annotations

import os

import torch
from torch import nn

import zero_ext
from zero_ext import comm
from zero_ext.checkpoint.format import CheckpointError

SAMPLES, GLOBAL_BATCH, MICRO, STEPS = 40, 8, 2, 7  # 5 steps an epoch


def _config(directory: str | None, **checkpoint) -> dict:
    config = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": MICRO,
              "zero_optimization": {"stage": 1}}
    if directory is not None:
        config["zero_ext"] = {"checkpoint": {"dir": directory, **checkpoint}}
    return config


def _engine(config, samples: int | None = SAMPLES):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.arange(samples)) if samples else None
    engine, _, loader, _ = zero_ext.initialize(model=nn.Linear(1, 1), config=config,
                                              training_data=data)
    return engine, loader


def _train(engine, batches, steps: int) -> list[list[int]]:
    """`steps` optimizer steps; returns each step's global batch (ranks in order)."""
    trained = []
    for _ in range(steps):
        mine = []
        for _ in range(engine.batch.gradient_accumulation_steps):
            (index,) = next(batches)
            mine += index.tolist()
            engine.backward(engine(index.float().unsqueeze(1)).square().mean())
            engine.step()
        trained.append([i for part in comm.all_gather_object(mine) for i in part])
    return trained


def _error(fn) -> str | None:
    try:
        fn()
    except (CheckpointError, ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def run_cases(tmp: str) -> dict:
    out = {}
    ckpt = os.path.join(tmp, "ckpt")
    config = _config(ckpt, every_n_steps=1, keep_last=2, auto_resume=True)
    engine, loader = _engine(config)
    out["batches_per_epoch"] = len(loader)
    batches, trained = iter(loader), []
    while len(trained) < STEPS:
        try:
            trained += _train(engine, batches, 1)
        except StopIteration:  # the sampler moves to the next epoch by itself
            batches = iter(loader)
    out["trained"] = trained
    out["position"] = loader.batch_sampler.state_dict()
    comm.barrier()
    out["kept"] = sorted(name for name in os.listdir(ckpt) if not name.startswith("."))

    # A second job in the same directory resumes at initialize; its first global batch is the
    # one the first job trains next.
    resumed, resumed_loader = _engine(_config(ckpt, auto_resume=True))
    out["resumed_step"] = resumed.global_steps
    out["resumed_position"] = resumed_loader.batch_sampler.state_dict()
    out["next_resumed"] = _train(resumed, iter(resumed_loader), 1)
    out["next_first"] = _train(engine, batches, 1)

    # An iterator made before a load refuses to go on from the old position.
    stale = iter(loader)
    next(stale)
    engine.load_checkpoint(ckpt, tag="global_step7")
    out["stale_iterator"] = _error(lambda: [next(stale) for _ in range(3)])
    out["after_load"] = loader.batch_sampler.state_dict()

    # Another dataset size: refused at initialize's auto-resume, naming both sizes.
    out["other_dataset"] = _error(lambda: _engine(config, samples=SAMPLES + 1))
    # A checkpoint without the data position, loaded by an engine that has one.
    bare_dir = os.path.join(tmp, "bare")
    bare, _ = _engine(_config(None), samples=None)
    bare.save_checkpoint(bare_dir)
    with_sampler, _ = _engine(_config(None))
    out["missing_state"] = _error(lambda: with_sampler.load_checkpoint(bare_dir))
    # A position loaded before its sampler is registered waits for it.
    later, _ = _engine(_config(None), samples=None)
    later.load_checkpoint(ckpt)
    sampler = zero_ext.ElasticSampler(torch.utils.data.TensorDataset(torch.arange(SAMPLES)),
                                      later)
    out["registered_later"] = sampler.state_dict()
    return out
