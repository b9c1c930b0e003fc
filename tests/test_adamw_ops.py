"""zero_ext::adamw_step_ against torch.optim's AdamW / Adam, on every device and grad dtype.

The reference is torch's own optimizer stepping an fp32 copy of the same parameters with the
same gradients (16-bit gradients are upcast for it, exactly as the op upcasts them).
"""

import pytest
import torch
from torch.testing import assert_close

import zero_ext
from zero_ext import ops

from cpu_isas import run_under_each_isa

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 4095, 2**20 + 3]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _needs_cuda_kernel(device):
    if device == "cuda" and zero_ext._C.cuda_archs_built() is None:
        pytest.fail("a GPU is present but zero_ext was built without its CUDA kernels; "
                    "rebuild with ZERO_EXT_CUDA=1")


class OpState:
    """The op's argument lists for parameters of the given sizes, seeded identically."""

    def __init__(self, sizes, device, seed=0, copy_dtype=None):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.randn(n, generator=gen).to(device) for n in sizes]
        self.exp_avgs = [torch.zeros(n, device=device) for n in sizes]
        self.exp_avg_sqs = [torch.zeros(n, device=device) for n in sizes]
        self.steps = [torch.tensor(0.0) for _ in sizes]
        self.copies = [] if copy_dtype is None else [
            torch.empty(n, device=device, dtype=copy_dtype) for n in sizes]

    def step(self, grads, **kwargs):
        ops.adamw_step_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.steps,
                        self.copies, **{**HYPER, **kwargs})


def _random_grads(sizes, device, dtype, gen):
    return [torch.randn(n, generator=gen).to(device=device, dtype=dtype) for n in sizes]


def _torch_reference(state, optimizer_cls, **kwargs):
    params = [p.detach().clone().requires_grad_(True) for p in state.params]
    options = dict(lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                   weight_decay=HYPER["weight_decay"], **kwargs)
    return params, optimizer_cls(params, **options)


