"""The runs tests/test_fused_engine.py compares, in one launch of 2 CPU ranks:

    torchrun --nproc_per_node=2 -m zero_ext.run tests/fused_engine_cases.py OUT

Engine: tiny transformers models (a Llama with its head tied to the embedding and untied, and
a GPT-2) trained under zero_ext.initialize at ZeRO stages 0-3, once with the config switch
`{"zero_ext": {"fused_kernels": {"enabled": true}}}` and once without, on the same seeds and
data (labels partly -100, a different count per rank). Each run records the losses of every
rank, the engine's global grad norms, the final full weights, the communication volume, which
fused kernels the first step's autograd graph went through, and at stage 3 what the head's
weight is outside the forward.

Trainer: ZeroTrainer at stage 3 with gradient accumulation (so the Trainer passes
num_items_in_batch) with the kernels off, with TrainingArguments(use_liger_kernel=True), with
the config switch, and a plain `Trainer(args=TrainingArguments(deepspeed=..., use_liger_kernel=
True))` that zero_ext.run (this launch) turns into a ZeroTrainer.

Rank 0 writes everything to OUT/results.pt.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zero_ext
from zero_ext import comm

import engine_cases

VOCAB, SEQ, MICRO, STEPS = 300, 12, 2, 3
ACCUMULATION = 2  # the Trainer runs: a global batch of 2 ranks x 2 x 2
# Adam's eps above the gradients' rounding noise. The fused ops sum in another order, so the
# gradients agree to ~5e-7 of their largest element, not exactly; at eps 1e-8 an element whose
# gradient is near zero turns that noise into an lr-sized step of either sign (1.6e-4 apart
# after three steps on GPT-2's c_proj). At 1e-3 such elements move in proportion to their
# gradient (runs agree to ~1e-7) while a lost or doubled gradient still moves weights by ~lr.
ADAM_EPS = 1e-3
MODELS = ("llama_tied", "llama_untied", "gpt2")
# Stage 3's default units leave a tied head's weight whole (it is shared by the embedding's
# unit and the head's, which the engine keeps out of any unit). These unit classes put it in
# the embedding's unit alone: the head then computes with a partitioned weight of another unit,
# what Liger's fused head gets wrong under DeepSpeed.
EMBEDDING_UNIT = {"llama_tied": ["LlamaDecoderLayer", "Embedding"],
                  "gpt2": ["GPT2Block", "Embedding"]}
# (model, stage, units): units None (the engine's default) or "embedding" (EMBEDDING_UNIT).
CASES = [(name, stage, None) for name in MODELS for stage in (0, 1, 2, 3)] + \
    [(name, 3, "embedding") for name in EMBEDDING_UNIT]


def build(name: str):
    """A tiny model of `name` (MODELS), seeded: built from a config, nothing downloaded. GPT-2
    without dropout (the runs must be deterministic); its head is tied, its MLP a tanh GeLU."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                          n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=name == "llama_tied"))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's micro-batch of `step`: random tokens; the labels ignore (-100) the first
    `rank + 1 + step` positions of the second sample, so ranks count different tokens."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ), generator=gen)
    labels = tokens.clone()
    labels[1, :rank + 1 + step] = -100
    return tokens, labels


KINDS = ("cross_entropy", "norm", "swiglu", "gelu")  # what the zero_ext ops' names contain


def fused_kinds(loss: torch.Tensor) -> list[str]:
    """The KINDS of zero_ext ops whose backward nodes `loss`'s autograd graph holds (sorted):
    evidence, independent of how apply() swaps them in, that the fused kernels ran. Nodes of
    ops registered through torch.library are named GeneratedBackwardFor_zero_ext_<op>_..."""
    seen, found, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = node.name()
        if "zero_ext_" in name:
            found.update(kind for kind in KINDS if kind in name)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found)


