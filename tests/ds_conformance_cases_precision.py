"""Ported cases: fp16 training and DeepSpeed's dynamic loss scale, step by step.

From DeepSpeed's tests/unit/runtime/half_precision/{test_fp16,test_dynamic_loss_scale,
test_zero_optim_overflow}.py, runtime/zero/test_zero_grad_clip.py and
v1/half_precision/test_bf16.py. DeepSpeed's tests set every gradient to a value and read the
scaler's fields; here a loss whose gradient is that value goes through the engine, and the
scale after each step is compared with the sequence DeepSpeed's rules give (ds_loss_scales).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import zero_ext

from ds_conformance_cases import (
    LoudModel,
    SimpleModel,
    case,
    full_params,
    model_fn,
    parity,
    world,
)

FP16 = "test_fp16.py::"
SCALE = "test_dynamic_loss_scale.py::"


# -- test_fp16.py -----------------------------------------------------------------------------
for _stage in (1, 2, 3):
    for _offload in (True, False):
        @case(FP16 + f"TestZeroStaticScale[{_offload}-{_stage}]", stage=_stage,
              offload=_offload)
        def static_scale(tmp, stage, offload):
            config = {"train_batch_size": 4 * world(), "gradient_clipping": 1.0,
                      "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.0}},
                      "fp16": {"enabled": True, "loss_scale": 138.0},
                      "zero_optimization": {"stage": stage}}
            if offload:
                config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            result = parity(lambda: SimpleModel(4), config, steps=3, hidden=4)
            engine = result["engine"]
            assert engine.loss_scaler.scale == 138.0 and engine.skipped_steps == 0


@case(FP16 + "TestAdamFP32EmptyGrad")
def fp32_empty_grad(tmp):
    # A layer forward never uses (empty_grad): with DeepSpeed's default
    # ignore_unused_parameters (true) training goes on; the unused layer steps with a zero
    # gradient, as DeepSpeed's ZeRO optimizers do.
    config = {"train_batch_size": 2 * world(), "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "weight_decay": 0.01}},
              "fp16": {"enabled": False}}
    parity(lambda: SimpleModel(empty_grad=True), config, steps=3)


for _stage in (1, 2, 3):
    @case(FP16 + f"TestZeroEmptyGrad[{_stage}]", stage=_stage)
    def zero_empty_grad(tmp, stage):
        config = {"train_batch_size": world(), "gradient_clipping": 1.0,
                  "zero_optimization": {"stage": stage}}
        parity(lambda: SimpleModel(empty_grad=True), config, steps=2,
               optimizer=model_fn(lambda m: torch.optim.Adam(m.parameters())),
               ref_optimizer=lambda ps: torch.optim.Adam(ps))


for _adam in ("Adam", "AdamW"):
    for _torch_impl in (True, False):
        @case(FP16 + f"TestFP16AdamTypes[{_torch_impl}-{_adam}]", adam=_adam,
              torch_impl=_torch_impl)
        def adam_types(tmp, adam, torch_impl):
            # torch_adam picks DeepSpeed's kernel, not the math: both train the same way.
            config = {"train_batch_size": world(), "gradient_clipping": 1.0,
                      "fp16": {"enabled": True, "initial_scale_power": 10},
                      "optimizer": {"type": adam, "torch_adam": torch_impl,
                                    "params": {"lr": 0.01, "weight_decay": 0.0}}}
            parity(SimpleModel, config, steps=3)


@case(FP16 + "TestZero2ReduceScatterOff")
def zero2_reduce_scatter_off(tmp):
    config = {"train_batch_size": 2 * world(), "gradient_clipping": 1.0,
              "optimizer": {"type": "Adam", "params": {"lr": 0.01, "weight_decay": 0.0}},
              "zero_optimization": {"stage": 2, "contiguous_gradients": True,
                                    "allgather_bucket_size": 2000000000,
                                    "reduce_bucket_size": 200000000, "overlap_comm": False,
                                    "reduce_scatter": False},
              "fp16": {"enabled": True, "initial_scale_power": 8}}
    parity(SimpleModel, config, steps=3)


# -- test_dynamic_loss_scale.py -----------------------------------------------------------------
class GradientProbe(nn.Module):
    """DeepSpeed's run_model_step sets every gradient to a value; from the outside, the loss
    sum(p * value) gives each parameter exactly that gradient (times the loss scale)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, value):
        return sum((p * value).sum() for p in self.parameters())


