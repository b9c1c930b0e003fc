"""What each rank runs in tests/test_checkpoint_safety.py: checkpoints that are data, never
code; crashes between the renames of a re-save; loads that fail half way; misuse that must be
refused with a clear error. Every case runs in one 2-rank group (`run_all`), each returning
plain values the tests compare.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings

import torch
from safetensors.torch import load_file, save_file

import zero_ext
from zero_ext import comm
from zero_ext.checkpoint import engine_state, format
from zero_ext.checkpoint.files import chunk_digests

from engine_cases import build_model, config, host_params, param_groups, train_steps


class RunsCode:
    """A pickled object whose unpickling would run `touch <marker>`: what an attacker puts in a
    checkpoint's client_state."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def new_engine(cfg: dict | None = None, model=None, groups=True):
    cfg = cfg or config(2, "fp32", 1, comm.world_size())
    model = build_model() if model is None else model
    return zero_ext.initialize(model=model, config=cfg,
                               model_parameters=param_groups(model) if groups else None)[0]


def state(engine) -> dict:
    """What a failed load must leave exactly as it was."""
    shards = [(s.master.clone(), s.exp_avg.clone(), s.exp_avg_sq.clone(), float(s.step))
              for s in engine.optimizer.shards] if engine.replicated_optimizer is None else []
    return {"params": host_params(engine.module, engine), "shards": shards,
            "lr": engine.get_lr(), "counters": (engine.global_steps, engine.micro_steps,
                                                 engine.skipped_steps)}


def unchanged(before: dict, after: dict) -> bool:
    return (before["counters"] == after["counters"] and before["lr"] == after["lr"]
            and all(torch.equal(a, b) for a, b in zip(before["params"].values(),
                                                      after["params"].values()))
            and all(torch.equal(x, y) for a, b in zip(before["shards"], after["shards"])
                    for x, y in zip(a[:3], b[:3]))
            and [s[3] for s in before["shards"]] == [s[3] for s in after["shards"]])


def attempt(fn, *args, **kwargs) -> str:
    """"ok" or the error's type and message."""
    return caught(fn, *args, **kwargs)[0]


def caught(fn, *args, **kwargs) -> tuple[str, list[str], object]:
    """("ok" or the error's type and message, the warnings it gave, its value)."""
    value = None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            value = fn(*args, **kwargs)
            outcome = "ok"
        except Exception as error:  # noqa: BLE001 - the tests read the message
            outcome = f"{type(error).__name__}: {error}"
    return outcome, [str(w.message) for w in seen], value


def rewrite_manifest(path: str, edit) -> None:
    """What an attacker (or an editor) does after changing a file: the manifest re-made to match,
    so checksums pass. `edit(manifest)` changes it further."""
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    for name, record in manifest["files"].items():
        file = os.path.join(path, name)
        record["bytes"] = os.path.getsize(file)
        record["sha256_chunks"] = list(chunk_digests(file, manifest["chunk_bytes"]))
    edit(manifest)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def on_rank0(fn, *args) -> None:
    """Filesystem set-up by rank 0, seen by every rank after the barrier."""
    if comm.rank() == 0:
        fn(*args)
    comm.barrier()


