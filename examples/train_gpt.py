"""Train a small character-level GPT with zero_ext, on CPU (gloo) or GPUs (NCCL).

    torchrun --nproc_per_node=2 examples/train_gpt.py --config examples/configs/zero2.json
    torchrun --nproc_per_node=4 examples/train_gpt.py --config examples/configs/zero1.json
    torchrun --nproc_per_node=2 examples/train_gpt.py --config examples/configs/zero3.json
    torchrun --nproc_per_node=2 examples/train_gpt.py --config examples/configs/zero3_offload.json
    # Compressed communication (bf16; int8 gradients + int8 weights, int4 gradients with error
    # feedback, top-k 1%; benchmarks/compression_convergence.py compares them over 300 steps):
    torchrun --nproc_per_node=2 examples/train_gpt.py --steps 300 \
        --config examples/configs/zero3_compress_int8.json   # or zero2_compress_topk.json, ...
    python examples/train_gpt.py --config examples/configs/zero0.json      # one process
    torchrun --nproc_per_node=2 examples/train_gpt.py --compile inductor   # torch.compile'd
    torchrun --nproc_per_node=2 examples/train_gpt.py --save-dir ckpt --steps 30   # then resume:
    torchrun --nproc_per_node=3 examples/train_gpt.py --save-dir ckpt --resume --steps 60
    # Elastic: a checkpoint every 10 steps; a restarted job (a rank or a node lost) resumes by
    # itself from the newest one, on however many nodes are left (1 to 2 here):
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    torchrun --nnodes=1:2 --nproc_per_node=2 --max-restarts=3 --rdzv-backend=c10d \
        --rdzv-endpoint=node0:29500 --rdzv-id=gpt examples/train_gpt.py \
        --config examples/configs/zero2_elastic.json --save-dir ckpt --save-every 10 --auto-resume

The text is examples/data/zen_of_python.txt (shipped; nothing is downloaded). Batch size,
accumulation, optimizer, LR schedule and ZeRO stage come from the DeepSpeed-style config; the
engine prints a line every steps_per_print optimizer steps (and a progress bar on a terminal),
and rank 0 prints the loss before and after training. With --save-dir the run ends with a
checkpoint; --resume continues from the latest one, at any number of ranks and any stage.
--save-every and --auto-resume set the config's zero_ext.checkpoint section (see
zero_ext/elastic.py): the data position (epoch, samples consumed) is in every checkpoint, so a
resumed run trains exactly the batches an uninterrupted one would. --sample-log DIR writes the
dataset indices each rank trained on, one JSON line per micro-batch (tests/test_elastic.py).
The loss printed is over the text's first 64 windows; --eval-windows N spreads N windows over
the whole text instead (a longer --data text: benchmarks/compression_convergence.py).
"""

import argparse
import contextlib
import json
import math
import os
import signal
import time

import torch
import torch.nn.functional as F
from torch import nn

import zero_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class CharDataset(torch.utils.data.Dataset):
    """Every window of `block + 1` characters: inputs and next-character targets."""

    def __init__(self, text: str, block: int):
        self.vocab = sorted(set(text))
        index = {ch: i for i, ch in enumerate(self.vocab)}
        self.data = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        self.block = block

    def __len__(self):
        return len(self.data) - self.block

    def __getitem__(self, i):
        """(i, inputs, targets): the index comes along so a run can log what it trained on."""
        chunk = self.data[i:i + self.block + 1]
        return i, chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(block, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens, targets):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _config(args) -> dict:
    """The JSON config with the checkpoint flags put into its zero_ext.checkpoint section."""
    config = zero_ext.config.read_json_config(args.config)
    flags = {"dir": args.save_dir, "every_n_steps": args.save_every,
             "keep_last": args.keep_last, "auto_resume": args.auto_resume or None}
    given = {key: value for key, value in flags.items() if value is not None}
    if set(given) - {"dir"} or "checkpoint" in config.get("zero_ext", {}):
        config.setdefault("zero_ext", {}).setdefault("checkpoint", {}).update(given)
    return config