def ds_loss_scales(initial: float, overflows: list[bool], window: int, hysteresis: int = 2,
                   min_scale: float = 1.0, consecutive: bool = False) -> list[float]:
    """The scale after each step by DeepSpeed's rule (runtime/fp16/loss_scaler.py): an overflow
    spends one hysteresis, halving (not below min_scale) when the last one is spent; a clean
    step doubles when the clean steps since the last overflow, not counting the first, reach
    a multiple of the window (stable_interval = cur_iter - last_overflow_iter - 1)."""
    scale, left, last_overflow, out = initial, hysteresis, -1, []
    for iteration, overflow in enumerate(overflows):
        if overflow:
            if hysteresis == 1 or left == 1:
                scale = max(scale / 2, min_scale)
            else:
                left -= 1
            last_overflow = iteration
        else:
            if consecutive:
                left = hysteresis
            stable = iteration - last_overflow - 1
            if stable > 0 and stable % window == 0:
                if not consecutive:
                    left = hysteresis
                scale *= 2
        out.append(scale)
    return out


def _scale_engine(fp16: dict, stage: int = 0):
    model = GradientProbe()
    config = {"train_batch_size": world(), "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage},
              "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "weight_decay": 0.0}},
              "fp16": {"enabled": True, "loss_scale": 0, **fp16}}
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
    return engine


def _run_values(engine, values) -> list[float]:
    scales = []
    for value in values:
        engine.backward(engine(torch.tensor(value, dtype=torch.float16)))
        engine.step()
        scales.append(engine.loss_scaler.scale)
    return scales


def _clean_values(n: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=gen) * 0.2 - 0.1).tolist()


@case(SCALE + "TestFused::test_no_overflow")
def no_overflow(tmp):
    engine = _scale_engine({"initial_scale_power": 8, "loss_scale_window": 2})
    assert engine.loss_scaler.scale == 2 ** 8
    scales = _run_values(engine, _clean_values(10))
    # DeepSpeed's test: 2**8 until step 2, then doubled after every 2 further steps.
    assert scales == ds_loss_scales(256, [False] * 10, 2), scales
    assert scales == [256, 256, 512, 512, 1024, 1024, 2048, 2048, 4096, 4096], scales
    assert engine.global_steps == 10 and engine.skipped_steps == 0


@case(SCALE + "TestFused::test_all_overflow")
def all_overflow(tmp):
    engine = _scale_engine({"initial_scale_power": 4, "loss_scale_window": 2,
                            "hysteresis": 1})
    values = [float("inf"), float("-inf"), float("nan"), float("nan")]
    scales = _run_values(engine, values)
    assert scales == [8, 4, 2, 1], scales
    assert engine.skipped_steps == 4


@case(SCALE + "TestFused::test_all_overflow[stage0_default_hysteresis]")
def all_overflow_stage0_hysteresis(tmp):
    # Stage 0 is DeepSpeed's FP16_Optimizer, whose _update_scale halves on every overflow
    # (fp16.hysteresis, default 2, is read by the ZeRO optimizers only).
    engine = _scale_engine({"initial_scale_power": 8, "loss_scale_window": 2})
    assert _run_values(engine, [float("inf")] * 3) == [128, 64, 32]


@case(SCALE + "TestUnfused::test_all_overflow")
def all_overflow_min_scale(tmp):
    engine = _scale_engine({"initial_scale_power": 4, "loss_scale_window": 2,
                            "min_loss_scale": 2.0, "hysteresis": 1})
    scales = _run_values(engine, [float("inf"), float("-inf"), float("nan")])
    assert scales == [8, 4, 2], scales