# -- 1: checkpoints are data ----------------------------------------------------------------
def crafted_checkpoints(root: str) -> dict:
    out = {}
    engine = new_engine()
    train_steps(engine, 1)
    good = engine.save_checkpoint(os.path.join(root, "good"), tag="t")
    marker = os.path.join(root, "marker")

    def craft():
        evil = os.path.join(root, "evil")
        shutil.copytree(os.path.join(root, "good"), evil)
        path = os.path.join(evil, "t", "engine_state.pt")
        saved = torch.load(path, weights_only=False)
        saved["client_state"] = {"epoch": 1, "payload": RunsCode(marker)}
        torch.save(saved, path)
        rewrite_manifest(os.path.dirname(path), lambda m: None)
        # `latest` values that leave the save directory.
        for name, value in (("absolute", good), ("dotdot", "../good/t"),
                            ("separator", "sub/t"), ("empty", "  \n")):
            os.makedirs(os.path.join(root, name, "sub"))
            with open(os.path.join(root, name, "latest"), "w") as f:
                f.write(value)
        os.symlink(os.path.join(root, "good", "t"), os.path.join(root, "separator", "sub", "t"))

    on_rank0(craft)
    fresh = new_engine()
    before = state(fresh)
    out["evil"] = attempt(fresh.load_checkpoint, os.path.join(root, "evil"))
    out["evil_marker"] = os.path.exists(marker)
    for name in ("absolute", "dotdot", "separator", "empty"):
        out[name] = attempt(fresh.load_checkpoint, os.path.join(root, name))
    out["unchanged"] = unchanged(before, state(fresh))
    # A client_state that is not plain data is refused when saving, nothing written.
    out["save_object"] = attempt(engine.save_checkpoint, os.path.join(root, "obj"),
                                 client_state={"ok": [1, 2], "sampler": RunsCode(marker)})
    import numpy as np
    out["save_numpy"] = attempt(engine.save_checkpoint, os.path.join(root, "obj"),
                                client_state={"rng": np.float64(1.5)})
    out["obj_written"] = os.path.exists(os.path.join(root, "obj", "global_step1")) or \
        os.path.exists(os.path.join(root, "obj", "global_step1.partial"))
    # Every allowed type comes back as it was.
    plain = {"none": None, "flag": True, "n": 3, "x": 1.5, "z": 2j, "s": "a", "b": b"x",
             "ba": bytearray(b"y"), "list": [1, (2, 3)], "set": {4, 5},
             "od": __import__("collections").OrderedDict(k=1), "t": torch.arange(3),
             "size": torch.Size([2, 3]), "dtype": torch.bfloat16, "dev": torch.device("cpu"),
             (1, "key"): "tuple key"}
    engine.save_checkpoint(os.path.join(root, "plain"), client_state=plain)
    _, client = new_engine().load_checkpoint(os.path.join(root, "plain"))
    out["plain_back"] = client
    out["plain"] = plain
    return out


# -- item 6: a re-save of a fixed tag, interrupted between its renames ---------------------------
class Crash(Exception):
    pass


def _crash_at(point: str, save_dir: str):
    """Patches the filesystem calls of a re-save so that it stops at `point`, as a killed job
    would: nothing after it runs."""
    real_replace, real_rmtree = os.replace, shutil.rmtree
    final = os.path.join(save_dir, "last")

    def replace(src, dst, *a, **k):
        if point == "before_first_rename" and os.fspath(src) == final:
            raise Crash(point)
        if point == "between_renames" and os.fspath(dst) == final:
            raise Crash(point)
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if point == "before_removing_old" and os.fspath(path).endswith(".replaced"):
            raise Crash(point)
        return real_rmtree(path, *a, **k)

    os.replace, shutil.rmtree = replace, rmtree
    return lambda: (setattr(os, "replace", real_replace), setattr(shutil, "rmtree", real_rmtree))


def interrupted_resave(root: str) -> dict:
    out = {}
    for point in ("before_first_rename", "between_renames", "before_removing_old"):
        save_dir = os.path.join(root, point)
        engine = new_engine()
        train_steps(engine, 1)
        engine.save_checkpoint(save_dir, tag="last")
        old = host_params(engine.module, engine)
        train_steps(engine, 1)
        new = host_params(engine.module, engine)
        restore = _crash_at(point, save_dir) if comm.rank() == 0 else (lambda: None)
        try:
            crashed = attempt(engine.save_checkpoint, save_dir, tag="last")
        finally:
            restore()
        comm.barrier()
        listing = sorted(os.listdir(save_dir))
        fresh = new_engine()
        loaded, seen, _ = caught(fresh.load_checkpoint, save_dir)
        got = host_params(fresh.module, fresh)
        which = "new" if all(torch.equal(got[k], new[k]) for k in new) else \
            "old" if all(torch.equal(got[k], old[k]) for k in old) else "neither"
        # The next save of the tag puts things back in order.
        train_steps(engine, 1)
        engine.save_checkpoint(save_dir, tag="last")
        after = sorted(os.listdir(save_dir))
        out[point] = {"crashed": crashed, "listing": listing, "loaded": loaded, "which": which,
                      "warnings": seen, "after": after,
                      "global_steps": fresh.global_steps}
    return out