def _assert_matches_reference(actual, expected):
    # 1e-6 relative to each tensor's magnitude: elements that cancel to near zero (p - lr*sign)
    # carry the rounding of the O(1) terms they came from, so a per-element relative bound
    # would measure cancellation, not the kernel. Same ops, same order: differences are ulps.
    for a, e in zip(actual, expected):
        scale = e.abs().max().item()
        assert_close(a, e, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("sizes", [[n] for n in SIZES] + [[3, 4096, 1, 70001, 64]],
                         ids=lambda s: "x".join(map(str, s)))
def test_adamw_matches_torch_over_20_steps(device, grad_dtype, sizes):
    _needs_cuda_kernel(device)
    state = OpState(sizes, device)
    ref_params, ref = _torch_reference(state, torch.optim.AdamW, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        grads = _random_grads(sizes, device, grad_dtype, gen)
        for p, g in zip(ref_params, grads):
            p.grad = g.float()
        ref.step()
        state.step(grads)
    _assert_matches_reference(state.params, [p.detach() for p in ref_params])
    _assert_matches_reference(state.exp_avgs, [ref.state[p]["exp_avg"] for p in ref_params])
    _assert_matches_reference(state.exp_avg_sqs,
                              [ref.state[p]["exp_avg_sq"] for p in ref_params])
    assert [s.item() for s in state.steps] == [20.0] * len(sizes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("maximize", [False, True])
def test_l2_mode_matches_torch_adam(device, maximize):
    _needs_cuda_kernel(device)
    sizes = [4095, 33]
    state = OpState(sizes, device)
    ref_params, ref = _torch_reference(state, torch.optim.Adam, foreach=False, maximize=maximize)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        grads = _random_grads(sizes, device, torch.float32, gen)
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        ref.step()
        state.step(grads, decoupled_weight_decay=False, maximize=maximize)
    _assert_matches_reference(state.params, [p.detach() for p in ref_params])


@pytest.mark.parametrize("device", DEVICES)
def test_maximize_matches_torch_adamw(device):
    _needs_cuda_kernel(device)
    sizes = [1000]
    state = OpState(sizes, device)
    ref_params, ref = _torch_reference(state, torch.optim.AdamW, foreach=False, maximize=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        grads = _random_grads(sizes, device, torch.float32, gen)
        ref_params[0].grad = grads[0].clone()
        ref.step()
        state.step(grads, maximize=True)
    _assert_matches_reference(state.params, [ref_params[0].detach()])


@pytest.mark.parametrize("device", DEVICES)
def test_without_bias_correction_matches_analytic_update(device):
    _needs_cuda_kernel(device)
    n = 777
    state = OpState([n], device)
    p = state.params[0].double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(4)
    lr, b1, b2, eps, wd = (HYPER[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    for _ in range(5):
        grads = _random_grads([n], device, torch.float32, gen)
        g = grads[0].double()
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * m / (v.sqrt() + eps)
        state.step(grads, bias_correction=False)
    assert_close(state.params[0].double(), p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_beta2_one_without_bias_correction_freezes_the_second_moment(device):
    # Top-k's freeze_variance (ZeroOptimizer.freeze_variance): v stays bit for bit, m goes on,
    # and the update is lr * m / (sqrt(v) + eps).
    _needs_cuda_kernel(device)
    n = 777
    state = OpState([n], device)
    gen = torch.Generator().manual_seed(5)
    state.exp_avg_sqs[0].copy_(torch.rand(n, generator=gen).to(device) * 1e-4)
    frozen = state.exp_avg_sqs[0].clone()
    p = state.params[0].double().clone()
    m = torch.zeros_like(p)
    lr, b1, eps, wd = (HYPER[k] for k in ("lr", "beta1", "eps", "weight_decay"))
    for _ in range(4):
        grads = _random_grads([n], device, torch.float32, gen)
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * grads[0].double()
        p = p - lr * m / (frozen.double().sqrt() + eps)
        state.step(grads, beta2=1.0, bias_correction=False)
    assert torch.equal(state.exp_avg_sqs[0], frozen)
    assert_close(state.params[0].double(), p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("copy_dtype", [torch.bfloat16, torch.float16])
def test_16bit_copies_equal_cast_of_fp32_result(device, grad_dtype, copy_dtype):
    _needs_cuda_kernel(device)
    sizes = [1, 7, 4095, 65537]
    state = OpState(sizes, device, copy_dtype=copy_dtype)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        state.step(_random_grads(sizes, device, grad_dtype, gen))
        for copy, param in zip(state.copies, state.params):
            assert torch.equal(copy, param.to(copy_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_copy_may_overwrite_its_own_gradient(device, dtype):
    """Offload stages the new 16-bit weights in the gradient's buffer: the result must be the
    same as with separate buffers."""
    _needs_cuda_kernel(device)
    sizes = [1, 7, 4095, 65537]
    gen = torch.Generator().manual_seed(6)
    grads = _random_grads(sizes, device, dtype, gen)
    separate = OpState(sizes, device, copy_dtype=dtype)
    separate.step([g.clone() for g in grads])
    aliased = OpState(sizes, device, copy_dtype=dtype)
    aliased.copies = grads  # written in place of the gradients they are computed from
    aliased.step(grads)
    for a, b, p_a, p_b in zip(aliased.copies, separate.copies, aliased.params, separate.params):
        assert torch.equal(a, b) and torch.equal(p_a, p_b)


def _odd_offset_views(tensors):
    """Each tensor as a view one element into a buffer of its own: misaligned for vectors."""
    views = []
    for t in tensors:
        buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        views.append(buffer[1:].copy_(t))
    return views


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["odd-offset-views", "several-launches"])
def test_cuda_matches_the_cpu_kernel_off_the_common_path(layout):
    """Paths the other CUDA tests never take: every tensor misaligned for vector loads (the
    scalar fallback), and more tensors and chunks than one launch carries (36 tensors, 320
    blocks of 64K elements), with bf16 gradients and 16-bit copies."""
    _needs_cuda_kernel("cuda")
    sizes = [1, 7, 4095, 65537] if layout == "odd-offset-views" else [7] * 40 + [320 * 65536 + 5]
    gen = torch.Generator().manual_seed(11)
    grads = [_random_grads(sizes, "cpu", torch.bfloat16, gen) for _ in range(3)]
    states = {}
    for device in ("cpu", "cuda"):
        state = OpState(sizes, device, copy_dtype=torch.bfloat16)
        if layout == "odd-offset-views":
            state.params, state.exp_avgs, state.exp_avg_sqs, state.copies = (
                _odd_offset_views(ts) for ts in (state.params, state.exp_avgs, state.exp_avg_sqs,
                                                  state.copies))
        for step_grads in grads:
            step_grads = [g.to(device) for g in step_grads]
            state.step(_odd_offset_views(step_grads) if layout == "odd-offset-views"
                       else step_grads)
        states[device] = state
    cpu, cuda = states["cpu"], states["cuda"]
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        _assert_matches_reference([t.cpu() for t in getattr(cuda, name)], getattr(cpu, name))
    for a, b in zip(cuda.copies, cuda.params):
        assert torch.equal(a, b.to(torch.bfloat16))
    assert [s.item() for s in cuda.steps] == [3.0] * len(sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_inverse_scale_undoes_a_loss_scale(device):
    _needs_cuda_kernel(device)
    sizes = [4095, 10]
    scale = 1024.0  # a power of two: scaling and unscaling are exact
    plain, scaled = OpState(sizes, device), OpState(sizes, device)
    gen = torch.Generator().manual_seed(6)
    inv_scale = torch.tensor(1.0 / scale, device=device)
    for _ in range(5):
        grads = _random_grads(sizes, device, torch.float32, gen)
        plain.step(grads)
        scaled.step([g * scale for g in grads], inv_scale=inv_scale)
    for a, b in zip(scaled.params + scaled.exp_avg_sqs, plain.params + plain.exp_avg_sqs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_makes_the_step_a_no_op(device):
    _needs_cuda_kernel(device)
    sizes = [4095, 10]
    state = OpState(sizes, device, copy_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    state.step(_random_grads(sizes, device, torch.float32, gen))
    before = [t.clone() for t in state.params + state.exp_avgs + state.exp_avg_sqs + state.copies]
    grads = _random_grads(sizes, device, torch.float32, gen)
    grads[1][3] = float("inf")
    state.step(grads, found_inf=torch.tensor(1.0, device=device))
    after = state.params + state.exp_avgs + state.exp_avg_sqs + state.copies
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert [s.item() for s in state.steps] == [1.0, 1.0]
    # A zero flag is an ordinary step.
    state.step(_random_grads(sizes, device, torch.float32, gen),
               found_inf=torch.tensor(0.0, device=device))
    assert [s.item() for s in state.steps] == [2.0, 2.0]
    assert not torch.equal(state.params[0], before[0])


def _opcheck_samples(device):
    def sample(sizes, grad_dtype, copy_dtype=None, **kwargs):
        state = OpState(sizes, device, copy_dtype=copy_dtype)
        grads = _random_grads(sizes, device, grad_dtype, torch.Generator().manual_seed(8))
        args = (state.params, grads, state.exp_avgs, state.exp_avg_sqs, state.steps, state.copies)
        return args, {**HYPER, **kwargs}

    one = torch.tensor(1.0 / 8, device=device)
    zero = torch.tensor(0.0, device=device)
    return [
        sample([7, 4095], torch.float32),
        sample([1], torch.bfloat16, torch.bfloat16, inv_scale=one),
        sample([4095, 64], torch.float16, torch.float16, found_inf=zero, maximize=True),
        sample([33], torch.float32, torch.bfloat16, decoupled_weight_decay=False,
               bias_correction=False),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _needs_cuda_kernel(device)
    for args, kwargs in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.zero_ext.adamw_step_.default, args, kwargs)


def test_an_empty_call_is_a_no_op():
    ops.adamw_step_([], [], [], [], [], **HYPER)
    with pytest.raises(ValueError, match="expected grads to have one tensor per param"):
        ops.adamw_step_([], [torch.zeros(1)], [], [], [], **HYPER)


def test_threads_do_not_change_results():
    sizes = [2**20 + 3, 5]
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            state = OpState(sizes, "cpu")
            gen = torch.Generator().manual_seed(9)
            for _ in range(3):
                state.step(_random_grads(sizes, "cpu", torch.bfloat16, gen))
            results.append(state.params)
        finally:
            torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


_ISA_SCRIPT = """
import sys, torch, zero_ext
from zero_ext import ops
inputs = torch.load(sys.argv[1])
out = []
for case in inputs:
    params, m, v = case["params"], case["m"], case["v"]
    steps = [torch.tensor(0.0) for _ in params]
    copies = [torch.empty_like(p, dtype=torch.float16) for p in params]
    for grads in case["grads"]:
        ops.adamw_step_(params, grads, m, v, steps, copies, lr=1e-2, beta1=0.9, beta2=0.999,
                        eps=1e-8, weight_decay=0.1)
    out += params + m + v + copies
torch.save({"isa": zero_ext._C.cpu_isa_selected(), "tensors": out}, sys.argv[2])
"""


def test_every_compiled_isa_gives_identical_results(tmp_path):
    # Inputs are made here once: torch's own randn differs between instruction sets.
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 7, 4095, 65537]
    inputs = [dict(params=[torch.randn(n, generator=gen) for n in sizes],
                   m=[torch.zeros(n) for n in sizes], v=[torch.zeros(n) for n in sizes],
                   grads=[_random_grads(sizes, "cpu", dtype, gen) for _ in range(3)])
              for dtype in GRAD_DTYPES]
    runs = run_under_each_isa(_ISA_SCRIPT, inputs, tmp_path)
    baseline = runs.pop("DEFAULT")["tensors"]
    for isa, run in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(run["tensors"], baseline)), isa


def _bad_call(**overrides):
    """A valid two-tensor call with one argument replaced."""
    args = dict(
        params=[torch.zeros(4), torch.zeros(2, 3)],
        grads=[torch.zeros(4), torch.zeros(2, 3)],
        exp_avgs=[torch.zeros(4), torch.zeros(2, 3)],
        exp_avg_sqs=[torch.zeros(4), torch.zeros(2, 3)],
        state_steps=[torch.tensor(0.0), torch.tensor(0.0)],
        params_16bit=[],
    )
    kwargs = dict(HYPER)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    ops.adamw_step_(*args.values(), **kwargs)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(grads=[torch.zeros(4)]), ValueError,
     "expected grads to have one tensor per param (2), got 1"),
    (dict(params_16bit=[torch.zeros(4, dtype=torch.bfloat16)]), ValueError,
     "expected params_16bit to be empty or to have one tensor per param (2), got 1"),
    (dict(grads=[torch.zeros(4), torch.zeros(3, 2)]), ValueError,
     "expected grads[1] to have the shape of params[1] [2, 3], got [3, 2]"),
    (dict(exp_avgs=[torch.zeros(4), torch.zeros(3, 2).t()]), ValueError,
     "expected exp_avgs[1] to be contiguous"),
    (dict(params=[torch.zeros(4, dtype=torch.float64), torch.zeros(2, 3)]), TypeError,
     "expected params[0] to be Float (the fp32 master weights), got Double"),
    (dict(grads=[torch.zeros(4, dtype=torch.int32), torch.zeros(2, 3)]), TypeError,
     "expected grads of dtype Float, BFloat16 or Half, got Int"),
    (dict(grads=[torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2, 3)]), TypeError,
     "expected grads[1] to be BFloat16 (one grad dtype per call, that of grads[0]), got Float"),
    (dict(exp_avg_sqs=[torch.zeros(4), torch.zeros(2, 3, dtype=torch.bfloat16)]), TypeError,
     "expected exp_avg_sqs[1] to be Float (optimizer state is fp32), got BFloat16"),
    (dict(params_16bit=[torch.zeros(4), torch.zeros(2, 3)]), TypeError,
     "expected params_16bit of dtype BFloat16 or Half, got Float"),
    (dict(state_steps=[torch.tensor(0.0), torch.zeros(2)]), ValueError,
     "expected state_steps[1] to be a one-element tensor on the CPU"),
    (dict(state_steps=[torch.tensor(0.0), torch.tensor(0, dtype=torch.int64)]), TypeError,
     "expected state_steps[1] to be Float"),
    (dict(inv_scale=torch.ones(2)), ValueError, "expected inv_scale to have one element, got 2"),
    (dict(found_inf=torch.tensor(0, dtype=torch.int32)), TypeError,
     "expected found_inf to be Float, got Int"),
    (dict(beta1=1.0), ValueError, "expected 0 <= beta1 < 1, got 1"),
    (dict(beta2=1.0), ValueError, "(or beta2 = 1, a frozen second moment, with "
     "bias_correction=False), got 1 with bias_correction=True"),
    (dict(lr=-1.0), ValueError, "expected lr >= 0, got -1"),
    (dict(eps=-1e-8), ValueError, "expected eps >= 0"),
    (dict(weight_decay=-0.1), ValueError, "expected weight_decay >= 0"),
])
def test_bad_input_raises_a_clear_error(overrides, error, message):
    with pytest.raises(error) as info:
        _bad_call(**overrides)
    text = str(info.value)
    assert text.startswith("zero_ext::adamw_step_: "), text
    assert message in text, text
    assert "CUDA" not in text or zero_ext._C.cuda_archs_built() is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mixed_devices_raise():
    _needs_cuda_kernel("cuda")
    with pytest.raises(ValueError, match=r"expected every tensor on params\[0\]'s device "
                       r"\(cuda:0\), got cpu for grads\[1\]"):
        _bad_call(params=[torch.zeros(4, device="cuda"), torch.zeros(2, 3, device="cuda")],
                  exp_avgs=[torch.zeros(4, device="cuda"), torch.zeros(2, 3, device="cuda")],
                  exp_avg_sqs=[torch.zeros(4, device="cuda"), torch.zeros(2, 3, device="cuda")],
                  grads=[torch.zeros(4, device="cuda"), torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"expected state_steps\[0\] to be a one-element "
                       r"tensor on the CPU"):
        _bad_call(params=[torch.zeros(4, device="cuda"), torch.zeros(2, 3, device="cuda")],
                  exp_avgs=[torch.zeros(4, device="cuda"), torch.zeros(2, 3, device="cuda")],
                  exp_avg_sqs=[torch.zeros(4, device="cuda"), torch.zeros(2, 3, device="cuda")],
                  grads=[torch.zeros(4, device="cuda"), torch.zeros(2, 3, device="cuda")],
                  state_steps=[torch.tensor(0.0, device="cuda"), torch.tensor(0.0)])
