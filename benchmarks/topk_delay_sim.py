"""Why top-k 1% misses its convergence goal (issue 16): a one-process, plain-torch simulation of
compression_convergence.py's top-k run, to take the top-k path apart.

It trains examples/train_gpt.py's GPT (dim 128, 2 layers, 4 heads, block 64) on this Python's
argparse.py for --steps steps of 32 windows (the 2-rank run's global batch), with AdamW written
out (lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices, DeepSpeed's log warm-up over 20
steps, cosine decay, clipping at 1.0) and, after --dense-steps dense steps, Adam's second
moment frozen (bias-corrected once) and the gradient replaced by top-k with error feedback:
the residual r += g, the selected entries of r are the step's gradient and leave r.

Selection (--mode): "global" (top-k of |r| over all parameters, what zero_ext's per-bucket
selection approximates), "pertensor" (top-k within each tensor: DGC's per-layer choice),
"precond" (top-k of |r| / sqrt(v): the entries Adam would move most), "momentum" (as global,
but the residual accumulates Adam's momentum and what is sent becomes the momentum: 1-bit
Adam's compressed momentum with top-k for the sign), "ef21" (EF21, Richtarik et al. 2021: an
estimate e of the gradient, updated by the top-k of g - e, is the step's gradient, and Adam's
variance follows it, not frozen), "dense" (plain AdamW
throughout: no top-k, no frozen variance; "global" at --density 1 is dense with the variance
frozen). --oracle-variance keeps v following the dense
gradient after the freeze; --lr-mult scales the learning rate once sparse; --sparse-beta1 sets
the sent momentum's beta1 once sparse ("momentum"). Prints the loss over
1024 windows spread over the text, before and after (the evaluation of
compression_convergence.py), and the share of a sparse step's entries sent the step before too.

    python benchmarks/topk_delay_sim.py --mode global            # ~80 s on one core
    python benchmarks/topk_delay_sim.py --mode global --density 1   # only the frozen variance

Figures: benchmarks/RESULTS.md, "Top-k 1%: why it misses".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
from train_gpt import GPT, CharDataset

LR, BETAS, WEIGHT_DECAY, EPS, WARMUP, BATCH = 3e-3, (0.9, 0.95), 0.1, 1e-8, 20, 32


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * math.log(step + 1) / math.log(WARMUP)
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (steps - WARMUP)))


def select(mode: str, residual: list[torch.Tensor], variance: list[torch.Tensor],
           density: float) -> list[torch.Tensor]:
    """Boolean masks of the entries sent this step."""
    if mode == "pertensor":
        masks = []
        for r in residual:
            k = max(1, math.ceil(density * r.numel()))
            masks.append(r.abs() >= r.abs().flatten().topk(k).values[-1])
        return masks
    if mode == "precond":  # "momentum" selects as "global", from its momentum residual
        score = torch.cat([(r / (v.sqrt() + EPS)).flatten().abs()
                           for r, v in zip(residual, variance)])
    else:
        score = torch.cat([r.flatten().abs() for r in residual])
    threshold = score.topk(max(1, int(density * score.numel()))).values[-1]
    masks, offset = [], 0
    for r in residual:
        masks.append(score[offset:offset + r.numel()].view_as(r) >= threshold)
        offset += r.numel()
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("global", "pertensor", "precond", "momentum", "ef21",
                                           "dense"),
                        default="global")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dense-steps", type=int, default=30)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oracle-variance", action="store_true")
    parser.add_argument("--lr-mult", type=float, default=1.0)
    parser.add_argument("--sparse-beta1", type=float, default=None,
                        help="momentum mode: the beta1 of the sent momentum once sparse "
                             "(default: Adam's 0.9)")
    parser.add_argument("--data", default=None, help="the text (default: this Python's "
                                                     "argparse.py)")
    parser.add_argument("--batch", type=int, default=BATCH, help="windows per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(args.data or os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"),
              encoding="utf-8") as f:
        data = CharDataset(f.read(), 64)
    torch.manual_seed(args.seed)
    model = GPT(len(data.vocab), 64, 128, 2, 4)
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    residual = [torch.zeros_like(p) for p in params]
    batches = torch.Generator().manual_seed(1234)
    starts = torch.linspace(0, len(data) - 1, 1024).round().long()

    def evaluate() -> float:
        with torch.no_grad():
            x = torch.stack([data[i][1] for i in starts])
            return model(x, torch.stack([data[i][2] for i in starts])).item()

    first, began, frozen = evaluate(), time.time(), False
    b1, b2 = BETAS
    sent_b1 = b1 if args.sparse_beta1 is None else args.sparse_beta1
    last_sent, repeats = None, []  # share of each sparse step's entries also sent the step before
    for step in range(args.steps):
        index = torch.randint(0, len(data), (args.batch,), generator=batches)
        model.zero_grad()
        model(torch.stack([data[i][1] for i in index]),
              torch.stack([data[i][2] for i in index])).backward()
        dense = [p.grad.clone() for p in params]
        grads = dense
        if args.mode == "ef21":  # residual: the estimate; dense steps set it, sparse ones move it
            if step < args.dense_steps:
                for r, g in zip(residual, dense):
                    r.copy_(g)
            else:
                deltas = [g - r for r, g in zip(residual, dense)]
                masks = select("global", deltas, v, args.density)
                for r, mask, d in zip(residual, masks, deltas):
                    r.add_(torch.where(mask, d, 0))
            grads = [r.clone() for r in residual]
        elif step >= args.dense_steps and args.mode != "dense":
            if not frozen:  # Adam's moments bias-corrected once, the variance frozen from here
                for i in range(len(params)):
                    m[i] /= 1 - b1 ** step
                    v[i] /= 1 - b2 ** step
                frozen = True
            for i, g in enumerate(dense):
                # "momentum": the residual takes Adam's momentum as this step would make it,
                # and what is sent becomes the momentum (1-bit Adam's error-compensated
                # momentum, with top-k in place of the sign)
                residual[i] += m[i] * sent_b1 + g * (1 - sent_b1) \
                    if args.mode == "momentum" else g
            masks = select(args.mode, residual, v, args.density)
            if last_sent is not None:
                repeats.append(sum((a & b).sum().item() for a, b in zip(masks, last_sent))
                               / sum(mask.sum().item() for mask in masks))
            last_sent = masks
            grads = [torch.where(mask, r, 0) for mask, r in zip(masks, residual)]
            for r, mask in zip(residual, masks):
                r[mask] = 0
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))  # fp32, as the runs in RESULTS
        clip = min(1.0, 1.0 / (norm.item() + 1e-6))
        lr = lr_at(step, args.steps)
        with torch.no_grad():
            for i, p in enumerate(params):
                g = grads[i] * clip
                if p.dim() >= 2:
                    p.mul_(1 - lr * WEIGHT_DECAY)
                if args.mode == "momentum" and frozen:
                    m[i].copy_(g)
                else:
                    m[i].mul_(b1).add_(g, alpha=1 - b1)
                if frozen:
                    if args.oracle_variance:
                        v[i].mul_(b2).addcmul_(dense[i], dense[i], value=1 - b2)
                    p.add_(m[i] / (v[i].sqrt() + EPS), alpha=-lr * args.lr_mult)
                else:
                    v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.add_((m[i] / (1 - b1 ** (step + 1)))
                           / ((v[i] / (1 - b2 ** (step + 1))).sqrt() + EPS), alpha=-lr)
    print(f"{args.mode} density {args.density} dense steps {args.dense_steps} "
          f"oracle variance {args.oracle_variance} lr x {args.lr_mult} seed {args.seed}: "
          f"loss {first:.4f} -> {evaluate():.4f} ({time.time() - began:.0f} s); sent again the "
          f"next step: {sum(repeats) / max(1, len(repeats)):.1%}", flush=True)


if __name__ == "__main__":
    main()