# -- item 7: a load that fails half way changes nothing ---------------------------------------
def failed_loads(root: str) -> dict:
    out = {}
    engine = new_engine()
    train_steps(engine, 2)
    engine.save_checkpoint(os.path.join(root, "plain"), tag="t")
    # A config with a scheduler, the checkpoint without one.
    cfg = config(2, "fp32", 1, comm.world_size())
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}
    fresh = new_engine(cfg)
    train_steps(fresh, 1)
    before = state(fresh)
    out["scheduler"] = attempt(fresh.load_checkpoint, os.path.join(root, "plain"))
    out["scheduler_unchanged"] = unchanged(before, state(fresh))
    # One parameter group here, two in the checkpoint.
    fresh = new_engine(groups=False)
    train_steps(fresh, 1)
    before = state(fresh)
    out["groups"] = attempt(fresh.load_checkpoint, os.path.join(root, "plain"))
    out["groups_unchanged"] = unchanged(before, state(fresh))
    # A frozen parameter of another shape.
    model = build_model()
    model.frozen_shift = torch.nn.Parameter(torch.zeros(model.frozen_shift.numel() + 1),
                                            requires_grad=False)
    fresh = new_engine(model=model)
    before = state(fresh)
    out["shape"] = attempt(fresh.load_checkpoint, os.path.join(root, "plain"))
    out["shape_unchanged"] = unchanged(before, state(fresh))
    return out


# -- item 9: resume with a changed config -------------------------------------------------------
def changed_config(root: str) -> dict:
    out = {}
    engine = new_engine()
    train_steps(engine, 2)
    engine.save_checkpoint(os.path.join(root, "cfg"), tag="t")
    saved_groups = [{k: v for k, v in g.items() if k != "params"}
                    for g in engine.optimizer.param_groups]
    cfg = config(2, "fp32", 1, comm.world_size())
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.2,
                                                    "betas": [0.8, 0.99], "eps": 1e-6}}
    model = build_model()
    fresh = zero_ext.initialize(
        model=model, config=cfg,
        model_parameters=[{"params": g["params"]} for g in param_groups(model)])[0]
    out["values"] = caught(fresh.load_checkpoint, os.path.join(root, "cfg"))
    out["groups_after"] = [{k: v for k, v in g.items() if k != "params"}
                           for g in fresh.optimizer.param_groups]
    out["saved_groups"] = saved_groups
    # Adam (L2 weight decay) instead of AdamW: refused, unless the optimizer starts fresh.
    cfg["optimizer"] = {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.1,
                                                   "adam_w_mode": False}}
    fresh = new_engine(cfg)
    before = state(fresh)
    out["adam"] = attempt(fresh.load_checkpoint, os.path.join(root, "cfg"))
    out["adam_unchanged"] = unchanged(before, state(fresh))
    out["adam_fresh"] = attempt(fresh.load_checkpoint, os.path.join(root, "cfg"),
                                load_optimizer_states=False)
    out["adam_fresh_params"] = host_params(fresh.module, fresh)
    out["params_at_save"] = host_params(engine.module, engine)
    return out


# -- item 5: DeepSpeed's API around missing checkpoints, empty dirs, frozen parameters --------
def api_cases(root: str) -> dict:
    out = {}
    engine = new_engine()
    train_steps(engine, 1)
    before = state(engine)
    on_rank0(os.makedirs, os.path.join(root, "empty"))
    for name in ("empty", "missing"):
        out[name] = caught(engine.load_checkpoint, os.path.join(root, name))
    out["none_unchanged"] = unchanged(before, state(engine))
    cwd = os.getcwd()
    os.makedirs(os.path.join(root, f"cwd{comm.rank()}"))
    os.chdir(os.path.join(root, f"cwd{comm.rank()}"))
    try:
        out["empty_dir"] = attempt(engine.save_checkpoint, "")
        out["cwd_listing"] = sorted(os.listdir("."))
    finally:
        os.chdir(cwd)
    path = engine.save_checkpoint(os.path.join(root, "nofrozen"), tag="t",
                                  exclude_frozen_parameters=True)
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model_states.safetensors"), "pt") as f:
        out["model_states_keys"] = sorted(f.keys())
    fresh = new_engine()
    with torch.no_grad():
        fresh.module.frozen_shift.fill_(0.25)
    out["nofrozen_load"] = attempt(fresh.load_checkpoint, os.path.join(root, "nofrozen"))
    out["nofrozen_params"] = host_params(fresh.module, fresh)
    out["params_at_save"] = host_params(engine.module, engine)
    # The directory of one checkpoint passed instead of the directory holding them.
    out["tag_dir"] = attempt(fresh.load_checkpoint, path)
    return out


