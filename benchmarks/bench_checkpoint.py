"""Checkpoint save and load time: zero_ext against torch.distributed.checkpoint and torch.save,
with the disk's own write bandwidth as the limit, in one torchrun launch.

    torchrun --nproc_per_node=2 benchmarks/bench_checkpoint.py                 # CPU, 50M params
    torchrun --nproc_per_node=2 benchmarks/bench_checkpoint.py --params 200M --stage 3
    torchrun --nproc_per_node=4 benchmarks/bench_checkpoint.py --dir /fast/disk/tmp

The model is a stack of fp32 linear layers holding --params parameters; one AdamW step creates
the moments, so every implementation saves 12 bytes per parameter (fp32 weights, exp_avg,
exp_avg_sq) plus small metadata:
  zero_ext        engine.save_checkpoint / load_checkpoint at --stage: every rank writes its
                  shard (fsynced, SHA-256 computed while writing, manifest, atomic rename);
                  loading verifies the checksum of every file it reads.
  torch DCP       DistributedDataParallel + torch.optim.AdamW, saved with
                  torch.distributed.checkpoint (FileSystemWriter, which fsyncs; replicated
                  tensors deduplicated across ranks) and loaded back with dcp.load.
  torch.save      the same state dicts, gathered on rank 0 and written by it alone, then
                  fsynced: what a script without a distributed checkpointer does.
  disk limit      every rank writes as many bytes as its zero_ext shard to a new file with one
                  sequential write and fsync, in parallel: the write bandwidth the others are
                  bounded by.
Each is repeated --repeats times; the table has the medians. Loads read files just written, so
they come from the page cache: they measure the software path, not the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

import zero_ext


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale \
        else int(text)


def build_model(params: int, width: int) -> nn.Module:
    layers = max(params // (width * width + width), 1)
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def device() -> torch.device:
    """Where the engine puts the model (the GPU when there is one); the baselines match it."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def one_step(model_or_engine, width: int, engine: bool, optimizer=None) -> None:
    x = torch.randn(4, width, device=device())
    loss = model_or_engine(x).square().mean()
    if engine:
        model_or_engine.backward(loss)
        model_or_engine.step()
    else:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def fresh(path: str) -> str:
    """An empty directory at `path`, seen by every rank."""
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    dist.barrier()
    return path


def bench_zero_ext(args, root: str) -> dict:
    model = build_model(args.params, args.width)
    engine, _, _, _ = zero_ext.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": args.stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "steps_per_print": 10**9})
    one_step(engine, args.width, engine=True)
    save_dir = fresh(os.path.join(root, "zero_ext"))
    saves, loads = [], []
    for i in range(args.repeats):
        saves.append(timed(lambda i=i: engine.save_checkpoint(save_dir, tag=f"t{i}")))
        loads.append(timed(lambda i=i: engine.load_checkpoint(save_dir, tag=f"t{i}")))
    tag_dir = os.path.join(save_dir, "t0")
    shard = os.path.join(tag_dir, f"zero_shard_{dist.get_rank():05d}_of_"
                                  f"{dist.get_world_size():05d}.safetensors")
    return {"save": saves, "load": loads, "bytes": dir_bytes(tag_dir),
            "shard_bytes": os.path.getsize(shard), "params": sum(
                p.numel() for p in model.parameters())}


def bench_torch(args, root: str) -> tuple[dict, dict]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(build_model(args.params, args.width).to(device()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    one_step(model, args.width, engine=False, optimizer=optimizer)

    dcp_root = fresh(os.path.join(root, "dcp"))
    saves, loads = [], []
    for i in range(args.repeats):
        path = os.path.join(dcp_root, f"t{i}")

        def save(path=path):
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)

        def load(path=path):
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])

        saves.append(timed(save))
        loads.append(timed(load))
    dcp_result = {"save": saves, "load": loads, "bytes": dir_bytes(os.path.join(dcp_root, "t0"))}

    plain_root = fresh(os.path.join(root, "torch_save"))
    saves, loads = [], []
    for i in range(args.repeats):
        path = os.path.join(plain_root, f"t{i}.pt")

        def save(path=path):
            if dist.get_rank() == 0:
                with open(path, "wb") as f:
                    torch.save({"model": model.module.state_dict(),
                                "optim": optimizer.state_dict()}, f)
                    f.flush()
                    os.fsync(f.fileno())

        def load(path=path):
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.module.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])

        saves.append(timed(save))
        loads.append(timed(load))
    plain = {"save": saves, "load": loads,
             "bytes": os.path.getsize(os.path.join(plain_root, "t0.pt"))}
    return dcp_result, plain


def bench_disk(nbytes: int, root: str, repeats: int) -> list[float]:
    """Every rank writes `nbytes` sequentially and fsyncs, in parallel."""
    data = os.urandom(1 << 20) * max(nbytes >> 20, 1)
    folder = fresh(os.path.join(root, "disk"))
    times = []
    for i in range(repeats):
        # A new file each time, as a checkpoint writes: overwriting one in place skips the
        # filesystem's block allocation and measures several times faster than any save.
        path = os.path.join(folder, f"rank{dist.get_rank()}_{i}")

        def write(path=path):
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        times.append(timed(write))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("50M"))
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    zero_ext.comm.init_distributed()
    torch.set_num_threads(max(os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1))
    root = args.dir or (tempfile.mkdtemp(prefix="bench_ckpt_") if dist.get_rank() == 0 else None)
    holder = [root]
    dist.broadcast_object_list(holder, src=0)
    root = holder[0]
    try:
        ours = bench_zero_ext(args, root)
        dcp_result, plain = bench_torch(args, root)
        disk = bench_disk(ours["shard_bytes"], root, args.repeats)
    finally:
        dist.barrier()
        if dist.get_rank() == 0 and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if dist.get_rank() != 0:
        dist.destroy_process_group()
        return
    world = dist.get_world_size()
    median = statistics.median
    disk_s = median(disk)
    bandwidth = ours["shard_bytes"] * world / disk_s
    print(f"{ours['params'] / 1e6:.1f}M fp32 params, {world} ranks, zero_ext stage {args.stage}, "
          f"medians of {args.repeats}; disk: {bandwidth / 1e9:.2f} GB/s written and fsynced by "
          f"{world} ranks in parallel")
    print(f"{'impl':<12} {'save s':>8} {'load s':>8} {'GB':>7} {'save GB/s':>10} "
          f"{'save vs DCP':>12} {'load vs DCP':>12} {'save / disk limit':>18}")
    rows = [("zero_ext", ours), ("torch DCP", dcp_result), ("torch.save", plain)]
    dcp_save, dcp_load = median(dcp_result["save"]), median(dcp_result["load"])
    for name, r in rows:
        save, load = median(r["save"]), median(r["load"])
        limit = r["bytes"] / bandwidth
        print(f"{name:<12} {save:8.3f} {load:8.3f} {r['bytes'] / 1e9:7.3f} "
              f"{r['bytes'] / save / 1e9:10.2f} {dcp_save / save:11.2f}x {dcp_load / load:11.2f}x "
              f"{limit / save:17.0%}")
    print("save vs DCP and load vs DCP: DCP's time over this row's (above 1 = faster than DCP); "
          "save / disk limit: the time the disk needs for these bytes over the save time")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