@case(SCALE + "TestFused::test_some_overflow")
def some_overflow(tmp):
    engine = _scale_engine({"initial_scale_power": 8, "loss_scale_window": 2,
                            "hysteresis": 1})
    values = [float("inf"), float("nan")] + _clean_values(3) + [float("inf")]
    scales = _run_values(engine, values)
    # DeepSpeed's test: two overflows quarter the scale, window + 1 = 3 clean steps double it
    # once (on the third), one overflow halves it again.
    overflows = [not math.isfinite(v) for v in values]
    assert scales == ds_loss_scales(256, overflows, 2, hysteresis=1), scales
    assert scales == [128, 64, 64, 64, 128, 64], scales
    assert engine.skipped_steps == 3 and engine.global_steps == 6


@case(SCALE + "TestFused::test_some_overflow[window+1]")
def doubling_waits_window_plus_one(tmp):
    # The doubling after an overflow comes on clean step window + 1, also with a longer window.
    engine = _scale_engine({"initial_scale_power": 8, "loss_scale_window": 3,
                            "hysteresis": 1})
    values = [float("inf")] + _clean_values(8)
    scales = _run_values(engine, values)
    assert scales == [128, 128, 128, 128, 256, 256, 256, 512, 512], scales


@case(SCALE + "TestZeroStage0Hysteresis::test_hysteresis[zero_stage1]")
def hysteresis(tmp):
    engine = _scale_engine({"initial_scale_power": 8, "hysteresis": 3}, stage=1)
    scales = _run_values(engine, [float("inf")] * 4)
    assert scales == [2 ** 8, 2 ** 8, 2 ** 7, 2 ** 6], scales


@case(SCALE + "TestZeroStage0Hysteresis::test_consecutive_hysteresis[zero_stage1]")
def consecutive_hysteresis(tmp):
    engine = _scale_engine({"initial_scale_power": 8, "hysteresis": 2,
                            "consecutive_hysteresis": True}, stage=1)
    values = [v for pair in zip([float("inf")] * 4, _clean_values(4)) for v in pair]
    scales = _run_values(engine, values)
    assert scales[-1] == 2 ** 8, scales


@case(SCALE + "TestZeroStage0Hysteresis::test_hysteresis_through_the_engine[zero_stage1]")
def hysteresis_survives_checkpoint(tmp):
    fp16 = {"initial_scale_power": 8, "loss_scale_window": 100, "hysteresis": 2}
    engine = _scale_engine(fp16, stage=1)
    _run_values(engine, _clean_values(1))
    assert _run_values(engine, [float("inf")]) == [2 ** 8], "the first overflow is absorbed"
    engine.save_checkpoint(tmp, tag="spent")
    restored = _scale_engine(fp16, stage=1)
    restored.load_checkpoint(tmp, tag="spent")
    assert restored.loss_scaler.scale == 2 ** 8
    assert _run_values(restored, [float("inf")]) == [2 ** 7], \
        "one overflow was already spent before the checkpoint"


@case(SCALE + "TestFused::test_some_overflow[skip_leaves_weights]")
def overflow_leaves_weights(tmp):
    # A skipped step changes nothing but the scale (DeepSpeed's overflow check skips the
    # optimizer step on every rank).
    engine = _scale_engine({"initial_scale_power": 8, "hysteresis": 1})
    _run_values(engine, _clean_values(1))
    before = full_params(engine)
    _run_values(engine, [float("inf")])
    after = full_params(engine)
    for name in before:
        assert torch.equal(before[name], after[name]), name


# -- test_zero_optim_overflow.py: the same loss-scale sequences through ZeRO stages 1-2 --------
OVERFLOW = "test_zero_optim_overflow.py::TestZeROFloat16::"