# -- item 6 (issue item 2) and 4: never save a worse state, or a diverged one --------------------
def never_worse(root: str) -> dict:
    out = {}
    engine = new_engine()
    train_steps(engine, 1)
    save_dir = os.path.join(root, "nan")
    engine.save_checkpoint(save_dir)
    out["same_step"] = caught(engine.save_checkpoint, save_dir)
    if comm.rank() == 1:
        shard = engine.optimizer.shards[-1]
        shard.master[0] = float("nan")
    out["nan"] = attempt(engine.save_checkpoint, save_dir, tag="later")
    out["nan_listing"] = sorted(os.listdir(save_dir))
    # Where rank 1's first element of the last bucket lies: the error must name it.
    names = {id(p): n for n, p in engine.module.named_parameters()}
    layout = engine.layouts[-1]
    first = layout.shard_range(1)[0]
    slot = next(s for s in layout.slots if s.offset <= first < s.offset + s.numel)
    out["nan_param"] = names[id(engine._params[slot.param_index])]
    out["nan_bucket"] = layout.index
    # Stage 0, where each rank steps its own replica: rank 1 missed one engine.step(). (The
    # engine's step now exchanges its decision, so a real skip is caught at the step's
    # collective by zero_ext.comm's stall report; the save must still refuse diverged
    # counters, whatever let them diverge.)
    engine = new_engine(config(0, "fp32", 1, comm.world_size()))
    train_steps(engine, 4)
    if comm.rank() == 1:
        engine.global_steps -= 1
        engine.micro_steps -= 1
    out["diverged"] = attempt(engine.save_checkpoint, os.path.join(root, "diverged"))
    return out


# -- item 12: clear errors ---------------------------------------------------------------------
def clear_errors(root: str) -> dict:
    out = {}
    engine = new_engine()
    train_steps(engine, 1)
    good = engine.save_checkpoint(os.path.join(root, "src"), tag="t")

    def craft():
        for name, edit in (("version_str", lambda m: m.update(version="1")),
                           ("no_files", lambda m: m.pop("files"))):
            shutil.copytree(good, os.path.join(root, "bad", name))
            manifest = os.path.join(root, "bad", name, "manifest.json")
            with open(manifest) as f:
                data = json.load(f)
            edit(data)
            with open(manifest, "w") as f:
                json.dump(data, f)
        with open(os.path.join(root, "a_file"), "w") as f:
            f.write("x")
        os.makedirs(os.path.join(root, "tagfile"))
        with open(os.path.join(root, "tagfile", "t"), "w") as f:
            f.write("x")
        os.makedirs(os.path.join(root, "locked"))
        # A lock held by a live process on this host (the test runner) ...
        with open(os.path.join(root, "locked", format.SAVE_LOCK), "w") as f:
            json.dump({"host": __import__("socket").gethostname(), "pid": os.getppid(),
                       "time": 0}, f)
        # ... and one left by a process that is gone.
        os.makedirs(os.path.join(root, "stale"))
        dead = __import__("subprocess").Popen(["true"])
        dead.wait()
        with open(os.path.join(root, "stale", format.SAVE_LOCK), "w") as f:
            json.dump({"host": __import__("socket").gethostname(), "pid": dead.pid, "time": 0},
                      f)
        os.makedirs(os.path.join(root, "full", "global_step0.partial"))
        with open(os.path.join(root, "full", "global_step0.partial", "junk"), "wb") as f:
            f.write(b"0" * 1000)

    on_rank0(craft)
    fresh = new_engine()
    for name in ("version_str", "no_files"):
        out[name] = attempt(fresh.load_checkpoint, os.path.join(root, "bad"), tag=name)
    out["save_into_file"] = attempt(engine.save_checkpoint, os.path.join(root, "a_file"))
    out["load_from_file"] = attempt(fresh.load_checkpoint, os.path.join(root, "a_file"))
    out["tag_is_file"] = attempt(engine.save_checkpoint, os.path.join(root, "tagfile"), tag="t")
    out["load_tag_file"] = attempt(fresh.load_checkpoint, os.path.join(root, "tagfile"), tag="t")
    out["locked"] = attempt(engine.save_checkpoint, os.path.join(root, "locked"))
    out["locked_written"] = os.path.exists(os.path.join(root, "locked", "global_step1"))
    out["stale"] = caught(engine.save_checkpoint, os.path.join(root, "stale"))
    out["stale_listing"] = sorted(os.listdir(os.path.join(root, "stale")))
    # A full disk on rank 1.
    real = engine_state.write_safetensors
    if comm.rank() == 1:
        def full(path, entries, metadata=None):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        engine_state.write_safetensors = full
    try:
        out["full"] = attempt(engine.save_checkpoint, os.path.join(root, "full"))
    finally:
        engine_state.write_safetensors = real
    out["full_listing"] = sorted(os.listdir(os.path.join(root, "full")))
    return out


