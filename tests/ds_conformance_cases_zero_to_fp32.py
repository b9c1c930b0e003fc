"""Ported cases: DeepSpeed's deepspeed.utils.zero_to_fp32 functions on zero_ext checkpoints
(zero_ext.utils.zero_to_fp32).

From DeepSpeed's tests/unit/checkpoint/test_convert_checkpoint.py, test_shared_weights.py and
tests/unit/v1/zero/test_zero.py's TestZeroToFP32. DeepSpeed's cases load the converted state
dict strictly into a fresh model and compare it with the engine's parameters; the ports compare
with the fp32 master weights read from the live engine (safe_get_full_fp32_param, a collective
read of the shards, not the checkpoint files), the frozen parameters with their initial values
and the buffers with the model's, and read sharded output with transformers' own loader.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

import zero_ext
from zero_ext.checkpoint.files import chunk_digests
from zero_ext.utils import safe_get_full_fp32_param
from zero_ext.utils.zero_to_fp32 import (
    LazyTensor,
    convert_zero_checkpoint_to_fp32_state_dict,
    convert_zero_checkpoint_to_state_dict,
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
    main,
)

from ds_conformance_cases import case, collectively, expect_zero_ext_error, rank
from ds_conformance_cases_state import ModelWithSharedWeights

CONVERT = "test_convert_checkpoint.py::TestCheckpointConvert::"
TO_FP32 = "test_zero.py::TestZeroToFP32::"


class MyModel(nn.Module):
    """TestZeroToFP32's model: 4 linears of 3 -> 3 (48 elements, uneven over the ranks) and a
    classifier 4 -> 1 that forward never uses; zero_ext adds a buffer (a running count) so
    that buffers are seen to come through too. `freeze` freezes the first linear."""

    def __init__(self, freeze: bool = False, layers: int = 4):
        super().__init__()
        self.ll = nn.ModuleList(nn.Linear(3, 3) for _ in range(layers))
        self.classifier = nn.Linear(4, 1)
        self.register_buffer("seen", torch.zeros(()))
        self.cross_entropy_loss = nn.CrossEntropyLoss()
        if freeze:
            self.ll[0].requires_grad_(False)

    def forward(self, x, y):
        self.seen += 1
        for layer in self.ll:
            x = layer(x)
        return self.cross_entropy_loss(x.float(), y)


def _config(stage: int) -> dict:
    """TestZeroToFP32's config: bf16, 2 micro-batches of 2 per step, Adam at lr 1e-3, every
    stage-3 parameter partitioned; unused parameters allowed (the classifier)."""
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "bf16": {"enabled": True},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                  "ignore_unused_parameters": True}}


def _trained(stage: int, freeze: bool, groups: bool, tmp: str):
    """The engine after 4 micro-steps (16 samples over 2 ranks), saved into `tmp`; with its
    initial parameters."""
    torch.manual_seed(7)
    with zero_ext.Init(enabled=stage == 3):
        model = MyModel(freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    if groups:  # test_2_param_groups: weights and biases apart
        params = [{"params": [p for n, p in model.named_parameters()
                              if p.requires_grad and n.endswith("weight")],
                   "weight_decay": 0.01},
                  {"params": [p for n, p in model.named_parameters()
                              if p.requires_grad and n.endswith("bias")],
                   "weight_decay": 0.0}]
    engine, *_ = zero_ext.initialize(model=model, config=_config(stage), model_parameters=params)
    initial = {n: v.float().clone() for n, v in engine.full_state_dict().items()}
    gen = torch.Generator().manual_seed(100 + rank())
    for _ in range(4):
        x = torch.randn(2, 3, generator=gen).to(torch.bfloat16)
        engine.backward(engine(x, torch.randint(0, 3, (2,), generator=gen)))
        engine.step()
    engine.save_checkpoint(tmp)
    return engine, initial


def _to_fp32(tmp, stage: int, freeze: bool, groups: bool) -> None:
    """load_state_dict_from_zero_checkpoint(fresh model, save_dir) gives every trainable
    parameter its fp32 master weights exactly, the frozen ones their initial values, the
    buffer the engine's; get_fp32_state_dict_from_zero_checkpoint the same values, trainable
    ones and the buffer in fp32, frozen ones in bf16 as saved (DeepSpeed's)."""
    engine, initial = _trained(stage, freeze, groups, tmp)
    masters = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    seen = engine.module.seen.clone()
    dist.barrier()

    def check():
        fresh = load_state_dict_from_zero_checkpoint(MyModel(freeze), tmp)
        for name, param in fresh.named_parameters():
            want = initial[name] if masters[name] is None else masters[name].cpu()
            assert torch.equal(param.detach().float(), want), name
        assert torch.equal(fresh.seen, seen.cpu()) and fresh.seen.item() == 4
        state = get_fp32_state_dict_from_zero_checkpoint(tmp)
        for name, value in state.items():  # DeepSpeed's: frozen ones as saved (bf16)
            frozen = name in masters and masters[name] is None
            assert value.dtype == (torch.bfloat16 if frozen else torch.float32), (name, value)
            assert torch.equal(value.float(), fresh.state_dict()[name].float()), name

    collectively(check)


for _stage in (1, 2, 3):
    for _freeze in (False, True):
        case(TO_FP32 + f"test_1_param_group[{_stage}-{_freeze}]", stage=_stage,
             freeze=_freeze, groups=False)(_to_fp32)
        case(TO_FP32 + f"test_2_param_groups[{_stage}-{_freeze}]", stage=_stage,
             freeze=_freeze, groups=True)(_to_fp32)


@case(CONVERT + "test_convert_zero_checkpoint_to_fp32_state_dict")
def convert(tmp):
    """Stage 3, tied weights: pytorch_model.bin loads with torch.load(weights_only=True), the
    tied keys are one tensor, a fresh model loads it strictly and holds the engine's fp32
    weights."""
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    torch.manual_seed(8)
    with zero_ext.Init(config=config):
        model = ModelWithSharedWeights()
    engine, *_ = zero_ext.initialize(model=model, config=config,
                                     optimizer=torch.optim.Adam(model.parameters()))
    state = engine.full_state_dict()
    engine.save_checkpoint(os.path.join(tmp, "checkpoint_ds"), tag="checkpoint")
    dist.barrier()
    out = os.path.join(tmp, f"checkpoint_fp32-{rank()}")

    def check():
        convert_zero_checkpoint_to_fp32_state_dict(os.path.join(tmp, "checkpoint_ds"), out)
        assert sorted(os.listdir(out)) == ["pytorch_model.bin"], os.listdir(out)
        loaded = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
        assert loaded["layer1.weight"] is loaded["layer2.weight"]
        fresh = ModelWithSharedWeights()
        fresh.load_state_dict(loaded, strict=True)
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, state[name].float()), name
        # Sharded: the tied keys share a shard, and the index counts their tensor once.
        sharded = out + "-sharded"
        convert_zero_checkpoint_to_fp32_state_dict(os.path.join(tmp, "checkpoint_ds"), sharded,
                                                   max_shard_size="1KB")
        with open(os.path.join(sharded, "pytorch_model.bin.index.json")) as f:
            index = json.load(f)
        where = index["weight_map"]
        assert len(set(where.values())) > 1 and where["layer1.weight"] == where["layer2.weight"]
        assert index["metadata"]["total_size"] == 4 * sum(p.numel() for p in fresh.parameters())
        shard = torch.load(os.path.join(sharded, where["layer1.weight"]), weights_only=True)
        assert shard["layer1.weight"] is shard["layer2.weight"]

    collectively(check)


