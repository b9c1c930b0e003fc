"""Data-parallel training of a small model with zero_ext.optim.AdamW, on CPU (gloo) or GPUs (NCCL).

    torchrun --nproc_per_node=2 examples/train_adamw.py
    torchrun --nproc_per_node=2 examples/train_adamw.py --steps 200 --hidden 512

The model is a small residual MLP regressing a fixed random teacher network, so the loss has a
known floor of zero and no data needs to be downloaded. Until the ZeRO engine lands this is the
project's main job: DDP for the gradients, zero_ext's C++ AdamW for the step; rank 0 prints the
loss and, at the end, how far the parameters moved from what torch.optim.AdamW would produce.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import zero_ext


def build_model(hidden: int, depth: int) -> nn.Module:
    layers = [nn.Linear(32, hidden)]
    for _ in range(depth):
        layers += [nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU()]
    layers.append(nn.Linear(hidden, 8))
    return nn.Sequential(*layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else "cpu"

    torch.manual_seed(0)  # same initial weights on every rank
    teacher = build_model(64, 1).to(device)
    model = build_model(args.hidden, args.depth).to(device)
    reference = build_model(args.hidden, args.depth).to(device)
    reference.load_state_dict(model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp_ref = nn.parallel.DistributedDataParallel(reference)
    optimizer = zero_ext.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    optimizer_ref = torch.optim.AdamW(reference.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    schedule_ref = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer_ref, args.steps)

    gen = torch.Generator(device=device).manual_seed(1000 + rank)  # each rank its own data
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, 32, device=device, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        for net, opt, sched in ((ddp, optimizer, schedule), (ddp_ref, optimizer_ref, schedule_ref)):
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if net is ddp:
                logged = loss.detach()
        if step % 10 == 0 or step == 1:
            dist.all_reduce(logged)
            if rank == 0:
                print(f"step {step:4d}  loss {logged.item() / world:.5f}  "
                      f"lr {schedule.get_last_lr()[0]:.2e}", flush=True)
    elapsed = time.perf_counter() - start
    drift = max((a - b).abs().max().item()
                for a, b in zip(model.parameters(), reference.parameters()))
    if rank == 0:
        print(f"{args.steps} steps on {world} rank(s) in {elapsed:.1f}s; largest difference from "
              f"torch.optim.AdamW: {drift:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