# -- stage3_gather_16bit_weights_on_model_save ---------------------------------------------------
def model_save(root: str) -> dict:
    out = {}
    for gather in (False, True):
        engine = new_engine(config(3, "bf16", 1, comm.world_size(),
                                   stage3_gather_16bit_weights_on_model_save=gather))
        train_steps(engine, 1)
        out[gather] = caught(engine.save_16bit_model, os.path.join(root, f"m{gather}"))
        out[f"{gather}_full"] = engine.full_state_dict()
    return out


# -- a parameter frozen when saved and trainable now -----------------------------------------
def _full_states(engine) -> dict:
    """name -> (fp32 master, exp_avg, exp_avg_sq) of every trainable parameter (collective)."""
    from zero_ext.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    return {name: (safe_get_full_fp32_param(p).clone(),
                   safe_get_full_optimizer_state(p, "exp_avg").clone(),
                   safe_get_full_optimizer_state(p, "exp_avg_sq").clone())
            for name, p in engine.module.named_parameters() if p.requires_grad}


def unfrozen_since(root: str) -> dict:
    """fc1 and frozen_shift frozen when saved (kept whole, in model_states, at stages 0-2; at
    stage 3 fc1 is partitioned into the frozen shards, frozen_shift still whole), trainable in
    the loading model: loaded with their saved values and zero moments, the rest as saved;
    then two steps on. The test compares with torch AdamW started from the loaded state."""
    out = {}
    for stage in (0, 2, 3):
        cfg = config(stage, "fp32", 1, comm.world_size())
        model = build_model()
        model.fc1.requires_grad_(False)
        saver = new_engine(cfg, model)
        train_steps(saver, 2)
        saved = {"params": host_params(saver.module, saver), "states": _full_states(saver),
                 "steps": [float(s.step) for s in saver.optimizer.shards]}
        path = saver.save_checkpoint(os.path.join(root, f"stage{stage}"), tag="t")
        with open(os.path.join(path, "metadata.json")) as f:
            sources = {key: kind for key, kind, _ in json.load(f)["state_dict"]}
        model = build_model(seed=1)
        model.frozen_shift.requires_grad_(True)
        loader = new_engine(cfg, model)
        loaded, seen, _ = caught(loader.load_checkpoint, os.path.dirname(path), "t")
        result = {"saved": saved, "sources": sources, "loaded": loaded, "warnings": seen}
        if loaded == "ok":
            result["states"] = _full_states(loader)
            result["steps"] = [float(s.step) for s in loader.optimizer.shards]
            train_steps(loader, 2)
            result["trained"] = host_params(loader.module, loader)
        out[stage] = result
    return out


