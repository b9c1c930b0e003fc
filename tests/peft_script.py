"""The runs tests/test_peft.py compares, in two process launches.

    torchrun --nproc_per_node=2 tests/peft_script.py distributed OUT   # ZeroTrainer, 2 ranks
    python tests/peft_script.py single OUT                           # the plain references

A tiny Llama with LoRA adapters on q_proj and v_proj (r=4: 128 values per adapter matrix),
trained for STEPS optimizer steps in fp32 with a checkpoint at SAVE_AT, then saved with
trainer.save_model(OUT/<case>). `distributed` runs CASES: stages 1 and 2, stage 3 with the
adapters kept whole (persistence threshold above their size) and partitioned (threshold 0),
a frozen bf16 base under fp32 adapters at stage 3, and (when bitsandbytes is installed) QLoRA:
a 4-bit NF4 base loaded with BitsAndBytesConfig, at stage 3. Afterwards rank 0 alone calls PEFT's own
`model.save_pretrained(OUT/<case>_own)` and records what happened. `single` trains the same
models with the plain Trainer in one process on the same global batch (PEFT's own saving).
Rank 0 writes OUT/<case>.json with the logged losses.
"""

import importlib.util
import json
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import (
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
from hf_trainer import TEXT, CharWindows, tiny_llama

from zero_ext.integrations.transformers import ZeroTrainer

STEPS, SAVE_AT = 6, 3
MICRO, GLOBAL_BATCH = 2, 8
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
# name: (stage, stage3_param_persistence_threshold, base dtype)
CASES = {
    "zero1": (1, None, torch.float32),
    "zero2": (2, None, torch.float32),
    "zero3_whole": (3, 1000, torch.float32),
    "zero3_partitioned": (3, 0, torch.float32),
    "zero3_bf16_base": (3, 0, torch.bfloat16),
}
QLORA = "4bit"  # base dtype of the QLoRA case
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
if HAS_BITSANDBYTES:
    CASES["zero3_qlora"] = (3, 0, QLORA)


def lora_model(vocab: int, base_dtype, scratch: str):
    """The same initial adapters on every rank and in the reference (seeded)."""
    if base_dtype == QLORA:
        base = quantized_base(vocab, scratch)
    else:
        base = tiny_llama(vocab, seed=0).to(base_dtype)
    torch.manual_seed(1)
    return get_peft_model(base, LoraConfig(**LORA))


def quantized_base(vocab: int, scratch: str, storage: torch.dtype = torch.uint8):
    """A 4-bit NF4 Llama, as QLoRA loads it, its codes packed in `storage` elements
    (bnb_4bit_quant_storage). bitsandbytes' CPU 4-bit matmul needs layers at least one
    quantization block (64) wide, hence this wider model."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False))
    path = os.path.join(scratch, "qlora_base")
    model.save_pretrained(path)  # under torch.distributed, rank 0 writes it
    if dist.is_initialized():
        dist.barrier()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32,
                                      bnb_4bit_quant_storage=storage)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=quantization,
                                            device_map="cpu")


def data():
    with open(TEXT, encoding="utf-8") as f:
        return CharWindows(f.read(), 16, 32)


def arguments(out, world_size):
    return TrainingArguments(
        output_dir=out, max_steps=STEPS, learning_rate=1e-2, weight_decay=0.0,
        max_grad_norm=1.0, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=GLOBAL_BATCH // (MICRO * world_size), logging_steps=1,
        save_strategy="steps", save_steps=SAVE_AT, report_to="none", disable_tqdm=True, seed=0,
        use_cpu=True)


def record(trainer, out, name, **extra):
    trainer.save_model(os.path.join(out, name))  # collective under ZeroTrainer
    if trainer.is_world_process_zero():
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"losses": losses, **extra}, f)


def distributed(out):
    world = int(os.environ["WORLD_SIZE"])
    for name, (stage, threshold, base_dtype) in CASES.items():
        train = data()
        zero = {"stage": stage}
        if threshold is not None:
            zero["stage3_param_persistence_threshold"] = threshold
        config = {"train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "zero_optimization": zero}
        model = lora_model(len(train.vocab), base_dtype, out)
        peft_total = model.get_nb_trainable_parameters()[1]  # before stage 3 partitions it
        trainer = ZeroTrainer(model=model,
                              args=arguments(os.path.join(out, f"run_{name}"), world),
                              train_dataset=train, zero_config=config)
        trainer.train()
        own = None
        if trainer.is_world_process_zero():
            # PEFT's own save on one rank, as a user would write it.
            try:
                trainer.model.save_pretrained(os.path.join(out, f"{name}_own"))
                own = "saved"
            except RuntimeError as error:
                own = str(error)
        # The FLOP estimate's parameter count against PEFT's own (4-bit weights unpacked).
        record(trainer, out, name, own=own, counted=trainer.engine.monitor.model_params,
               peft_total=peft_total)


def single(out):
    references = [("plain", torch.float32), ("plain_bf16_base", torch.bfloat16)]
    if HAS_BITSANDBYTES:
        references.append(("plain_qlora", QLORA))
    for name, base_dtype in references:
        train = data()
        trainer = Trainer(model=lora_model(len(train.vocab), base_dtype, out),
                          args=arguments(os.path.join(out, f"run_{name}"), 1),
                          train_dataset=train)
        trainer.train()
        record(trainer, out, name)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"distributed": distributed, "single": single}[sys.argv[1]](sys.argv[2])
