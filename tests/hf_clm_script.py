"""A run_clm-style Hugging Face script that knows nothing of zero_ext (tests/test_hf_run.py runs
it unchanged under `python -m zero_ext.run`): HfArgumentParser -> TrainingArguments, a causal
LM built from a config (no download), a character dataset from --train_file, Trainer.train(),
save_model() and save_state() (trainer_state.json holds the log history).

    torchrun --nproc_per_node=2 tests/hf_clm_script.py --train_file T --output_dir O --use_cpu
    torchrun --nproc_per_node=2 -m zero_ext.run tests/hf_clm_script.py --deepspeed ds.json ...
"""

from dataclasses import dataclass, field

import torch
from transformers import (
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    set_seed,
)


@dataclass
class ModelArguments:
    hidden_size: int = field(default=32)
    num_hidden_layers: int = field(default=2)


@dataclass
class DataArguments:
    train_file: str = field(default=None, metadata={"help": "a text file"})
    block_size: int = field(default=16)
    num_samples: int = field(default=32)


class CharWindows(torch.utils.data.Dataset):
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


def main():
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    with open(data_args.train_file, encoding="utf-8") as f:
        train = CharWindows(f.read(), data_args.block_size, data_args.num_samples)
    set_seed(training_args.seed)
    config = LlamaConfig(vocab_size=len(train.vocab), hidden_size=model_args.hidden_size,
                         intermediate_size=2 * model_args.hidden_size,
                         num_hidden_layers=model_args.num_hidden_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    trainer = Trainer(model=model, args=training_args, train_dataset=train)
    result = trainer.train()
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()


if __name__ == "__main__":
    main()