# -- `latest`'s temporaries ----------------------------------------------------------------------
def latest_temporaries(root: str) -> dict:
    """`latest.tmp.<pid>` files: none after a normal save; leftovers of an interrupted save
    (its process gone, or on another host: here a live process) ignored by a load and removed
    by the next save; a rename of `latest` that fails leaves none either."""
    out = {}
    save_dir = os.path.join(root, "dir")
    engine = new_engine()
    train_steps(engine, 1)
    engine.save_checkpoint(save_dir, tag="first")
    out["normal"] = sorted(os.listdir(save_dir))
    comm.barrier()  # every rank listed it before rank 0 adds to it

    def leave_temporaries():
        dead = __import__("subprocess").Popen(["true"])
        dead.wait()
        for pid in (dead.pid, os.getppid()):
            with open(os.path.join(save_dir, f"latest.tmp.{pid}"), "w") as f:
                f.write("never_saved")

    on_rank0(leave_temporaries)
    out["left"] = sorted(os.listdir(save_dir))
    fresh = new_engine()
    out["load"] = caught(fresh.load_checkpoint, save_dir)[:2]
    train_steps(engine, 1)
    out["save"] = caught(engine.save_checkpoint, save_dir, tag="second")[:2]
    out["after_save"] = sorted(os.listdir(save_dir))
    # The rename of `latest` fails (a directory in the way, an interrupt) on rank 0.
    real = os.replace
    if comm.rank() == 0:
        def replace(src, dst, *a, **k):
            if os.fspath(dst).endswith(os.sep + "latest"):
                raise OSError(errno.EIO, os.strerror(errno.EIO), dst)
            return real(src, dst, *a, **k)
        os.replace = replace
    try:
        out["failed_rename"] = attempt(engine.save_checkpoint, save_dir, tag="third")
    finally:
        os.replace = real
    comm.barrier()
    out["after_failed_rename"] = sorted(os.listdir(save_dir))
    return out


# -- load_weights from files without checksums ------------------------------------------------
def _edit_header(path: str, edit) -> None:
    """Rewrites a safetensors file's JSON header in place (same length, so the data stays where
    it is): what a bit flip or a broken writer leaves."""
    with open(path, "rb") as f:
        raw = f.read()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, (len(text), length)
    with open(path, "wb") as f:
        f.write(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length:])


def unchecksummed_weights(root: str) -> dict:
    """engine.load_weights reads safetensors files that carry no checksum. A corrupt header
    (a dtype zero_ext cannot read, a dtype whose size does not match the tensor's bytes) in
    the tensor read last (frozen_shift, after the trainable weights) is refused on every rank
    before anything is written, the engine as it was; so is a truncated file."""
    out = {}
    engine = new_engine()
    train_steps(engine, 1)
    good = engine.save_16bit_model(os.path.join(root, "good"))

    def retype(dtype):
        return lambda header: header["frozen_shift"].update(dtype=dtype)

    def corrupt():
        for name, edit in (("unknown_dtype", retype("F17")), ("wrong_dtype", retype("F16"))):
            os.makedirs(os.path.join(root, name))
            shutil.copy(good, os.path.join(root, name, "model.safetensors"))
            _edit_header(os.path.join(root, name, "model.safetensors"), edit)
        os.makedirs(os.path.join(root, "truncated"))
        with open(good, "rb") as f:
            data = f.read()
        with open(os.path.join(root, "truncated", "model.safetensors"), "wb") as f:
            f.write(data[:-8])
        # A complex tensor (a dtype the files hold) where the model's is real.
        tensors = load_file(good)
        tensors["frozen_shift"] = torch.complex(tensors["frozen_shift"].float(),
                                                tensors["frozen_shift"].float())
        os.makedirs(os.path.join(root, "complex"))
        save_file(tensors, os.path.join(root, "complex", "model.safetensors"))

    on_rank0(corrupt)
    fresh = new_engine()
    for name in ("unknown_dtype", "wrong_dtype", "truncated", "complex"):
        before = state(fresh)
        out[name] = attempt(fresh.load_weights, os.path.join(root, name))
        out[f"{name}_unchanged"] = unchanged(before, state(fresh))
    out["good"] = attempt(fresh.load_weights, good)
    return out


# -- compressed communication's state under another method at the load ----------------------
TOPK = {"gradients": {"method": "topk", "density": 0.1, "momentum": 0.9}}
INT8 = {"gradients": {"method": "int8", "error_feedback": True, "block_size": 16}}


def _compressed(compression: dict) -> dict:
    cfg = config(2, "fp32", 1, comm.world_size())
    cfg["zero_ext"] = {"compression": compression}
    return cfg


def _residual_sums(engine) -> dict[int, torch.Tensor]:
    """Per bucket: the sum over ranks of every rank's undelivered gradient (collective)."""
    out = {}
    for index, feedback in sorted(engine.compression.feedback.items()):
        flat = feedback.flat_total().float().clone()
        comm.all_reduce(flat)
        out[index] = flat
    return out


