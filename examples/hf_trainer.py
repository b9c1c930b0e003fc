"""Train a tiny Llama with the Hugging Face Trainer on zero_ext, on CPU (gloo) or GPUs (NCCL).

    torchrun --nproc_per_node=2 examples/hf_trainer.py --config examples/configs/trainer/zero2.json
    torchrun --nproc_per_node=2 examples/hf_trainer.py --config examples/configs/trainer/zero3.json
    torchrun --nproc_per_node=2 examples/hf_trainer.py \
        --config examples/configs/trainer/zero3_offload.json
    python examples/hf_trainer.py --config examples/configs/trainer/zero0.json     # one process

The model is a LlamaForCausalLM built from a small LlamaConfig (random init, nothing is
downloaded) over the characters of examples/data/zen_of_python.txt. The configs under
examples/configs/trainer/ say "auto" for everything the TrainingArguments below decide (batch
sizes, accumulation, clipping, AdamW hyperparameters, precision): ZeroTrainer fills them in.
The Trainer logs loss, grad_norm (the engine's global norm) and learning rate; a checkpoint is
written halfway (every rank's shard, resumable at any world size with --resume), and the
final weights go to <output_dir>/final, loadable with LlamaForCausalLM.from_pretrained.
"""

import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from zero_ext.integrations.transformers import ZeroTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "data", "zen_of_python.txt")


class CharWindows(torch.utils.data.Dataset):
    """`count` windows of `block` characters, evenly spaced over the text; labels are the inputs
    (the model shifts them for next-character prediction)."""

    def __init__(self, text: str, block: int, count: int):
        self.vocab = sorted(set(text))
        index = {ch: i for i, ch in enumerate(self.vocab)}
        data = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        stride = max((len(data) - block) // count, 1)
        self.windows = [data[i * stride:i * stride + block] for i in range(count)]

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """Two decoder layers of width 32: each layer's weights exceed the 'auto' persistence
    threshold (10 * hidden_size), so stage 3 really partitions them."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "trainer",
                                                         "zero2.json"))
    parser.add_argument("--output_dir", default="hf_trainer_out")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro_batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights, fp32 master")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --output_dir")
    cli = parser.parse_args()

    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    data = CharWindows(text, block=32, count=64)
    args = TrainingArguments(
        output_dir=cli.output_dir, max_steps=cli.steps, learning_rate=cli.lr,
        per_device_train_batch_size=cli.micro_batch, gradient_accumulation_steps=cli.accumulation,
        weight_decay=0.1, warmup_steps=4, max_grad_norm=1.0, bf16=cli.bf16, logging_steps=5,
        save_strategy="steps", save_steps=cli.steps // 2, report_to="none", disable_tqdm=True,
        seed=0, use_cpu=not torch.cuda.is_available())
    trainer = ZeroTrainer(model=tiny_llama(len(data.vocab)), args=args, train_dataset=data,
                          eval_dataset=data, zero_config=cli.config)
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    metrics = trainer.evaluate()
    trainer.save_model(os.path.join(cli.output_dir, "final"))  # collective: every rank
    if trainer.is_world_process_zero():
        first = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
        print(f"stage {trainer.engine.stage}, {trainer.args.world_size} rank(s): loss "
              f"{first:.4f} -> eval loss {metrics['eval_loss']:.4f}; weights in "
              f"{os.path.join(cli.output_dir, 'final')}", flush=True)


if __name__ == "__main__":
    main()