def _saved_with_frozen(tmp) -> str:
    """A stage-2 bf16 checkpoint of MyModel with its first linear frozen; its save_dir."""
    torch.manual_seed(3)
    engine, _ = _trained(2, True, False, os.path.join(tmp, "ckpt"))
    del engine
    dist.barrier()
    return os.path.join(tmp, "ckpt")


@case(CONVERT + "zero_ext::sharded_safetensors_lazy_frozen_and_cli")
def sharded(tmp):
    """max_shard_size splits the output as transformers does: the shards transformers'
    get_checkpoint_shard_files finds from the index load strictly into a fresh model
    (safetensors and .bin), equal to the unsharded state dict; exclude_frozen_parameters leaves exactly the frozen keys out (buffers
    stay); lazy_mode's values read the same tensors; the CLI writes the same files and fails
    with a message on a directory without a checkpoint; loading into another model is an
    error naming the keys."""
    save_dir = _saved_with_frozen(tmp)
    base = os.path.join(tmp, f"out-{rank()}")

    def check():
        from safetensors.torch import load_file
        from transformers.utils.hub import get_checkpoint_shard_files
        whole = get_fp32_state_dict_from_zero_checkpoint(save_dir)
        for serial, suffix in ((True, "model.safetensors"), (False, "pytorch_model.bin")):
            out = f"{base}-{suffix}"
            convert_zero_checkpoint_to_fp32_state_dict(save_dir, out, max_shard_size="100B",
                                                       safe_serialization=serial)
            with open(os.path.join(out, suffix + ".index.json")) as f:
                index = json.load(f)
            shards = sorted(set(index["weight_map"].values()))
            assert len(shards) > 2 and shards[0].endswith(f"-00001-of-{len(shards):05d}"
                                                          + suffix[suffix.index("."):]), shards
            # Every floating tensor in fp32 (the frozen bf16 ones too, DeepSpeed's).
            assert index["metadata"]["total_size"] == sum(
                v.numel() * (4 if v.is_floating_point() else v.element_size())
                for v in whole.values())
            files, _ = get_checkpoint_shard_files(out, os.path.join(out, suffix + ".index.json"))
            loaded = {}
            for file in files:
                loaded.update(load_file(file) if serial else torch.load(file, weights_only=True))
            fresh = MyModel(True)
            fresh.load_state_dict(loaded, strict=True)
            for name, value in fresh.state_dict().items():
                assert torch.equal(value, whole[name].to(value.dtype)), name
        frozen = get_fp32_state_dict_from_zero_checkpoint(save_dir,
                                                          exclude_frozen_parameters=True)
        assert sorted(set(whole) - set(frozen)) == ["ll.0.bias", "ll.0.weight"], sorted(frozen)
        lazy = get_fp32_state_dict_from_zero_checkpoint(save_dir, lazy_mode=True)
        assert all(isinstance(v, LazyTensor) for v in lazy.values())
        assert all(torch.equal(lazy[k].contiguous(), whole[k]) for k in whole)
        assert main([save_dir, f"{base}-cli", "--safe_serialization"]) == 0
        cli = load_file(os.path.join(f"{base}-cli", "model.safetensors"))
        assert cli.keys() == whole.keys() and all(torch.equal(cli[k], whole[k].float())
                                                  for k in whole)
        assert main([os.path.join(tmp, "nothing-here"), f"{base}-none"]) == 1
        expect_zero_ext_error(lambda: load_state_dict_from_zero_checkpoint(
            ModelWithSharedWeights(), save_dir), "missing", "unexpected", "layer0.weight")

    collectively(check)


