"""Ported cases: the DeepSpeed engine's members beside training that scripts and libraries call
(accelerate's get_state_dict, transformers' Trainer, Megatron-style logging), and the file
save_16bit_model writes.

DeepSpeed's deepspeed/runtime/engine.py (0.19) is the reference: each expected value below is
what its method returns for the same config (get_batch_info() is (train_batch_size,
micro batch, accumulation steps); zero_optimization_partition_weights() is stage >= 3;
loss_scale() is the config's fp16.loss_scale, 0 meaning dynamic, with or without fp16;
_zero3_consolidated_16bit_state_dict() is the full state dict in the model's dtype on rank 0
and None elsewhere; save_16bit_model(dir, "pytorch_model.bin") is a torch.save file there).
The values are checked against the engine's own full weights.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

import zero_ext

from ds_conformance_cases import (
    HIDDEN,
    SimpleModel,
    batch,
    build_engine,
    case,
    collectively,
    expect_zero_ext_error,
    rank,
    train_engine,
    world,
)

ENGINE = "test_ds_initialize.py::zero_ext::engine_api::"
SAVE = "test_zero.py::zero_ext::save_16bit_model::"


class FrozenFirst(SimpleModel):
    """SimpleModel with two layers, the first frozen (a fine-tune's base)."""

    def __init__(self):
        super().__init__(nlayers=2)
        self.linears[0].requires_grad_(False)


FROZEN_KEYS = {"linears.0.weight", "linears.0.bias"}


def _stage3(config: dict) -> dict:
    """Every stage-3 parameter partitioned (none kept whole for being small)."""
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


# -- the accessors ------------------------------------------------------------------------------
# One config per stage; `want` is what DeepSpeed's engine returns for it.
_ACCESSOR_CONFIGS = {
    0: ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
         "zero_optimization": {"stage": 0}},
        {"batch": (3, 2), "zero": False, "gradients": False, "weights": False, "cpu": False,
         "offload_optimizer": None, "offload_param": None, "gather": False, "loss_scale": 0.0,
         "dynamic": True, "steps_per_print": None, "wall_clock": False, "optimizer": "SGD",
         "scheduler": None, "comm": torch.float32, "client": True}),
    1: ({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
         "communication_data_type": "fp32", "steps_per_print": 7, "wall_clock_breakdown": True,
         "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
         "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
         "zero_optimization": {"stage": 1}},
        {"batch": (2, 2), "zero": True, "gradients": False, "weights": False, "cpu": False,
         "offload_optimizer": None, "offload_param": None, "gather": False, "loss_scale": 0.0,
         "dynamic": True, "steps_per_print": 7, "wall_clock": True, "optimizer": "adam",
         "scheduler": "WarmupLR", "comm": torch.float32, "client": False}),
    2: ({"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True, "loss_scale": 128},
         "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
         "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        {"batch": (2, 1), "zero": True, "gradients": True, "weights": False, "cpu": True,
         "offload_optimizer": "cpu", "offload_param": None, "gather": False,
         "loss_scale": 128.0, "dynamic": False, "steps_per_print": None, "wall_clock": False,
         "optimizer": "adamw", "scheduler": None, "comm": torch.float16, "client": False}),
    3: ({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 3,
         "fp16": {"enabled": True},
         "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                               "stage3_gather_16bit_weights_on_model_save": True}},
        {"batch": (1, 3), "zero": True, "gradients": True, "weights": True, "cpu": False,
         "offload_optimizer": None, "offload_param": "cpu", "gather": True, "loss_scale": 0.0,
         "dynamic": True, "steps_per_print": None, "wall_clock": False, "optimizer": "adamw",
         "scheduler": None, "comm": torch.float16, "client": False}),
}

