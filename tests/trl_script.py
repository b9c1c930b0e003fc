"""The runs tests/test_trl.py compares, in one launch of 2 CPU ranks:

    torchrun --nproc_per_node=2 tests/trl_script.py OUT

For TRL's SFTTrainer, DPOTrainer (with a reference model and sync_ref_model, and with a LoRA
adapter and no reference model), GRPOTrainer (generation and a reward function) and
RewardTrainer: the TRL trainer itself under
DistributedDataParallel (TRL's own 2-rank run, the reference), and zero_trainer(<that class>)
at ZeRO stages 1, 2 and 3 (LoRA DPO and the reward trainer at stage 3 only), all fp32 with the same seeds,
data and global batch. Every rank then runs the same generation RNG stream as under DDP, so
GRPO samples the same completions. Rank 0 writes OUT/<name>.json (the logged losses and grad
norms) and each run's final weights go to OUT/<name>/model.safetensors (the LoRA run's adapters
to OUT/<name>/adapter_model.safetensors). OUT/guard.json holds
what a stage-3 read of lm_head.weight outside the model's forward does, with and without TRL's
gather context.

The tiny model, tokenizer and data are built here (nothing is downloaded); tests/trl_sft_cli.py
imports them.
"""

import json
import os
import string
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

import zero_ext

STEPS = 3
MICRO, ACCUMULATION = 2, 2  # x 2 ranks: a global batch of 8
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "far",
         "away"]
ZERO_CONFIG = {  # the Hugging Face docs' ZeRO config: "auto" wherever the arguments decide
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    # "auto" thresholds (10 x hidden size): the tiny model's layers really are partitioned.
    "zero_optimization": {"reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": True},
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of WORDS' alphabet, plus pad/eos/bos/unk."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for ch in string.ascii_lowercase + " .,!?":
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


def tiny_llama(vocab_size: int, classifier: bool = False, seed: int = 0):
    """Two decoder layers of width 32, untied head: above the "auto" persistence threshold, so
    stage 3 partitions the layers and lm_head (which TRL's fused head reads directly)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
                         eos_token_id=1, bos_token_id=2, num_labels=1)
    return (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)


def phrase(i: int, words: int) -> str:
    return " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(words))


def sft_dataset(count: int = 16) -> Dataset:
    return Dataset.from_list([{"text": phrase(i, 3 + i % 3)} for i in range(count)])


def preference_dataset(count: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": phrase(i, 2) + " ", "chosen": phrase(i + 1, 2 + i % 2),
                               "rejected": phrase(i + 5, 1 + i % 3)} for i in range(count)])


def prompt_dataset(count: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": phrase(i, 2)} for i in range(count)])


def count_a(completions, **kwargs) -> list[float]:
    """GRPO's reward: how many times the completion says "a"."""
    return [float(c.count("a")) for c in completions]


# Every run's training arguments (tests/trl_sft_cli.py gets them on its command line).
TRAINING = {"max_steps": STEPS, "learning_rate": 1e-2, "weight_decay": 0.1, "max_grad_norm": 1.0,
            "per_device_train_batch_size": MICRO, "gradient_accumulation_steps": ACCUMULATION,
            "logging_steps": 1, "report_to": "none", "disable_tqdm": True, "use_cpu": True,
            "save_strategy": "no", "seed": 0,
            # TRL's configs default to bf16; fp32 compares with the reference exactly.
            "bf16": False}


def arguments(config_class, out: str, **extra):
    return config_class(output_dir=out, **TRAINING, **extra)


def trainer_for(kind: str, stage: int | None, out: str):
    """TRL's trainer of `kind` (stage None) or zero_trainer(it) at `stage`."""
    import trl

    from zero_ext.integrations.transformers import zero_trainer

    tokenizer = char_tokenizer()
    vocab = len(tokenizer)
    if kind == "sft":
        cls, kwargs = trl.SFTTrainer, {"args": arguments(trl.SFTConfig, out),
                                       "train_dataset": sft_dataset()}
    elif kind == "dpo":  # the reference model mixed with the policy after every step
        cls, kwargs = trl.DPOTrainer, {
            "args": arguments(trl.DPOConfig, out, sync_ref_model=True, ref_model_sync_steps=1,
                              ref_model_mixup_alpha=0.5),
            "ref_model": tiny_llama(vocab), "train_dataset": preference_dataset()}
    elif kind == "dpo_peft":  # no reference model: the policy with its LoRA adapters off
        from peft import LoraConfig

        cls, kwargs = trl.DPOTrainer, {
            "args": arguments(trl.DPOConfig, out), "train_dataset": preference_dataset(),
            "peft_config": LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                      target_modules=["q_proj", "v_proj"])}
    elif kind == "grpo":
        cls, kwargs = trl.GRPOTrainer, {
            "args": arguments(trl.GRPOConfig, out, num_generations=4, max_completion_length=6),
            "reward_funcs": count_a, "train_dataset": prompt_dataset()}
    elif kind == "reward":
        cls, kwargs = trl.RewardTrainer, {"args": arguments(trl.RewardConfig, out),
                                          "train_dataset": preference_dataset()}
    else:
        raise ValueError(kind)
    model = tiny_llama(vocab, classifier=kind == "reward")
    if stage is None:
        return cls(model=model, processing_class=tokenizer, **kwargs)
    config = {**ZERO_CONFIG, "zero_optimization": {**ZERO_CONFIG["zero_optimization"],
                                                   "stage": stage}}
    return zero_trainer(cls)(model=model, processing_class=tokenizer, zero_config=config,
                             **kwargs)


