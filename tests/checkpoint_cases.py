"""What each rank runs in the checkpoint tests (tests/test_checkpoint.py).

Phase "save" trains and writes checkpoints; phase "load" runs in new processes (as a resumed
job does), loads them and trains on. The data of a step depends only on the step (and, for
the exact-resume cases, on the world size, which does not change there).
"""

from __future__ import annotations

import os
import signal

import torch

import zero_ext
from zero_ext import comm

from engine_cases import SEQ, VOCAB, build_model, config, global_batch, host_params, param_groups

RESUME_STAGES = (0, 1, 2, 3)
# (stage, dtype, accumulation): every stage in fp32; accumulation and fp16 (loss scale) at 2.
RESUME_CASES = [(s, "fp32", 1) for s in RESUME_STAGES] + [(2, "fp32", 2), (2, "fp16", 1)]
# Resharding: where a checkpoint is saved, as (world size, stage, offload of optimizer state
# and parameters); each loads at all the others.
RESHARD_POINTS = [(3, 3, False), (2, 1, False), (1, 0, False), (4, 2, False), (2, 3, True)]
GLOBAL_BATCH = 12  # samples per step, divisible by every world size used


def resume_config(stage: int, dtype: str, accumulation: int) -> dict:
    cfg = config(stage, dtype, accumulation, comm.world_size())
    # An LR that changes every step, so a lost or doubled scheduler step shows.
    cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 2,
        "total_num_steps": 20}}
    return cfg


def new_engine(cfg: dict, model=None):
    model = build_model() if model is None else model
    engine, _, _, _ = zero_ext.initialize(model=model, config=cfg,
                                          model_parameters=param_groups(model))
    return engine


def train(engine, first: int, steps: int, accumulation: int) -> None:
    world_size, rank = comm.world_size(), comm.rank()
    for step in range(first, first + steps):
        tokens, targets = global_batch(step, world_size, accumulation)
        for micro in range(accumulation):
            engine.backward(engine(tokens[micro, rank], targets[micro, rank]))
            engine.step()


def snapshot(engine) -> dict:
    """Everything exact resume must reproduce, from this rank."""
    shards = [(s.master.clone(), s.exp_avg.clone(), s.exp_avg_sq.clone(), float(s.step))
              for s in engine.optimizer.shards]
    return {"params": host_params(engine.module, engine), "shards": shards,
            "lr": engine.get_lr(), "counters": (engine.global_steps, engine.micro_steps,
                                                 engine.skipped_steps),
            "loss_scale": engine.loss_scaler.scale if engine.loss_scaler else None,
            "rng": torch.get_rng_state()}


def resume_save(root: str) -> dict:
    """Per case: 3 steps, a save, and 3 more steps: the run a resume must continue as
    (saving changes nothing of it; the reference)."""
    out = {}
    for case in RESUME_CASES:
        accumulation = case[2]
        engine = new_engine(resume_config(*case))
        train(engine, 0, 3, accumulation)
        torch.manual_seed(1234 + comm.rank())  # RNG state that the load must bring back
        params_at_save = host_params(engine.module, engine)
        path = engine.save_checkpoint(os.path.join(root, _case_dir(case)),
                                      client_state={"epoch": 7, "note": [1, 2]})
        rng_at_save = torch.get_rng_state()
        train(engine, 3, 3, accumulation)
        out[case] = {"uninterrupted": snapshot(engine), "path": path,
                     "rng_at_save": rng_at_save, "params_at_save": params_at_save}
    return out


def resume_load(root: str) -> dict:
    out = {}
    for case in RESUME_CASES:
        accumulation = case[2]
        torch.manual_seed(999)  # anything but the saved state
        engine = new_engine(resume_config(*case))
        path, client_state = engine.load_checkpoint(os.path.join(root, _case_dir(case)))
        rng_after_load = torch.get_rng_state()
        train(engine, 3, 3, accumulation)
        out[case] = {"resumed": snapshot(engine), "client_state": client_state, "path": path,
                     "rng_after_load": rng_after_load}
    return out


def _case_dir(case) -> str:
    stage, dtype, accumulation = case
    return f"resume_s{stage}_{dtype}_acc{accumulation}"


# -- resharding: one global batch split over however many ranks there are --------------------
def point_name(point) -> str:
    world_size, stage, offload = point
    return f"ws{world_size}-stage{stage}{'-offload' if offload else ''}"