for _stage in (0, 1, 2, 3):
    @case(ENGINE + f"accessors[stage{_stage}]", stage=_stage)
    def accessors(tmp, stage):
        """DeepSpeed's get_batch_info(), dp_world_size / mp_world_size, the zero_*() config
        readers, loss_scale() / dynamic_loss_scale(), steps_per_print(),
        wall_clock_breakdown(), optimizer_name() / scheduler_name(), communication_data_type,
        client_optimizer / basic_optimizer: each as DeepSpeed's engine answers for the config
        (stage 0 with a client torch.optim.SGD, the others with the config's optimizer)."""
        config, want = _ACCESSOR_CONFIGS[stage]
        torch.manual_seed(0)
        model = SimpleModel()
        client = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) \
            if want["client"] else None
        engine, optimizer, _, _ = zero_ext.initialize(model=model, config=config,
                                                      optimizer=client)
        micro, gas = want["batch"]
        assert engine.get_batch_info() == (micro * gas * world(), micro, gas), \
            engine.get_batch_info()
        assert engine.get_batch_info() == (engine.train_batch_size(),
                                           engine.train_micro_batch_size_per_gpu(),
                                           engine.gradient_accumulation_steps())
        assert (engine.dp_world_size, engine.mp_world_size) == (world(), 1)
        assert engine.zero_optimization() is want["zero"]
        assert engine.zero_optimization_partition_gradients() is want["gradients"]
        assert engine.zero_optimization_partition_weights() is want["weights"]
        assert engine.zero_cpu_offload() is want["cpu"]
        for got, expected in ((engine.zero_offload_optimizer(), want["offload_optimizer"]),
                              (engine.zero_offload_param(), want["offload_param"])):
            # DeepSpeed's: the section's config object (its .device), None without offload
            assert (got if got is None else got.device) == expected, (got, expected)
        assert engine.zero_gather_16bit_weights_on_model_save() is want["gather"]
        assert engine.loss_scale() == want["loss_scale"], engine.loss_scale()
        assert engine.dynamic_loss_scale() is want["dynamic"]
        assert engine.steps_per_print() == want["steps_per_print"]
        assert engine.wall_clock_breakdown() is want["wall_clock"]
        assert engine.optimizer_name() == want["optimizer"], engine.optimizer_name()
        assert engine.scheduler_name() == want["scheduler"], engine.scheduler_name()
        assert engine.communication_data_type == want["comm"], engine.communication_data_type
        if client is not None:
            # DeepSpeed holds the optimizer given in client_optimizer, and what it wraps (here
            # that same optimizer) in basic_optimizer.
            assert engine.client_optimizer is client and engine.basic_optimizer is client
        else:
            assert engine.client_optimizer is None
            # The optimizer that updates the weights (DeepSpeed's: FusedAdam from the config).
            assert isinstance(engine.basic_optimizer, torch.optim.Optimizer)
            assert engine.basic_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        # memory_breakdown() keeps zero_ext's meaning (bytes held), unlike DeepSpeed's flag.
        assert isinstance(engine.memory_breakdown(), dict)


# -- module_state_dict --------------------------------------------------------------------------
for _stage in (0, 1, 2, 3):
    @case(ENGINE + f"module_state_dict[stage{_stage}]", stage=_stage)
    def module_state_dict(tmp, stage):
        """DeepSpeed's module_state_dict(destination, prefix, keep_vars,
        exclude_frozen_parameters) is engine.module.state_dict(...), frozen parameters left
        out on request; not a collective. At stage 3 DeepSpeed returns empty placeholders for
        the partitioned parameters unless they are gathered: here inside GatheredParameters it
        gives the full values, outside it is an error naming GatheredParameters (keep_vars=True
        gives the Parameters themselves, as DeepSpeed's)."""
        config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": stage}}
        engine = build_engine(_stage3(config) if stage == 3 else config, 1, FrozenFirst)
        train_engine(engine, 1, dtype=torch.bfloat16)
        full = engine.full_state_dict()
        module = engine.module
        if stage == 3:
            error = expect_zero_ext_error(engine.module_state_dict, "GatheredParameters")
            assert "partitioned" in error
            with zero_ext.GatheredParameters(list(module.parameters())):
                got = engine.module_state_dict()
                got = {k: v.clone() for k, v in got.items()}
        else:
            got = engine.module_state_dict()
            own = module.state_dict()
            for key, value in got.items():  # the module's tensors, not copies
                assert value.data_ptr() == own[key].data_ptr(), key
        assert list(got) == list(full), (list(got), list(full))
        for key, value in got.items():
            assert value.dtype == full[key].dtype and torch.equal(value.cpu(), full[key]), key
        kept = engine.module_state_dict(prefix="m.", keep_vars=True,
                                        exclude_frozen_parameters=True)
        assert list(kept) == ["m." + k for k in full if k not in FROZEN_KEYS], list(kept)
        params = dict(module.named_parameters())
        for key, value in kept.items():
            assert value is params[key[2:]], key
        out = {}
        assert engine.module_state_dict(destination=out, keep_vars=True) is out