@contextlib.contextmanager
def _sample_log(directory, engine, sampler):
    """Yields log(indices): with a directory, one JSON line per micro-batch in
    <directory>/attempt<torchrun restart count>-rank<rank>.jsonl."""
    if not directory:
        yield lambda indices: None
        return
    os.makedirs(directory, exist_ok=True)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    with open(os.path.join(directory, f"attempt{attempt}-rank{engine.rank}.jsonl"), "a",
              encoding="utf-8") as f:
        def log(indices):
            f.write(json.dumps({"step": engine.global_steps + 1, "rank": engine.rank,
                                "world": engine.world_size, "epoch": sampler.epoch,
                                "indices": indices.tolist()}) + "\n")
            f.flush()
        yield log


def _test_fault(engine) -> None:
    """For tests (tests/test_elastic.py), in the job's first attempt only:
    ZERO_EXT_TEST_FAULT=kill:STEP:RANK SIGKILLs rank RANK after optimizer step STEP;
    halt:STEP:RANK makes it print "halted" and sleep until something kills its node."""
    fault = os.environ.get("ZERO_EXT_TEST_FAULT")
    if not fault or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    action, step, rank = fault.split(":")
    if engine.global_steps == int(step) and engine.rank == int(rank):
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        print(f"rank {engine.rank} halted after step {engine.global_steps}", flush=True)
        while True:
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "zero2.json"))
    parser.add_argument("--data", default=os.path.join(HERE, "data", "zen_of_python.txt"))
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initial weights")
    parser.add_argument("--save-dir", help="write a checkpoint here at the end")
    parser.add_argument("--resume", action="store_true", help="start from --save-dir's latest")
    parser.add_argument("--save-every", type=int, help="also a checkpoint every N steps")
    parser.add_argument("--keep-last", type=int, help="keep only the newest K periodic ones")
    parser.add_argument("--auto-resume", action="store_true",
                        help="resume from --save-dir's newest checkpoint if there is one "
                             "(for torchrun --max-restarts)")
    parser.add_argument("--sample-log", help="directory: each rank logs the samples it trains")
    parser.add_argument("--compile", metavar="BACKEND",
                        help="torch.compile the model with this backend (engine.compile)")
    parser.add_argument("--eval-windows", type=int,
                        help="evaluate on N windows spread evenly over the whole text (default: "
                             "the first 64, which a long text's loss does not represent)")
    args = parser.parse_args()
    if (args.save_every or args.keep_last or args.auto_resume) and not args.save_dir:
        parser.error("--save-every, --keep-last and --auto-resume need --save-dir")

    with open(args.data, encoding="utf-8") as f:
        dataset = CharDataset(f.read(), args.block)
    torch.manual_seed(args.seed)
    model = GPT(len(dataset.vocab), args.block, args.dim, args.layers, args.heads)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    engine, _, loader, _ = zero_ext.initialize(
        model=model, config=_config(args), training_data=dataset,
        model_parameters=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    if args.compile:
        engine.compile(backend=args.compile)
    accumulation = engine.batch.gradient_accumulation_steps
    device = engine.device
    engine.monitor.total_steps = args.steps  # for the progress bar's ETA
    if args.resume:
        path, _ = engine.load_checkpoint(args.save_dir)
        if engine.rank == 0:
            print(f"resumed from {path} at step {engine.global_steps}")

    if args.eval_windows:  # spread evenly, first and last window included
        starts = torch.linspace(0, len(dataset) - 1, args.eval_windows).round().long().tolist()
    else:
        starts = range(min(64, len(dataset)))

    def evaluate() -> float:
        engine.eval()
        with torch.no_grad():
            _, x, y = torch.utils.data.default_collate([dataset[i] for i in starts])
            loss = engine(x.to(device), y.to(device)).item()
        engine.train()
        return loss

    first = evaluate()
    with _sample_log(args.sample_log, engine, loader.batch_sampler) as log:
        batches = iter(loader)  # the sampler goes on to the next epoch by itself
        while engine.global_steps < args.steps:
            try:
                index, x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            log(index)
            loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            engine.step()
            _test_fault(engine)
    last = evaluate()
    periodic = engine.config.zero_ext.checkpoint.every_n_steps
    if args.save_dir and not (periodic and engine.global_steps % periodic == 0):
        path = engine.save_checkpoint(args.save_dir)
        if engine.rank == 0:
            print(f"saved {path}")
    if engine.rank == 0:
        print(f"stage {engine.stage}, {engine.world_size} rank(s), {engine.global_steps} steps of "
              f"{engine.batch.train_batch_size} samples ({accumulation} micro-steps each): "
              f"loss {first:.4f} -> {last:.4f} (uniform guess: {math.log(len(dataset.vocab)):.3f})")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
