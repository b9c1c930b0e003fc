"""python -m zero_ext.consolidate CHECKPOINT OUTPUT [--dtype bf16] [--tag TAG]

Writes the full model weights of a zero_ext checkpoint (saved at any world size and stage) as
one safetensors file, on any machine, without GPUs or torch.distributed:

    python -m zero_ext.consolidate checkpoints/ model/              # latest tag, fp32 weights
    python -m zero_ext.consolidate checkpoints/global_step100 model.safetensors --dtype bf16

A directory as OUTPUT gets model.safetensors (and config.json for a transformers model), so
`AutoModelForCausalLM.from_pretrained(OUTPUT)` loads it. The Python form is
`zero_ext.consolidate(checkpoint_dir, output_path, dtype=None)`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zero_ext.consolidate",
        description="Full model weights from a sharded zero_ext checkpoint, as one safetensors "
                    "file.")
    parser.add_argument("checkpoint", help="a checkpoint directory (<save_dir>/<tag>) or a "
                                           "save_dir (its 'latest' tag is used)")
    parser.add_argument("output", help="a .safetensors file, or a directory for "
                                       "model.safetensors (+ config.json)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="cast floating tensors (default: the fp32 master weights)")
    parser.add_argument("--tag", default=None, help="the tag to read inside a save_dir")
    args = parser.parse_args(argv)

    from zero_ext.checkpoint import CheckpointError, consolidate

    try:
        path = consolidate(args.checkpoint, args.output, args.dtype, tag=args.tag)
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