@case(CONVERT + "zero_ext::state_dict_in_the_dtype_asked_for")
def converted_dtypes(tmp):
    """convert_zero_checkpoint_to_state_dict(dtype=...) as DeepSpeed documents it: every
    floating tensor (trainable, frozen bf16, the float buffer) in the dtype asked for, given
    as a torch dtype or DeepSpeed's names; the fp32 form is dtype float32; another dtype is
    refused naming the choices."""
    save_dir = _saved_with_frozen(tmp)

    def check():
        whole = get_fp32_state_dict_from_zero_checkpoint(save_dir)
        assert whole["ll.0.weight"].dtype == torch.bfloat16  # frozen, as saved
        for dtype, want in (("bf16", torch.bfloat16), ("torch.float16", torch.float16),
                            (torch.float32, torch.float32), (None, torch.float32)):
            out = os.path.join(tmp, f"out-{rank()}-{dtype}")
            if dtype is None:
                convert_zero_checkpoint_to_fp32_state_dict(save_dir, out)
            else:
                convert_zero_checkpoint_to_state_dict(save_dir, out, dtype=dtype)
            got = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
            assert got.keys() == whole.keys()
            for name, value in whole.items():
                assert got[name].dtype == want, (dtype, name, got[name].dtype)
                assert torch.equal(got[name], value.to(want)), (dtype, name)
        expect_zero_ext_error(lambda: convert_zero_checkpoint_to_state_dict(
            save_dir, os.path.join(tmp, "int8"), dtype=torch.int8), "bf16", "float32")

    collectively(check)


@case(CONVERT + "zero_ext::exclude_frozen_refused_without_the_record")
def exclude_frozen_old(tmp):
    """A checkpoint whose metadata does not record its frozen keys (saved before the record
    existed) cannot tell frozen parameters from buffers: exclude_frozen_parameters is an error
    that says so, the plain conversion works."""
    torch.manual_seed(3)
    engine, _ = _trained(1, True, False, tmp)
    del engine
    dist.barrier()

    def check():
        with open(os.path.join(tmp, "latest")) as f:
            tag = f.read().strip()
        path = os.path.join(tmp, tag)
        with open(os.path.join(path, "metadata.json")) as f:
            metadata = json.load(f)
        metadata.pop("frozen")
        old = os.path.join(tmp, f"old-{rank()}")
        os.makedirs(old)
        for name in os.listdir(path):
            os.link(os.path.join(path, name), os.path.join(old, name))
        for name in ("metadata.json", "manifest.json"):
            os.unlink(os.path.join(old, name))
        with open(os.path.join(old, "metadata.json"), "w") as f:
            json.dump(metadata, f)
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)  # the old metadata's size and checksums, as a save writes
        manifest["files"]["metadata.json"].update(
            bytes=os.path.getsize(os.path.join(old, "metadata.json")),
            sha256_chunks=list(chunk_digests(os.path.join(old, "metadata.json"),
                                             manifest["chunk_bytes"])))
        with open(os.path.join(old, "manifest.json"), "w") as f:
            json.dump(manifest, f)
        get_fp32_state_dict_from_zero_checkpoint(old)
        expect_zero_ext_error(lambda: get_fp32_state_dict_from_zero_checkpoint(
            old, exclude_frozen_parameters=True), "frozen", "exclude_frozen_parameters")

    collectively(check)
