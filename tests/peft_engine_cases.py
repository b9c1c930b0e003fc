"""A tiny Llama with PEFT adapters (and a frozen tied embedding) on a zero_ext engine driven
directly, at stages 2 and 3 with every parameter partitioned: pretrained weights loaded with
engine.load_weights, DoRA trained, modules_to_save saved with PEFT's save_pretrained from
engine.full_state_dict(). Run by tests/test_peft_engine.py in one group of 2 ranks; rank 0
also trains the single-process references (torch AdamW on the whole batch, PEFT's own save).
"""

from __future__ import annotations

import os
import traceback
import warnings

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import zero_ext
from zero_ext import comm

VOCAB, MICRO, SEQ, STEPS, LR = 48, 2, 12, 3, 1e-2
STAGES = (2, 3)
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
ADAPTERS = {"dora": {**LORA, "use_dora": True}, "modules_to_save": {
    **LORA, "modules_to_save": ["lm_head"]}}


def tiny_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied))


def peft_model(kind: str):
    """The same initial adapters on every rank and in the reference (seeded)."""
    base = tiny_llama(tied=False)
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(**ADAPTERS[kind]))


def _config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # adapters partitioned too
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0, "steps_per_print": 10**6,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": zero}


def _batch(step: int, world_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(700 + step)
    return torch.randint(0, VOCAB, (world_size * MICRO, SEQ), generator=gen)


def _attempt(fn, *args):
    """fn's value, or its traceback's text: a failing case shows in its test, not as the
    group's failure."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 (reported to the test)
        return traceback.format_exc()


def _load_tied(path: str, stage: int) -> dict:
    model = tiny_llama(tied=True)
    model.model.embed_tokens.weight.requires_grad_(False)  # and so the tied LM head
    engine = zero_ext.initialize(model=model, config=_config(stage))[0]
    unexpected = engine.load_weights(path, strict=False)
    return {"state": engine.full_state_dict(), "unexpected": unexpected}


def _train(kind: str, stage: int, save_dir: str) -> dict:
    rank, world_size = comm.rank(), comm.world_size()
    model = peft_model(kind)
    counts = [model.get_nb_trainable_parameters()]
    engine = zero_ext.initialize(model=model, config=_config(stage))[0]
    counts.append(model.get_nb_trainable_parameters())  # stage 3: partitioned, released
    losses, gathers = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            ids = _batch(step, world_size)[rank * MICRO:(rank + 1) * MICRO]
            before = comm.traffic.calls["all_gather"]
            loss = engine(input_ids=ids, labels=ids).loss
            gathers.append(comm.traffic.calls["all_gather"] - before)  # in the forward
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    state = engine.full_state_dict()
    if rank == 0:
        model.save_pretrained(save_dir, state_dict=state)
    names = {module: name for name, module in model.named_modules()}
    units = [names[u.module] for u in engine.partitioned.units] if engine.partitioned else []
    layouts = sum(len(u.layouts) for u in engine.partitioned.units) if engine.partitioned else 0
    return {"losses": losses, "units": units, "gathers": gathers, "layouts": layouts,
            "counts": counts,
            "warnings": [str(w.message) for w in caught if "order" in str(w.message)],
            "trainable": {n: state[n] for n, p in model.named_parameters() if p.requires_grad}}


def _reference(kind: str, world_size: int, save_dir: str) -> dict:
    """Single process, the global batch of each step, torch AdamW; PEFT saves the adapters."""
    model = peft_model(kind)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
    for step in range(STEPS):
        ids = _batch(step, world_size)
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.save_pretrained(save_dir)
    return {"trainable": {n: p.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad}}


def peft_engine_cases(out: str) -> dict:
    rank, world_size = comm.rank(), comm.world_size()
    result = {}
    # Pretrained weights of a tied-embedding Llama: transformers' save_pretrained writes the
    # tied tensor once ("once"); a plain safetensors file of the state dict twice ("twice").
    if rank == 0:
        source = tiny_llama(tied=True, seed=5)
        source.save_pretrained(os.path.join(out, "tied_once"))
        os.makedirs(os.path.join(out, "tied_twice"))
        save_file({k: v.clone() for k, v in source.state_dict().items()},
                  os.path.join(out, "tied_twice", "model.safetensors"))
    torch.distributed.barrier()
    for files in ("once", "twice"):
        for stage in STAGES:
            result[("tied", files, stage)] = _attempt(
                _load_tied, os.path.join(out, f"tied_{files}"), stage)
    for kind in ADAPTERS:
        for stage in STAGES:
            result[(kind, stage)] = _attempt(_train, kind, stage,
                                             os.path.join(out, f"{kind}_zero{stage}"))
        if rank == 0:
            result[(kind, "reference")] = _reference(kind, world_size,
                                                     os.path.join(out, f"{kind}_reference"))
    return result if rank == 0 else {}
