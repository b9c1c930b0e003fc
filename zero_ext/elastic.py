"""Elastic training: periodic checkpoints and auto-resume, for jobs that torchrun restarts.

Under ``torchrun --max-restarts=N`` (and ``--nnodes=MIN:MAX``) a failed worker group is started
again, possibly with fewer nodes; with ``{"zero_ext": {"checkpoint": {"dir": ..., "every_n_steps":
K, "auto_resume": true}}}`` the engine saves a checkpoint every K optimizer steps
(``after_step``, called by ``engine.step()``) and ``initialize`` loads the newest complete one
(``auto_resume``), at the job's new world size: checkpoints reshard. What it restores with the
weights, optimizer and scheduler: the step counters, RNG states (same world size) and every
registered checkpoint state, among them the ElasticSampler's data position, so the job goes on
with the global batch after the checkpoint's. At most the steps since the last checkpoint are
lost; they are redone with the same data.

The global batch stays ``train_batch_size`` at any world size when the config gives
``train_batch_size`` and ``train_micro_batch_size_per_gpu`` and leaves
``gradient_accumulation_steps`` to be derived (DeepSpeed's train_batch_size = micro x accumulation
x world size): 2 ranks x 2 micro-steps become 1 rank x 4. A config that fixes all three cannot
start at another world size and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings

from zero_ext import comm
from zero_ext.checkpoint.format import LATEST, has_manifest
from zero_ext.config import PeriodicCheckpointSettings

_PERIODIC_TAG = re.compile(r"global_step(\d+)")


class PeriodicCheckpoints:
    """Saves `engine`'s checkpoint every `every_n_steps` optimizer steps and keeps the newest
    `keep_last`. The decision depends only on global_steps, which every rank agrees on."""

    def __init__(self, engine, settings: PeriodicCheckpointSettings):
        self.engine = engine
        self.dir = settings.dir
        self.every_n_steps = settings.every_n_steps
        self.keep_last = settings.keep_last

    def after_step(self) -> None:
        if self.engine.global_steps % self.every_n_steps:
            return
        path = self.engine.save_checkpoint(self.dir)
        if self.engine.rank == 0:
            print(f"[zero_ext] step {self.engine.global_steps}: saved {path}", flush=True)
            if self.keep_last is not None:
                self._remove_old()

    def _remove_old(self) -> None:
        """Rank 0, after a save completed: all but the newest keep_last global_step<N>
        checkpoints go; a tag the user chose, and the one `latest` names, always stay."""
        with open(os.path.join(self.dir, LATEST), encoding="utf-8") as f:
            latest = f.read().strip()
        steps = sorted((int(m.group(1)), name) for name in os.listdir(self.dir)
                       if (m := _PERIODIC_TAG.fullmatch(name))
                       and has_manifest(os.path.join(self.dir, name)))
        for _, name in steps[:-self.keep_last]:
            if name != latest:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)


def check_restartable_launch() -> None:
    """Warns (rank 0) when torchrun may restart this job while its agents share their store
    with the workers (torch's default since 2.5): the store outlives an attempt, so a restarted
    group can read the previous attempt's keys (gloo's peer addresses: "connectFullMesh failed
    ... Connection refused"; zero_ext's stall reports) and fail or hang at start, at random.
    PyTorch issue 135712; torchrun's c10d rendezvous with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    starts a fresh store for every attempt (the static rendezvous always shares)."""
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("RANK") == "0" and \
            int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        warnings.warn(
            "zero_ext: torchrun may restart this job (--max-restarts "
            f"{env['TORCHELASTIC_MAX_RESTARTS']}) and shares its rendezvous store with the "
            "workers, where a restarted attempt can read the failed attempt's addresses and "
            "fail to connect (PyTorch issue 135712). Launch torchrun with the c10d rendezvous "
            "(--rdzv-backend=c10d, or --standalone on one node; the default static one always "
            "shares its store) and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment",
            stacklevel=3)


def periodic_checkpoints(engine) -> PeriodicCheckpoints | None:
    """The engine's periodic saver, or None when the config asks for none."""
    settings = engine.config.zero_ext.checkpoint
    return PeriodicCheckpoints(engine, settings) if settings.every_n_steps else None


def auto_resume(engine) -> str | None:
    """Collective. With ``zero_ext.checkpoint.auto_resume``, loads the newest complete
    checkpoint in the configured directory (the one `latest` names); returns its path, or
    None when there is none yet (a first start) or auto-resume is off."""
    settings = engine.config.zero_ext.checkpoint
    if not settings.auto_resume:
        return None
    found = comm.all_gather_object(os.path.isfile(os.path.join(settings.dir, LATEST)))
    if not any(found):
        if engine.rank == 0:
            print(f"[zero_ext] auto_resume: no checkpoint in {settings.dir} yet; starting at "
                  f"step 0", flush=True)
        return None
    # A rank that does not see it raises with every other rank in load_checkpoint.
    path, _ = engine.load_checkpoint(settings.dir)
    if engine.rank == 0:
        epoch_note = "".join(f", {name} {state}" for name, state in
                             engine.checkpoint_states.state().items())
        print(f"[zero_ext] auto_resume: resumed from {path} at step {engine.global_steps} with "
              f"{engine.world_size} rank(s){epoch_note}", flush=True)
    return path
