"""zero_ext.fused.rms_norm / layer_norm (zero_ext::fused_norm and its backward) and swiglu /
bias_gelu against eager.

The reference is eager PyTorch written here: ``h = x + residual`` then ``F.rms_norm`` /
``F.layer_norm`` with weight (and bias), differentiated by autograd through both h and the
normalized output. Checked: forward and every gradient (x, residual, weight, bias) in fp32 to
1e-5 and in bf16 against eager bf16 over odd shapes, gradcheck in fp64, opcheck (schema, fake
kernel, autograd registration), a torch.compile trace, and the argument errors. SwiGLU and
bias + GeLU (tanh and erf) likewise against ``F.silu(gate) * up`` and ``F.gelu(x + b)``, and
their autograd saves the inputs only (the backward recomputes the activation).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from zero_ext.fused import bias_gelu, layer_norm, rms_norm, swiglu

ROWS = [1, 7, 33]
HIDDEN = [3, 17, 1024, 4097]
KINDS = ["rms", "layer"]
FP32 = {"atol": 1e-5, "rtol": 1e-5}


def _inputs(kind, rows, h, dtype, *, residual, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    x = rand(rows, h, scale=2.0, shift=0.5)  # off-centre rows: the LayerNorm mean matters
    w = rand(h, scale=0.5, shift=1.0)
    b = rand(h, scale=0.5) if kind == "layer" else None
    r = rand(rows, h) if residual else None
    return x, r, w, b


def _fused(kind, x, r, w, b, eps):
    if kind == "rms":
        return rms_norm(x, w, eps, residual=r)
    return layer_norm(x, w, b, eps, residual=r)


def _eager(kind, x, r, w, b, eps):
    h = x if r is None else x + r
    if kind == "rms":
        out = F.rms_norm(h, (h.shape[-1],), w, eps)
    else:
        out = F.layer_norm(h, (h.shape[-1],), w, b, eps)
    return out if r is None else (out, h)


def _eager_bf16_sum(kind, x, r, w, b, eps):
    """Eager on fp32 copies of bf16 inputs, with x + residual rounded to bf16 as both bf16 runs
    round it: the exact result the bf16 runs approximate."""
    if r is None:
        return _eager(kind, x, r, w, b, eps)
    h = (x + r).bfloat16().float()
    return _eager(kind, h, None, w, b, eps), h


def _run(fn, kind, inputs, grads, eps=1e-5):
    """Outputs then input gradients of fn, backpropagating `grads` through every output."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(kind, *leaves, eps)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(outs[0].dtype) for g in grads[: len(outs)]])
    return [o.detach() for o in outs] + [t.grad if t is not None else None for t in leaves]


def _assert_bf16_parity(got, eager, exact, name):
    """got (ours, bf16) is as close to the fp32 result as eager bf16 is, within one bf16 step.

    Eager bf16 rounds in other places (its own reductions), so the two bf16 results can differ
    by a step or more at ties; both are measured against the fp32 reference instead.
    """
    eager_error = (eager.float() - exact).abs().max().item()
    step = 2 ** -8 * max(exact.abs().max().item(), 1e-3)
    torch.testing.assert_close(got.float(), exact, atol=eager_error + step, rtol=2 ** -8,
                               msg=lambda m: f"{name} (eager bf16 error {eager_error}): {m}")