def record(trainer, out: str, name: str, **extra) -> None:
    """The logged losses and grad norms (rank 0) and the final weights (collective)."""
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    trainer.save_model(os.path.join(out, name))
    if trainer.is_world_process_zero():
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({"losses": [e["loss"] for e in logs],
                       "grad_norms": [e["grad_norm"] for e in logs], **extra}, f)


def guard(trainer, out: str) -> None:
    """After stage-3 training: TRL's fused log-prob kernel on lm_head.weight outside the
    model's forward, inside TRL's gather context (zero_ext gathers it) and outside it (its
    values are refused by the released parameter instead of computed on as an empty tensor)."""
    from trl.trainer.utils import _ChunkedLogProbFunction, maybe_gather_lm_head_ctx

    weight = trainer.model.lm_head.weight
    torch.manual_seed(1)
    hidden = torch.randn(5, trainer.model.config.hidden_size)
    targets = torch.tensor([4, 5, 6, 7, 8])
    result = {"weight_numel_outside": weight.numel()}
    with torch.no_grad(), maybe_gather_lm_head_ctx(weight, None):
        log_probs = _ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32, None,
                                                  1.0, ("log_probs",))[0]
    result["gathered_log_probs"] = log_probs.tolist()
    result["hidden"], result["targets"] = hidden.tolist(), targets.tolist()
    try:
        weight.sum()
        result["outside"] = "computed"
    except RuntimeError as error:
        result["outside"] = str(error)
    if trainer.is_world_process_zero():
        with open(os.path.join(out, "guard.json"), "w") as f:
            json.dump(result, f)


def lm_head_module_run(out: str) -> dict:
    """The plain Trainer (ZeroTrainer) at stage 3 on the same model for as many micro-steps as
    the SFT runs: its lm_head runs as a module, gathered by its own forward and backward."""
    from zero_ext.integrations.transformers import ZeroTrainer

    tokenizer = char_tokenizer()
    rows = [tokenizer(phrase(i, 4))["input_ids"][:12] for i in range(16)]
    data = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
    config = {**ZERO_CONFIG, "zero_optimization": {**ZERO_CONFIG["zero_optimization"],
                                                   "stage": 3}}
    trainer = ZeroTrainer(model=tiny_llama(len(tokenizer)), train_dataset=data,
                          args=arguments(TrainingArguments, os.path.join(out, "scratch", "lm")),
                          zero_config=config)
    return trained(trainer)


def trained(trainer) -> dict:
    """trainer.train(), and the elements each collective sent meanwhile (ring sense)."""
    zero_ext.comm.traffic.reset()
    trainer.train()
    return dict(zero_ext.comm.traffic.elements)


def main(out: str) -> None:
    sent = {}
    for kind, stages in (("sft", (1, 2, 3)), ("dpo", (1, 2, 3)), ("dpo_peft", (3,)),
                         ("grpo", (1, 2, 3)), ("reward", (3,))):
        for stage in (None, *stages):
            name = f"{kind}_ddp" if stage is None else f"{kind}_zero{stage}"
            trainer = trainer_for(kind, stage, os.path.join(out, "scratch", name))
            sent[name] = trained(trainer)
            extra = {}
            if kind == "sft":  # forwards without backward: the fused head under no_grad
                extra["eval_loss"] = trainer.evaluate(sft_dataset(8))["eval_loss"]
            record(trainer, out, name, **extra)
            if kind == "sft" and stage == 3:
                guard(trainer, out)
    sent["lm_head_module_zero3"] = lm_head_module_run(out)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "traffic.json"), "w") as f:
            json.dump(sent, f)
    dist.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