def reshard_config(point) -> dict:
    _, stage, offload = point
    zero = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}} \
        if offload else {}
    cfg = config(stage, "fp32", 1, comm.world_size(), **zero)
    cfg["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // comm.world_size()
    return cfg


def train_split(engine, first: int, steps: int) -> list[float]:
    world_size, rank = comm.world_size(), comm.rank()
    per_rank = GLOBAL_BATCH // world_size
    norms = []
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(5000 + step)
        tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
        targets = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        engine.backward(engine(tokens[mine], targets[mine]))
        engine.step()
        norms.append(engine.get_global_grad_norm())
    return norms


def reshard_save(root: str, point) -> dict:
    """3 steps at this point (world size, stage, offload), saved, and 3 more: the run the
    checkpoints loaded at this point must continue as (saving changes nothing of it)."""
    engine = new_engine(reshard_config(point))
    norms = train_split(engine, 0, 3)
    engine.save_checkpoint(os.path.join(root, point_name(point)), tag="step3")
    model_file = engine.save_16bit_model(os.path.join(root, "model-" + point_name(point)))
    full_state = engine.full_state_dict()
    norms += train_split(engine, 3, 3)
    uninterrupted = {"params": host_params(engine.module, engine), "norms": norms}
    return {"uninterrupted": uninterrupted, "full_state": full_state, "model_file": model_file}


def reshard_load(root: str, point) -> dict:
    """Loads every checkpoint saved at another point, trains 3 more steps."""
    out = {}
    for saved in RESHARD_POINTS:
        if saved == point:
            continue
        engine = new_engine(reshard_config(point))
        engine.load_checkpoint(os.path.join(root, point_name(saved)))
        loaded = host_params(engine.module, engine)
        norms = train_split(engine, 3, 3)
        out[saved] = {"loaded": loaded, "norms": norms,
                      "params": host_params(engine.module, engine), "steps": engine.global_steps}
    return out


# -- crash safety and corruption ----------------------------------------------------------------
def crash_save(root: str) -> None:
    """Saves 'good' after one step; during the save of 'bad' after another, rank 1 is killed
    with SIGKILL in the middle of writing its shard."""
    from zero_ext.checkpoint import engine_state
    from zero_ext.checkpoint.files import TensorEntry, write_safetensors

    engine = new_engine(config(3, "fp32", 1, comm.world_size()))
    train(engine, 0, 1, 1)
    engine.save_checkpoint(root, tag="good")
    torch.save(host_params(engine.module, engine), os.path.join(root, f"good_params_"
                                                                      f"{comm.rank()}.pt"))
    train(engine, 1, 1, 1)
    if comm.rank() == 1:
        def killed_midway(path, entries, metadata=None):
            entries = list(entries)
            victim = entries[1]
            entries[1] = TensorEntry(victim.name, victim.dtype, victim.shape,
                                     lambda: os.kill(os.getpid(), signal.SIGKILL))
            return write_safetensors(path, entries, metadata)
        engine_state.write_safetensors = killed_midway
    engine.save_checkpoint(root, tag="bad")


def crash_load(root: str) -> dict:
    import warnings

    engine = new_engine(config(3, "fp32", 1, comm.world_size()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, _ = engine.load_checkpoint(root)
    out = {"path": path, "warnings": [str(w.message) for w in caught],
           "params": host_params(engine.module, engine)}
    try:
        engine.load_checkpoint(root, tag="bad")
        out["bad"] = "loaded"
    except zero_ext.checkpoint.CheckpointError as error:
        out["bad"] = str(error)
    return out


def load_checks(root: str, tags: list[str], good: str) -> dict:
    """Loads each damaged checkpoint under `root` (every rank must raise; none may hang or
    load), loads the good one at `good` without optimizer state, and saves with disagreeing
    tags."""
    out = {}
    for tag in tags:
        engine = new_engine(config(2, "fp32", 1, comm.world_size()))
        try:
            engine.load_checkpoint(root, tag=tag)
            out[tag] = "loaded"
        except zero_ext.checkpoint.CheckpointError as error:
            out[tag] = str(error)
    engine = new_engine(config(1, "fp32", 1, comm.world_size()))
    engine.load_checkpoint(os.path.dirname(good), tag=os.path.basename(good),
                           load_optimizer_states=False)
    out["weights_only"] = {"params": host_params(engine.module, engine),
                           "moments_zero": all(not s.exp_avg.any() and not s.exp_avg_sq.any()
                                               for s in engine.optimizer.shards),
                           "steps": [float(s.step) for s in engine.optimizer.shards],
                           "global_steps": engine.global_steps}
    try:
        engine.save_checkpoint(os.path.join(root, "disagree"), tag=f"t{comm.rank()}")
        out["disagree"] = "saved"
    except zero_ext.checkpoint.CheckpointError as error:
        out["disagree"] = str(error)
    out["disagree_written"] = os.path.exists(os.path.join(root, "disagree"))
    return out


def hf_llama_save(root: str) -> dict:
    """A tiny LlamaForCausalLM at stage 3: a checkpoint and save_16bit_model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    # An instruct model's own generation settings (end-of-turn tokens, sampling)
    model.generation_config.eos_token_id = [1, 5]
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    zcfg = config(3, "bf16", 1, comm.world_size())
    engine = zero_ext.initialize(model=model, config=zcfg)[0]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(comm.rank()))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(os.path.join(root, "llama"), tag="t")
    file = engine.save_16bit_model(os.path.join(root, "llama_16bit"))
    # Every rank writing its own copy (nodes without shared storage: save_on_each_node).
    each = engine.save_16bit_model(os.path.join(root, f"llama_16bit_rank{comm.rank()}"),
                                   writes=True)
    return {"full_state": engine.full_state_dict(), "file": file, "each": each,
            "moe": hf_moe_layout(root)}


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(1)
    return MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32))


def hf_moe_layout(root: str) -> dict:
    """A mixture of experts that transformers holds in another layout than its checkpoints
    (per-expert w1/w2/w3 in the files, stacked gate_up_proj/down_proj in the model): weights
    written by save_pretrained loaded into a stage-3 model built under zero_ext.Init, one step,
    then save_16bit_model."""
    source = os.path.join(root, "moe_pretrained")
    if comm.rank() == 0:
        tiny_mixtral().save_pretrained(source)
    torch.distributed.barrier()
    with zero_ext.Init():
        model = type(tiny_mixtral())(tiny_mixtral().config)
    engine = zero_ext.initialize(model=model, config=config(3, "fp32", 1, comm.world_size()))[0]
    unexpected = engine.load_weights(source)
    loaded = engine.full_state_dict()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(comm.rank()))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    file = engine.save_16bit_model(os.path.join(root, "moe_16bit"))
    return {"loaded": loaded, "unexpected": unexpected, "trained": engine.full_state_dict(),
            "source": source, "file": file}


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=32, tie_word_embeddings=True)


def pretrained_load(pretrained: str, wrong: str) -> dict:
    """Pretrained weights (save_pretrained, several files) loaded into engines at stages 3
    (model built under zero_ext.Init; fp32 and bf16) and 1; then a file for another model."""
    from transformers import LlamaForCausalLM

    out = {}
    for stage, dtype in ((3, "fp32"), (3, "bf16"), (1, "fp32")):
        cfg = config(stage, dtype, 1, comm.world_size())
        if stage == 3:
            with zero_ext.Init():
                model = LlamaForCausalLM(tiny_llama_config())
        else:
            model = LlamaForCausalLM(tiny_llama_config())
        engine = zero_ext.initialize(model=model, config=cfg)[0]
        unexpected = engine.load_weights(pretrained)
        masters = [s.master.clone() for s in engine.optimizer.shards]
        out[(stage, dtype)] = {"state": engine.full_state_dict(), "unexpected": unexpected,
                               "masters_fp32": all(m.dtype == torch.float32 for m in masters)}
        if (stage, dtype) == (3, "bf16"):
            # The fp32 masters must hold the file's fp32 values, not their bf16 cast: the test
            # consolidates this checkpoint's masters. Training then goes on from them.
            engine.save_checkpoint(os.path.join(os.path.dirname(pretrained), "bf16_ckpt"))
            ids = torch.arange(16).view(2, 8) % 64
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            out["bf16_trained"] = True
    try:
        engine.load_weights(wrong)
        out["wrong"] = "loaded"
    except zero_ext.checkpoint.CheckpointError as error:
        out["wrong"] = str(error)
    return out