for _stage in (1, 2):
    for _offload in (False, True):
        @case(OVERFLOW + f"test_no_overflow[{_offload}-{_stage}]", stage=_stage,
              offload=_offload)
        def zero_no_overflow(tmp, stage, offload):
            engine = _zero_scale_engine(stage, offload, {"initial_scale_power": 8,
                                                         "loss_scale_window": 2})
            scales = _run_values(engine, _clean_values(10, seed=stage))
            assert scales == ds_loss_scales(256, [False] * 10, 2), scales

        @case(OVERFLOW + f"test_all_overflow[{_offload}-{_stage}]", stage=_stage,
              offload=_offload)
        def zero_all_overflow(tmp, stage, offload):
            values = [float("inf"), float("-inf")] + [float("nan")] * 6
            engine = _zero_scale_engine(stage, offload, {"initial_scale_power": len(values),
                                                         "loss_scale_window": 2,
                                                         "hysteresis": 1})
            before = full_params(engine)
            scales = _run_values(engine, values)
            after = full_params(engine)
            assert scales == [2.0 ** (len(values) - i - 1) for i in range(len(values))], scales
            assert engine.skipped_steps == len(values)
            assert all(torch.equal(before[n], after[n]) for n in before)

        @case(OVERFLOW + f"test_some_overflow[{_offload}-{_stage}]", stage=_stage,
              offload=_offload)
        def zero_some_overflow(tmp, stage, offload):
            engine = _zero_scale_engine(stage, offload, {"initial_scale_power": 8,
                                                         "loss_scale_window": 2,
                                                         "hysteresis": 1})
            values = [float("inf"), float("nan")] + _clean_values(3) + [float("inf")]
            scales = _run_values(engine, values)
            overflows = [not math.isfinite(v) for v in values]
            assert scales == ds_loss_scales(256, overflows, 2, hysteresis=1), scales


def _zero_scale_engine(stage: int, offload: bool, fp16: dict):
    model = GradientProbe()
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
              "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "weight_decay": 0.0}},
              "fp16": {"enabled": True, "loss_scale": 0, **fp16}, "zero_optimization": zero}
    engine, _, _, _ = zero_ext.initialize(model=model, config=config,
                                          model_parameters=list(model.parameters()))
    return engine


# -- runtime/zero/test_zero_grad_clip.py ------------------------------------------------------
for _precision, _offload in (("fp16", "cpu"), ("bf16", "cpu"), ("fp16", "none"),
                             ("bf16", "none")):
    @case(f"test_zero_grad_clip.py::TestZeroGradClip::test_grad_clip_and_norm_update"
          f"[{_precision}-{_offload}]", precision=_precision, offload=_offload)
    def grad_clip_and_norm(tmp, precision, offload):
        # Stage 3, optimizer offloaded or not: the reported global norm is the pre-clip norm of
        # the averaged, unscaled gradient, and the step applies the gradient clipped to 1.0.
        config = {"train_batch_size": 8, "gradient_clipping": 1.0,
                  "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "weight_decay": 0.0}},
                  "zero_optimization": {"stage": 3, "offload_optimizer": {"device": offload},
                                        "contiguous_gradients": True, "overlap_comm": False}}
        config["fp16" if precision == "fp16" else "bf16"] = (
            {"enabled": True, "loss_scale": 1024, "initial_scale_power": 10}
            if precision == "fp16" else {"enabled": True})
        result = parity(LoudModel, config, steps=2)
        norm = result["engine"].get_global_grad_norm()
        ref_norm = result["ref_norms"][-1]
        assert ref_norm > 1.0, ref_norm
        assert abs(norm - ref_norm) <= 2e-2 * ref_norm, (norm, ref_norm)


# -- v1/half_precision/test_bf16.py::TestZeroDtypeCocktail ------------------------------------
for _comp in ("fp16", "bf16", "fp32"):
    for _comm in ("fp16", "bf16", "default"):
        @case(f"test_bf16.py::TestZeroDtypeCocktail[{_comm}-{_comp}]", comp=_comp, comm=_comm)
        def dtype_cocktail(tmp, comp, comm):
            # Every model dtype with every gradient-communication dtype at stage 2, a client
            # Adam: training matches plain PyTorch (to 16-bit precision where one is 16-bit).
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
                      "fp16": {"enabled": comp == "fp16", "initial_scale_power": 8},
                      "bf16": {"enabled": comp == "bf16"}, "zero_optimization": {"stage": 2}}
            if comm != "default":
                config["communication_data_type"] = comm
            sixteen = comp != "fp32" or comm != "default"
            parity(SimpleModel, config, steps=2,
                   optimizer=model_fn(lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)),
                   ref_optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2),
                   compare_as=torch.bfloat16 if sixteen else torch.float32)