def compression_switch(root: str) -> dict:
    """Saved with top-k and its momentum. Loaded into int8 error feedback, which has no
    momentum: the momentum is dropped with one warning naming both methods, the residual mass
    carried over (within fp8's rounding), all decided before anything is written. Loaded into
    top-k at another density (resharded from the totals) from a copy whose rank-1 shard lacks
    a total its metadata lists: refused on every rank, the engine as it was."""
    out = {}
    saver = new_engine(_compressed(TOPK))
    train_steps(saver, 3)
    out["saved_mass"] = _residual_sums(saver)
    saver.save_checkpoint(os.path.join(root, "topk"), tag="t")
    out["saved_params"] = host_params(saver.module, saver)
    fresh = new_engine(_compressed(INT8))
    train_steps(fresh, 1)
    out["int8"] = caught(fresh.load_checkpoint, os.path.join(root, "topk"), tag="t")[:2]
    out["int8_params"] = host_params(fresh.module, fresh)
    out["int8_steps"] = fresh.global_steps
    out["int8_mass"] = _residual_sums(fresh)
    out["int8_trains"] = attempt(train_steps, fresh, 1)

    def drop_a_total():
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file
        shutil.copytree(os.path.join(root, "topk"), os.path.join(root, "no_total"))
        path = os.path.join(root, "no_total", "t", format.shard_file_name(1, 2))
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        del tensors["0.ef_total"]
        save_file(tensors, path, metadata=metadata)
        rewrite_manifest(os.path.dirname(path), lambda m: None)

    on_rank0(drop_a_total)
    fresh = new_engine(_compressed({"gradients": {**TOPK["gradients"], "density": 0.2}}))
    train_steps(fresh, 1)
    before = state(fresh)
    out["no_total"] = attempt(fresh.load_checkpoint, os.path.join(root, "no_total"), tag="t")
    out["no_total_unchanged"] = unchanged(before, state(fresh))
    return out


# -- a client_state that is plain data and still cannot be written -------------------------------
def unwritable_client_state(root: str) -> dict:
    """A client_state the data-only check lets through and torch.save cannot write (a chain of
    lists deeper than the recursion limit; a mkldnn tensor, which has no storage): every rank
    raises the same error, nothing is written, and the ranks train on together."""
    import functools
    import sys
    out = {}
    engine = new_engine()
    train_steps(engine, 1)
    values = {"deep": functools.reduce(lambda a, _: [a], range(sys.getrecursionlimit() + 1000),
                                       [])}
    if torch.backends.mkldnn.is_available():
        values["mkldnn"] = torch.ones(4).to_mkldnn()
    save_dir = os.path.join(root, "dir")
    for name, value in values.items():
        out[name] = attempt(engine.save_checkpoint, save_dir, tag="t",
                            client_state={"epoch": 1, "v": value})
    comm.barrier()
    out["listing"] = sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []
    out["trained_on"] = attempt(train_steps, engine, 1)
    out["saved_after"] = attempt(engine.save_checkpoint, save_dir, tag="t",
                                 client_state={"epoch": 1})
    return out


# -- dtypes safetensors holds beyond the common ones --------------------------------------------
class WithBuffers(torch.nn.Module):
    """TinyNet with a persistent complex rotary table (as some LLaMA ports keep freqs_cis)."""

    def __init__(self, real_freqs: bool = False):
        super().__init__()
        self.inner = build_model()
        freqs = torch.polar(torch.ones(4), torch.arange(4.0))
        self.register_buffer("freqs_cis", freqs.real.clone() if real_freqs else freqs)

    def forward(self, tokens, targets):
        return self.inner(tokens, targets)


def _with_more_buffers(engine):
    """Unsigned counters and an fp8 (fnuz) scale, added after initialize: gloo's broadcast at
    initialize (every rank starts from rank 0's buffers) takes none of these dtypes."""
    engine.module.register_buffer("counts", torch.tensor([1, 60000, 7], dtype=torch.uint16))
    engine.module.register_buffer("big", torch.tensor([2**40, 3], dtype=torch.uint64))
    engine.module.register_buffer("scale8", torch.tensor([0.5, 2.0]).to(torch.float8_e4m3fnuz))
    return engine


