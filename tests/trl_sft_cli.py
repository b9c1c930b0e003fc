"""A TRL SFT script as users write it, with nothing of zero_ext in it: tests/test_trl.py runs it
unmodified on zero_ext through its own --deepspeed option,

    torchrun --nproc_per_node=2 -m zero_ext.run tests/trl_sft_cli.py --deepspeed ds.json \\
        --output_dir OUT [SFTConfig options...]

and rank 0 writes OUT/log_history.json; the weights go to OUT/model.safetensors.
"""

import json
import os

from transformers import HfArgumentParser
from trl import SFTConfig, SFTTrainer
from trl_script import char_tokenizer, sft_dataset, tiny_llama


def main():
    (args,) = HfArgumentParser(SFTConfig).parse_args_into_dataclasses()
    tokenizer = char_tokenizer()
    trainer = SFTTrainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=sft_dataset(),
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)


if __name__ == "__main__":
    main()