def _assert_results_match(names, got, want, exact):
    """Each named result (None where the op has none) of ours against eager's: fp32 to 1e-5, or,
    given the fp32 results `exact` of bf16 inputs, bf16 parity against them."""
    for i, (name, a, e) in enumerate(zip(names, got, want)):
        assert (a is None) == (e is None), name
        if e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, name
        if exact is None:
            torch.testing.assert_close(a, e, **FP32, msg=lambda m, name=name: f"{name}: {m}")
        else:
            _assert_bf16_parity(a, e, exact[i], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_eager(rows, h, kind, residual, dtype):
    x, r, w, b = _inputs(kind, rows, h, dtype, residual=residual, seed=rows * 10007 + h)
    g = torch.Generator().manual_seed(h)
    grads = [torch.randn(rows, h, generator=g) for _ in range(2)]
    got = _run(_fused, kind, (x, r, w, b), grads)
    want = _run(_eager, kind, (x, r, w, b), grads)
    exact = None
    if dtype == torch.bfloat16:
        upcast = [t.float() if t is not None else None for t in (x, r, w, b)]
        exact = _run(_eager_bf16_sum, kind, upcast, grads)
    outs = ["out", "summed"] if residual else ["out"]
    names = outs + ["grad x", "grad residual", "grad weight", "grad bias"]
    assert len(got) == len(names)
    _assert_results_match(names, got, want, exact)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fp64(kind, residual):
    x, r, w, b = _inputs(kind, 3, 5, torch.float64, residual=residual)
    leaves = [t.requires_grad_() for t in (x, r, w, b) if t is not None]

    def fn(*args):
        it = iter(args)
        xx = next(it)
        rr = next(it) if residual else None
        ww = next(it)
        bb = next(it) if kind == "layer" else None
        return _fused(kind, xx, rr, ww, bb, 1e-5)

    assert torch.autograd.gradcheck(fn, leaves)
    # create_graph=True: second derivatives too (a backward kernel without autograd of its own
    # gave zeros, silently)
    assert torch.autograd.gradgradcheck(fn, leaves)


def test_3d_input_and_eps():
    x, r, w, _ = _inputs("rms", 10, 40, torch.float32, residual=True)
    x, r = x.view(2, 5, 40), r.view(2, 5, 40)
    out, summed = rms_norm(x, w, 1e-2, residual=r)
    want_out, want_summed = _eager("rms", x, r, w, None, 1e-2)
    torch.testing.assert_close(out, want_out, **FP32)
    torch.testing.assert_close(summed, want_summed, atol=0, rtol=0)


def _op_sample(index):
    dtype = (torch.float32, torch.bfloat16)[index // 4]
    kind = KINDS[index // 2 % 2]
    x, r, w, b = _inputs(kind, 7, 33, dtype, residual=bool(index % 2))
    args = [t.requires_grad_() if t is not None else None for t in (x, r, w, b)]
    return (*args, 1e-5, kind == "rms")


@pytest.mark.parametrize("index", range(8))
def test_opcheck(index):
    args = _op_sample(index)
    opcheck(torch.ops.zero_ext.fused_norm.default, args)
    x, r, w, b, eps, rms = args
    with torch.no_grad():
        out, summed, mean, rstd = torch.ops.zero_ext.fused_norm(x, r, w, b, eps, rms)
    normalized = summed if r is not None else x.detach()
    grad = torch.randn_like(out)
    opcheck(torch.ops.zero_ext.fused_norm_backward.default,
            (grad, grad if r is not None else None, normalized, w.detach(), mean, rstd, rms,
             b is not None))


def test_compile_traces_one_graph():
    x, r, w, _ = _inputs("rms", 7, 64, torch.float32, residual=True)

    def block(x, r, w):
        out, summed = rms_norm(x, w, 1e-6, residual=r)
        return (out * summed).sum()

    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    loss = torch.compile(block, backend="aot_eager", fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager_leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    out, h = _eager("rms", eager_leaves[0], eager_leaves[1], eager_leaves[2], None, 1e-6)
    want_loss = (out * h).sum()
    want = torch.autograd.grad(want_loss, eager_leaves)
    torch.testing.assert_close(loss, want_loss, **FP32)
    for a, e in zip(grads, want):
        torch.testing.assert_close(a, e, **FP32)


def test_argument_errors():
    x = torch.randn(4, 8)
    w = torch.ones(8)
    with pytest.raises(TypeError, match=r"zero_ext::fused_norm: expected weight to be Float"):
        rms_norm(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"zero_ext::fused_norm: expected weight to be 1-D"):
        rms_norm(x, torch.ones(9))
    with pytest.raises(ValueError, match=r"expected residual to have the shape of x"):
        layer_norm(x, w, residual=torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"RMSNorm takes no bias"):
        torch.ops.zero_ext.fused_norm(x, None, w, w, 1e-5, True)
    with pytest.raises(ValueError, match=r"expected eps > 0"):
        layer_norm(x, w, eps=0.0)
    with pytest.raises(TypeError, match=r"expected x to be Float, BFloat16, Half or Double"):
        rms_norm(x.int(), w)


# ---------------------------------------------------------------------------------------------
# SwiGLU and bias + GeLU

ACTIVATIONS = ["swiglu", "gelu", "gelu_tanh", "gelu_nobias"]


def _activation_inputs(kind, rows, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(rows, h, generator=g, dtype=torch.float64) * 3).to(dtype)
    if kind == "swiglu":
        b = torch.randn(rows, h, generator=g, dtype=torch.float64).to(dtype)
    elif kind == "gelu_nobias":
        b = None
    else:
        b = torch.randn(h, generator=g, dtype=torch.float64).to(dtype)
    return a, b


def _activation(kind, a, b):
    if kind == "swiglu":
        return swiglu(a, b)
    return bias_gelu(a, b, "tanh" if kind == "gelu_tanh" else "none")


def _activation_eager(kind, a, b, *, round_sum=False):
    if kind == "swiglu":
        return F.silu(a) * b
    v = a if b is None else a + b
    if round_sum:  # the fp32 reference of a bf16 run: x + bias held in bf16, as both runs hold it
        v = v.bfloat16().float()
    return F.gelu(v, approximate="tanh" if kind == "gelu_tanh" else "none")


def _activation_run(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_activation_matches_eager(rows, h, kind, dtype):
    a, b = _activation_inputs(kind, rows, h, dtype, seed=rows * 31 + h)
    grad = torch.randn(rows, h, generator=torch.Generator().manual_seed(h))
    got = _activation_run(lambda x, y: _activation(kind, x, y), (a, b), grad)
    want = _activation_run(lambda x, y: _activation_eager(kind, x, y), (a, b), grad)
    exact = None
    if dtype == torch.bfloat16:
        upcast = [t.float() if t is not None else None for t in (a, b)]
        exact = _activation_run(lambda x, y: _activation_eager(kind, x, y, round_sum=True),
                                upcast, grad)
    _assert_results_match(["out", "grad a", "grad b"], got, want, exact)


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activation_gradcheck_fp64(kind):
    a, b = _activation_inputs(kind, 3, 37, torch.float64)
    leaves = [t.requires_grad_() for t in (a, b) if t is not None]
    fn = (lambda x: _activation(kind, x, None)) if b is None else \
        (lambda x, y: _activation(kind, x, y))
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activation_saves_inputs_only(kind):
    """Autograd keeps the op's inputs (already alive in a model) and nothing activation-sized."""
    a, b = _activation_inputs(kind, 8, 64, torch.float32)
    leaves = [t.requires_grad_() if t is not None else None for t in (a, b)]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _activation(kind, *leaves)
    inputs = {t.data_ptr() for t in leaves if t is not None}
    assert saved and all(t.data_ptr() in inputs for t in saved), [t.shape for t in saved]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_activation_opcheck(kind, dtype):
    a, b = _activation_inputs(kind, 5, 33, dtype)
    a.requires_grad_()
    if b is not None:
        b.requires_grad_()
    grad = torch.randn(5, 33).to(dtype)
    if kind == "swiglu":
        opcheck(torch.ops.zero_ext.swiglu.default, (a, b))
        opcheck(torch.ops.zero_ext.swiglu_backward.default, (grad, a.detach(), b.detach()))
    else:
        approximate = "tanh" if kind == "gelu_tanh" else "none"
        bias = None if b is None else b.detach()
        opcheck(torch.ops.zero_ext.bias_gelu.default, (a, b, approximate))
        opcheck(torch.ops.zero_ext.bias_gelu_backward.default,
                (grad, a.detach(), bias, approximate))


def test_activation_argument_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"zero_ext::swiglu: expected up to have the shape"):
        swiglu(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match=r"zero_ext::swiglu: expected up to be Float"):
        swiglu(x, x.bfloat16())
    with pytest.raises(ValueError, match=r"zero_ext::bias_gelu: expected approximate to be"):
        bias_gelu(x, None, "erf")
    with pytest.raises(ValueError, match=r"zero_ext::bias_gelu: expected bias to be 1-D"):
        bias_gelu(x, torch.randn(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("h", HIDDEN)
@pytest.mark.parametrize("rows", [33, 3000])
def test_cuda_matches_eager(rows, h, kind, residual, dtype):
    """The CUDA kernels (csrc/norm_cuda.cu) against eager on the GPU, as the CPU ones are; at
    3000 rows the parameter gradients are summed in several row chunks."""
    import zero_ext

    if zero_ext._C.cuda_archs_built() is None:
        pytest.fail("a GPU is present but zero_ext was built without its CUDA kernels; "
                    "rebuild with ZERO_EXT_CUDA=1")
    inputs = [t.cuda() if t is not None else None
              for t in _inputs(kind, rows, h, dtype, residual=residual, seed=h)]
    grads = [torch.randn(rows, h, device="cuda") for _ in range(2)]
    got = _run(_fused, kind, inputs, grads)
    want = _run(_eager, kind, inputs, grads)
    exact = None
    if dtype == torch.bfloat16:
        exact = _run(_eager_bf16_sum, kind, [t.float() if t is not None else None
                                             for t in inputs], grads)
    for i, (a, e) in enumerate(zip(got, want)):
        if e is None:
            assert a is None
        elif exact is None:
            torch.testing.assert_close(a, e, **FP32)
        else:
            _assert_bf16_parity(a, e, exact[i], f"output {i}")