# -- _zero3_consolidated_16bit_state_dict -------------------------------------------------------
@case(ENGINE + "zero3_consolidated_16bit_state_dict")
def zero3_consolidated_16bit_state_dict(tmp):
    """DeepSpeed's _zero3_consolidated_16bit_state_dict(exclude_frozen_parameters) (accelerate's
    get_state_dict and transformers' Trainer call it at stage 3): collective; on rank 0 the
    full state dict in the model's dtype on the CPU, in the module's key order, frozen
    parameters left out on request; None on the other ranks. Below stage 3 a ValueError, as
    DeepSpeed's ("this function requires ZeRO-3 mode")."""
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3}}
    engine = build_engine(_stage3(config), 1, FrozenFirst)
    train_engine(engine, 2, dtype=torch.bfloat16)
    full = engine.full_state_dict()
    got = engine._zero3_consolidated_16bit_state_dict()
    without = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    stage2 = build_engine({**config, "zero_optimization": {"stage": 2}}, 1, FrozenFirst)
    error = expect_zero_ext_error(stage2._zero3_consolidated_16bit_state_dict, "stage 3")

    def check():
        if rank() != 0:
            assert got is None and without is None, (got, without)
            return
        assert list(got) == list(full), (list(got), list(full))
        for key, value in got.items():
            assert value.device.type == "cpu" and value.dtype == torch.bfloat16, key
            assert torch.equal(value, full[key]), key
        assert list(without) == [k for k in full if k not in FROZEN_KEYS], list(without)
    collectively(check)
    try:
        stage2._zero3_consolidated_16bit_state_dict()
    except ValueError:
        pass
    else:
        raise AssertionError(f"not a ValueError: {error}")


# -- save_16bit_model's file ----------------------------------------------------------------------
class TiedHead(nn.Module):
    """An embedding tied to the output head (a language model's), and a buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(HIDDEN, HIDDEN)
        self.body = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.full((HIDDEN,), 0.5))

    def forward(self, x, y):
        hidden = self.body(self.embed(y))
        hidden = hidden * self.scale.to(hidden.dtype) + x.to(hidden.dtype)
        return nn.functional.cross_entropy(self.head(hidden).float(), y)


def _load_torch(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


for _stage in (1, 3):
    @case(SAVE + f"torch_file_for_deepspeed_names[stage{_stage}]", stage=_stage)
    def save_16bit_torch_file(tmp, stage):
        """save_16bit_model(save_dir, "pytorch_model.bin") (DeepSpeed's default name) writes a
        torch.save file at os.path.join(save_dir, save_filename), as DeepSpeed's: a plain dict
        of tensors (torch.load(weights_only=True)) equal to the engine's full weights in the
        model's dtype, each tensor its own storage (not a view of a flat buffer), tied weights
        one tensor; exclude_frozen_parameters leaves the frozen ones out. save_fp16_model is
        its alias. A name ending in .safetensors, and zero_ext's default model.safetensors,
        stay safetensors. Every rank gets the file's path."""
        from safetensors.torch import load_file

        config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                  "zero_optimization": {"stage": stage}}
        if stage == 3:
            _stage3(config)
        engine = build_engine(config, 1, FrozenFirst)
        train_engine(engine, 1, dtype=torch.bfloat16)
        full = engine.full_state_dict()
        tied = build_engine(config, 2, TiedHead)
        train_engine(tied, 1, dtype=torch.bfloat16)
        tied_full = tied.full_state_dict()
        paths = {
            "bin": engine.save_16bit_model(tmp, "pytorch_model.bin"),
            "frozen_out": engine.save_16bit_model(os.path.join(tmp, "out"), "weights.pt",
                                                  exclude_frozen_parameters=True),
            "alias": engine.save_fp16_model(os.path.join(tmp, "alias"), "pytorch_model.bin"),
            "alias_default": engine.save_fp16_model(os.path.join(tmp, "alias_default")),
            "default": engine.save_16bit_model(os.path.join(tmp, "default")),
            "named": engine.save_16bit_model(os.path.join(tmp, "named"), "w.safetensors"),
            "tied": tied.save_16bit_model(os.path.join(tmp, "tied"), "pytorch_model.bin"),
        }
        dist.barrier()
        want = {
            "bin": os.path.join(tmp, "pytorch_model.bin"),
            "frozen_out": os.path.join(tmp, "out", "weights.pt"),
            "alias": os.path.join(tmp, "alias", "pytorch_model.bin"),
            "alias_default": os.path.join(tmp, "alias_default", "model.safetensors"),
            "default": os.path.join(tmp, "default", "model.safetensors"),
            "named": os.path.join(tmp, "named", "w.safetensors"),
            "tied": os.path.join(tmp, "tied", "pytorch_model.bin"),
        }
        for name, path in paths.items():
            assert os.path.abspath(path) == os.path.abspath(want[name]), (name, path)
            assert os.path.isfile(want[name]), (name, want[name])

        def same(saved: dict, reference: dict, keys) -> None:
            assert list(saved) == list(keys), (list(saved), list(keys))
            for key in keys:
                assert saved[key].dtype == reference[key].dtype, key
                assert torch.equal(saved[key], reference[key]), key

        for name in ("bin", "alias", "tied"):
            saved = _load_torch(want[name])
            assert type(saved) is dict, type(saved)
            reference = tied_full if name == "tied" else full
            same(saved, reference, reference)
            for key, value in saved.items():
                assert value.untyped_storage().nbytes() == \
                    value.numel() * value.element_size(), key
        same(_load_torch(want["frozen_out"]), full, [k for k in full if k not in FROZEN_KEYS])
        tied_saved = _load_torch(want["tied"])
        assert tied_saved["head.weight"].data_ptr() == tied_saved["embed.weight"].data_ptr()
        # full_state_dict too (accelerate's get_state_dict; its save_model writes a tied
        # weight once only when the two keys share storage, as under DeepSpeed at stage 3)
        assert tied_full["head.weight"] is tied_full["embed.weight"]
        for name in ("alias_default", "default", "named"):
            saved = load_file(want[name])
            for key, value in full.items():
                assert torch.equal(saved[key], value), (name, key)