def _buffers(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


def _zero_buffers(engine) -> None:
    with torch.no_grad():
        for buffer in engine.module.buffers():
            buffer.copy_(torch.zeros_like(buffer))


def buffer_dtypes(root: str) -> dict:
    """A model whose buffers are complex64, uint16, uint64 and float8_e4m3fnuz: checkpointed,
    loaded, written by save_16bit_model and read by load_weights; a model that keeps the
    complex table as real numbers is refused before anything is written."""
    out = {}
    torch.manual_seed(0)
    engine = _with_more_buffers(new_engine(model=WithBuffers(), groups=False))
    train_steps(engine, 1)
    out["buffers"] = _buffers(engine.module)
    out["save"] = attempt(engine.save_checkpoint, os.path.join(root, "ck"), tag="t")
    fresh = _with_more_buffers(new_engine(model=WithBuffers(), groups=False))
    _zero_buffers(fresh)
    out["load"] = attempt(fresh.load_checkpoint, os.path.join(root, "ck"), tag="t")
    out["loaded"] = _buffers(fresh.module)
    out["model_save"] = caught(engine.save_16bit_model, os.path.join(root, "m"))
    _zero_buffers(fresh)
    out["weights"] = attempt(fresh.load_weights, os.path.join(root, "m"))
    out["weights_loaded"] = _buffers(fresh.module)
    real = _with_more_buffers(new_engine(model=WithBuffers(real_freqs=True), groups=False))
    before = state(real)
    out["real"] = attempt(real.load_checkpoint, os.path.join(root, "ck"), tag="t")
    out["real_unchanged"] = unchanged(before, state(real)) and \
        torch.equal(real.module.freqs_cis, torch.polar(torch.ones(4), torch.arange(4.0)).real)
    return out


# -- a model whose trainable parameters differ from the checkpoint's -------------------------------
def mismatched_models(root: str) -> dict:
    """fc1 renamed fc1_renamed; head untied from the embedding: refused (strict or not) with
    both sides named, and the way out the error gives (consolidate, rename the keys where they
    were renamed, load_weights) loads the saved weights."""
    from safetensors.torch import load_file, save_file

    from zero_ext.checkpoint import consolidate
    out = {}
    engine = new_engine()
    train_steps(engine, 1)
    path = engine.save_checkpoint(os.path.join(root, "saved"), tag="t")
    out["saved"] = host_params(engine.module, engine)
    weights = os.path.join(root, "weights.safetensors")
    renamed_file = os.path.join(root, "renamed.safetensors")

    def write_weights():
        consolidate(path, weights)
        save_file({k.replace("fc1.", "fc1_renamed."): v for k, v in load_file(weights).items()},
                  renamed_file)

    on_rank0(write_weights)
    renamed = build_model()
    renamed.fc1_renamed = renamed.fc1
    del renamed.fc1
    untied = build_model()
    untied.head.weight = torch.nn.Parameter(untied.embed.weight.detach().clone())
    for name, model, fixed in (("renamed", renamed, renamed_file), ("untied", untied, weights)):
        fresh = new_engine(model=model)
        before = state(fresh)
        for strict in (True, False):
            out[f"{name}_{strict}"] = attempt(fresh.load_checkpoint, os.path.dirname(path), "t",
                                              load_module_strict=strict)
        out[f"{name}_unchanged"] = unchanged(before, state(fresh))
        out[f"{name}_fix"] = attempt(fresh.load_weights, fixed)
        out[f"{name}_params"] = host_params(fresh.module, fresh)
    return out


def run_all(root: str, names: list[str] | None = None) -> dict:
    cases = {"crafted": crafted_checkpoints, "resave": interrupted_resave,
             "failed": failed_loads, "changed": changed_config, "api": api_cases,
             "worse": never_worse, "errors": clear_errors, "model": model_save,
             "unfrozen": unfrozen_since, "latest_tmp": latest_temporaries,
             "weights": unchecksummed_weights, "switch": compression_switch,
             "dtypes": buffer_dtypes, "mismatch": mismatched_models,
             # Last: before the fix, rank 0 raised alone here and the group stalled.
             "unwritable": unwritable_client_state}
    out = {}
    for name, fn in cases.items():
        if names is not None and name not in names:
            continue
        directory = os.path.join(root, name)
        on_rank0(os.makedirs, directory)
        out[name] = fn(directory)
    return out