def engine_run(name: str, stage: int, units: str | None, fused: bool) -> dict:
    """STEPS optimizer steps of `name` under the engine at `stage` (and `units`, see CASES),
    kernels on or off."""
    model = build(name)
    zero = {"stage3_unit_classes": EMBEDDING_UNIT[name]} if units == "embedding" else {}
    config = engine_cases.config(stage, "fp32", 1, int(os.environ["WORLD_SIZE"]), **zero)
    config["optimizer"]["params"]["eps"] = ADAM_EPS
    config["zero_ext"] = {"fused_kernels": {"enabled": fused}}
    engine, _, _, _ = zero_ext.initialize(model=model, config=config)
    world_size, rank = comm.world_size(), comm.rank()  # the group exists from here
    comm.traffic.reset()
    losses, norms, out = [], [], {}
    for step in range(STEPS):
        tokens, labels = batch(step, rank)
        output = engine(input_ids=tokens, labels=labels)
        if step == 0:
            out["kinds"] = fused_kinds(output.loss)
            out["logits_none"] = output.logits is None
        engine.backward(output.loss)
        engine.step()
        losses.append(output.loss.item())
        norms.append(engine.get_global_grad_norm())
    out["traffic"] = dict(comm.traffic.elements)
    if stage == 3:  # the head's weight between steps: a released placeholder
        head = model.get_output_embeddings().weight
        out["head_numel_outside"] = head.numel()
        out["head_class"] = type(head).__name__
        out["head_unit"] = next((type(unit.module).__name__ for unit in engine.partitioned.units
                                 if any(p is head for members in unit.params for p in members)),
                                None)  # the class of the unit that partitions it
    with torch.no_grad():  # eval keeps the logits, and they equal the unfused model's
        model.eval()
        tokens, labels = batch(STEPS, rank)
        output = engine(input_ids=tokens, labels=labels)
        out["eval_loss"], out["eval_logits"] = output.loss.item(), output.logits.clone()
        model.train()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, losses)
    out["losses"], out["norms"] = gathered, norms
    out["weights"] = {k: v.clone() for k, v in engine.full_state_dict().items()}
    return out


def engine_cases_all() -> dict:
    return {(*case, fused): engine_run(*case, fused) for case in CASES for fused in (False, True)}


# -- the HF Trainer -------------------------------------------------------------------------
class Windows(torch.utils.data.Dataset):
    """16 samples of SEQ random tokens whose labels ignore a varying prefix: the accumulation
    window's micro-batches hold different numbers of tokens, so the Trainer's
    num_items_in_batch (the window's count) differs from each batch's mean."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        gen = torch.Generator().manual_seed(1000 + i)
        tokens = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        labels = tokens.clone()
        labels[:i % 7] = -100
        return {"input_ids": tokens, "labels": labels}


TRAINER_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def training_arguments(out: str, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out, max_steps=STEPS, learning_rate=1e-2, weight_decay=0.1,
        max_grad_norm=1.0, adam_epsilon=ADAM_EPS, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUMULATION, logging_steps=1, report_to="none",
        disable_tqdm=True, use_cpu=True, save_strategy="no", seed=0, **extra)


def trainer_run(kind: str, out: str) -> dict:
    """`kind`: "off", "liger" (use_liger_kernel=True), "switch" (the config's fused_kernels),
    or "run" (a plain Trainer with deepspeed= and use_liger_kernel=True, made a ZeroTrainer by
    zero_ext.run)."""
    from transformers import Trainer

    from zero_ext.integrations.transformers import ZeroTrainer

    scratch = os.path.join(out, "scratch", kind)
    model = build("llama_untied")
    if kind == "run":
        path = os.path.join(out, "ds_zero3.json")
        if comm.rank() == 0:
            with open(path, "w") as f:
                json.dump(TRAINER_CONFIG, f)
        dist.barrier()
        trainer = Trainer(model=model, train_dataset=Windows(), eval_dataset=Windows(),
                          args=training_arguments(scratch, deepspeed=path, use_liger_kernel=True))
    else:
        config = TRAINER_CONFIG
        if kind == "switch":
            config = {**config, "zero_ext": {"fused_kernels": {"enabled": True}}}
        trainer = ZeroTrainer(model=model, train_dataset=Windows(), eval_dataset=Windows(),
                              zero_config=config, args=training_arguments(
                                  scratch, use_liger_kernel=kind == "liger"))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"class": type(trainer).__name__, "losses": [e["loss"] for e in logs],
              "grad_norms": [e["grad_norm"] for e in logs],
              "eval_loss": trainer.evaluate()["eval_loss"]}
    result["weights"] = {k: v.clone() for k, v in trainer.engine.full_state_dict().items()}
    tokens, labels = batch(0, comm.rank())
    trainer.model.train()
    output = trainer.engine(input_ids=tokens, labels=labels)  # a training forward, no backward
    result["kinds"], result["logits_none"] = fused_kinds(output.loss), output.logits is None
    return result


def main(out: str) -> None:
    results = {"engine": engine_cases_all(),
               "trainer": {kind: trainer_run(kind, out) for kind in ("off", "liger", "switch",
                                                                     "run")}}
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