# -- where zero_ext differs on purpose (docs/deepspeed-compat.md) -------------------------------
for _stage in (0, 1, 3):
    @case(ENGINE + f"differences_on_purpose[stage{_stage}]", stage=_stage)
    def differences_on_purpose(tmp, stage):
        """What docs/deepspeed-compat.md's "Differs on purpose" says of the engine's counters
        and returns, pinned: engine.optimizer.zero_grad() after each step() leaves the window's
        gradients (DeepSpeed's clears them at stages 0, 1 and 3, so each window would train on
        its last micro-batch); set_gradient_accumulation_boundary(True) rounds micro_steps up
        to a multiple of the accumulation steps (DeepSpeed's counts on: its next window is
        shorter); save_checkpoint returns the tag directory (DeepSpeed: True), which is
        load_checkpoint's first element (DeepSpeed: its model-states file); load_checkpoint
        restores micro_steps (DeepSpeed's stays 0)."""
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                  "zero_optimization": {"stage": stage}}
        twins = [build_engine(config, 1) for _ in range(2)]
        for step in range(2):
            for micro in range(2):
                for calls, engine in enumerate(twins):
                    x, y = batch_of(step, micro)
                    engine.backward(engine(x, y))
                    engine.step()
                    if calls:
                        engine.optimizer.zero_grad()
        plain, zeroed = (e.full_state_dict() for e in twins)
        for key, value in plain.items():
            assert torch.equal(value, zeroed[key]), key

        engine = twins[0]
        path = engine.save_checkpoint(tmp, tag="pinned")
        loaded = build_engine(config, 2)
        got, _ = loaded.load_checkpoint(tmp)
        assert os.path.abspath(path) == os.path.abspath(os.path.join(tmp, "pinned")), path
        assert os.path.abspath(got) == os.path.abspath(path), got
        assert (loaded.micro_steps, loaded.global_steps) == (4, 2), loaded.micro_steps

        config = {**config, "gradient_accumulation_steps": 4}
        engine = build_engine(config, 1)
        engine.set_gradient_accumulation_boundary(True)  # a window of one micro-batch
        engine.backward(engine(*batch_of(0, 0)))
        engine.step()
        assert (engine.global_steps, engine.micro_steps) == (1, 4), engine.micro_steps
        engine.set_gradient_accumulation_boundary(None)
        applied = []
        for micro in range(4):
            engine.backward(engine(*batch_of(1, micro)))
            engine.step()
            applied.append(engine.was_step_applied())
        assert applied == [False, False, False, True], applied


def batch_of(step: int, micro: int):
    """This rank's micro-batch `micro` of step `step`."""
    return batch(step, micro, rank())


for _stage in (2, 3):
    @case(SAVE + f"a_writers_failure_raises_on_every_rank[stage{_stage}]", stage=_stage)
    def save_16bit_failure_everywhere(tmp, stage):
        """The writing rank's failure to open the file (a file where its folder goes) is
        raised on every rank, before any gather, naming it; it stalled the others in the
        gathers (stage 3) or in the final exchange (stage 2), which then reported only a
        stall. The group goes on: a save to a good path after works."""
        config = _stage3({"train_micro_batch_size_per_gpu": 2,
                          "zero_optimization": {"stage": stage}})
        engine = build_engine(config, 1)
        train_engine(engine, 1)
        blocker = os.path.join(tmp, f"blocked{stage}")
        if rank() == 0:
            with open(blocker, "w") as f:
                f.write("a file where the folder goes")
        dist.barrier()
        text = expect_zero_ext_error(lambda: engine.save_16bit_model(blocker),
                                     "save_16bit_model failed on 1 of", "rank 0",
                                     "FileExistsError")
        assert f"{world()} ranks" in text, text
        path = engine.save_16bit_model(os.path.join(tmp, f"fine{stage}"))
        assert os.path.abspath(path) == os.path.abspath(
            os.path.join(tmp, f"fine{stage}", "model.safetensors"))
