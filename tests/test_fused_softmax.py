"""zero_ext.fused.scaled_masked_softmax (zero_ext::scaled_masked_softmax and its backward) and
the zero_ext_eager attention against eager PyTorch.

The reference is written here: ``softmax(scale * x + mask)`` with a bool mask turned into -inf
and causal as SDPA's ``is_causal``, then dropout as ``keep / (1 - p)`` with the op's own
keep-mask (zero_ext::dropout_keep_mask), differentiated by autograd. Checked: forward and the
gradients of x and of an additive mask in fp32 to 1e-5 over odd shapes, bf16 / fp16 against eager,
gradcheck in fp64 with dropout, opcheck, a torch.compile trace, the Philox generator against its
published known-answer vector and a Python transcription, keep-mask statistics, seed
reproducibility, what autograd saves, the argument errors, and a tiny GPT-2 / Llama trained
through transformers' attention interface against their own eager attention.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_fused_norm import _assert_bf16_parity
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from zero_ext.fused.softmax import dropout_keep_mask, dropout_seed, scaled_masked_softmax

FP32 = {"atol": 1e-5, "rtol": 1e-5}
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 33, 33), (2, 1, 4, 100)]
MASKS = ["none", "additive", "bool", "causal"]


def _rand(*shape, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _mask(kind, shape, dtype, seed=1):
    """A mask of the given kind broadcast over heads ([b, 1, q, k]) with some keys masked."""
    b, _, q, k = shape
    if kind == "additive":
        m = _rand(b, 1, q, k, seed=seed)
        m[torch.rand(b, 1, q, k, generator=torch.Generator().manual_seed(seed)) < 0.3] = -math.inf
        return m.to(dtype)
    if kind == "bool":
        return torch.rand(b, 1, q, k, generator=torch.Generator().manual_seed(seed)) > 0.3
    return None


def _reference(x, mask, scale, causal, keep=None, p=0.0):
    """Eager softmax + dropout in x's dtype math; fully masked rows as zeros."""
    z = x * scale
    if mask is not None:
        z = z + (torch.zeros_like(z).masked_fill(~mask, -math.inf) if mask.dtype == torch.bool
                 else mask)
    if causal:
        q, k = x.shape[-2:]
        z = z.masked_fill(torch.ones(q, k, dtype=torch.bool).triu(1), -math.inf)
    dead = torch.isinf(z).all(-1, keepdim=True)  # softmax would give NaN (and NaN gradients)
    s = torch.softmax(z.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return s if keep is None else s * keep / (1 - p)


def _fused_and_reference(shape, kind, dtype, p, *, seed=0):
    """(ours, reference) outputs and gradients of x (and of an additive mask) for one case."""
    x = _rand(*shape, dtype=dtype, seed=seed)
    mask = _mask(kind, shape, dtype)
    causal = kind == "causal"
    grad = _rand(*shape, dtype=dtype, seed=seed + 7, scale=1.0)
    keep = dropout_keep_mask(x, p, dropout_seed(torch.Generator().manual_seed(seed)))
    results = []
    for fn in (
        lambda x, m: scaled_masked_softmax(x, m, scale=0.3, causal=causal, dropout_p=p,
                                           generator=torch.Generator().manual_seed(seed)),
        lambda x, m: _reference(x, m, 0.3, causal, keep if p > 0 else None, p),
    ):
        xx = x.clone().requires_grad_()
        mm = mask.clone().requires_grad_() if kind == "additive" else mask
        out = fn(xx, mm)
        out.backward(grad)
        results.append([out.detach(), xx.grad] + ([mm.grad] if kind == "additive" else []))
    return results


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_eager_fp32(shape, kind, p):
    got, want = _fused_and_reference(shape, kind, torch.float32, p)
    for name, a, e in zip(["out", "grad x", "grad mask"], got, want):
        torch.testing.assert_close(a, e, **FP32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", MASKS)
def test_matches_eager_16bit(kind, dtype):
    """As close to the fp32 result on the 16-bit inputs as eager in that dtype, within a step."""
    shape = (2, 3, 17, 40)
    got, eager = _fused_and_reference(shape, kind, dtype, 0.0)
    x = _rand(*shape, dtype=dtype).float().requires_grad_()
    mask = _mask(kind, shape, dtype)
    exact_out = _reference(x, None if mask is None else
                           (mask if mask.dtype == torch.bool else mask.float()), 0.3,
                           kind == "causal")
    exact_out.backward(_rand(*shape, dtype=dtype, seed=7, scale=1.0).float())
    for name, a, e, exact in zip(["out", "grad x"], got, eager, [exact_out.detach(), x.grad]):
        assert a.dtype == dtype
        _assert_bf16_parity(a, e, exact, name)


def test_fully_masked_rows_are_zero():
    x = _rand(2, 4, 6)
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[0, 1] = False
    xx = x.clone().requires_grad_()
    out = scaled_masked_softmax(xx, mask, dropout_p=0.2)
    out.backward(torch.ones_like(out))
    assert out[0, 1].eq(0).all() and xx.grad[0, 1].eq(0).all()
    assert torch.isfinite(out).all() and torch.isfinite(xx.grad).all()
    additive = torch.zeros(2, 4, 6).masked_fill(~mask, -math.inf)
    assert scaled_masked_softmax(x, additive)[0, 1].eq(0).all()


def test_gradcheck_fp64_with_dropout():
    x = _rand(2, 2, 5, 9, dtype=torch.float64).requires_grad_()
    mask = _rand(2, 1, 1, 9, dtype=torch.float64, seed=3).requires_grad_()

    def fn(x, mask, causal):
        return scaled_masked_softmax(x, mask, scale=0.7, causal=causal, dropout_p=0.4,
                                     generator=torch.Generator().manual_seed(11))

    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda x, m, c=causal: fn(x, m, c), (x, mask))


def test_second_derivatives_without_dropout_and_refused_with_it():
    x = _rand(2, 4, 5, dtype=torch.float64).requires_grad_()
    mask = _rand(1, 1, 5, dtype=torch.float64, seed=3).requires_grad_()
    for causal in (False, True):
        assert torch.autograd.gradgradcheck(
            lambda x, m, c=causal: scaled_masked_softmax(x, m, scale=0.7, causal=c), (x, mask))
    out = scaled_masked_softmax(x, mask, dropout_p=0.4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="double backward .create_graph=True. with dropout"):
        torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)


def _op_samples():
    seed = torch.tensor([123456789], dtype=torch.int64)
    for dtype in (torch.float32, torch.bfloat16):
        x = _rand(2, 3, 5, 19, dtype=dtype).requires_grad_()
        for mask, causal, p in [(None, False, 0.0), (_mask("bool", (2, 3, 5, 19), dtype), True,
                                                      0.25),
                                (_mask("additive", (2, 3, 5, 19), dtype), False, 0.5)]:
            yield x, mask, 0.5, causal, p, seed


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    args = list(_op_samples())[index]
    opcheck(torch.ops.zero_ext.scaled_masked_softmax.default, args)
    x, _, scale, _, p, seed = args
    with torch.no_grad():
        out, probs = torch.ops.zero_ext.scaled_masked_softmax(*args)
    saved = probs if p > 0 else out
    opcheck(torch.ops.zero_ext.scaled_masked_softmax_backward.default,
            (torch.randn_like(saved), saved, scale, p, seed))
    opcheck(torch.ops.zero_ext.dropout_keep_mask.default, (x.detach(), p, seed))


def test_compile_traces_one_graph():
    x = _rand(2, 3, 8, 8)
    mask = _mask("additive", (2, 3, 8, 8), torch.float32)

    def block(x, mask, p):
        return (scaled_masked_softmax(x, mask, scale=0.5, causal=True, dropout_p=p) * x).sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    loss = compiled(leaves[0], mask, 0.0)
    want = (_reference(leaves[1], mask, 0.5, True) * leaves[1]).sum()
    torch.testing.assert_close(loss, want, **FP32)
    torch.testing.assert_close(*(torch.autograd.grad(v, t)[0] for v, t in zip((loss, want),
                                                                               leaves)), **FP32)
    # With dropout the seed is drawn inside the graph: one trace, finite gradients.
    dropped = leaves[0].detach().clone().requires_grad_()
    compiled(dropped, mask, 0.5).backward()
    assert torch.isfinite(dropped.grad).all()


def _philox_reference(counter, key):
    """Philox4x32-10 transcribed from Random123 (philox.h), in Python integers."""
    mask = 0xFFFFFFFF
    c = [counter & mask, counter >> 32, 0, 0]
    k = [key & mask, key >> 32]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & mask, (p0 >> 32) ^ c[3] ^ k[1], p0 & mask]
        k = [(k[0] + 0x9E3779B9) & mask, (k[1] + 0xBB67AE85) & mask]
    return c


def test_philox_known_answer_and_reference():
    # Random123's known-answer vector for counter 0, key 0 (kat_vectors: philox4x32 10).
    words = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _philox_reference(0, 0) == words
    zero = torch.zeros(1, dtype=torch.int64)
    for p in (0.5, 0.7):
        keep = dropout_keep_mask(torch.empty(4), p, zero).tolist()
        assert keep == [w >= int(p * 2 ** 32) for w in words]
    key = 0x0123456789ABCDEF
    n, p = 4 * 37, 0.3
    keep = dropout_keep_mask(torch.empty(n), p, torch.tensor([key])).tolist()
    want = [_philox_reference(i // 4, key)[i % 4] >= int(p * 2 ** 32) for i in range(n)]
    assert keep == want


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_and_independence(p):
    n = 1 << 20
    keep = dropout_keep_mask(torch.empty(n), p, dropout_seed(torch.Generator().manual_seed(5)))
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Each of the four words of a Philox call, and neighbouring elements, are independent.
    lanes = keep.view(-1, 4).float()
    assert (lanes.mean(0) - (1 - p)).abs().max().item() < 5 * 2 * sigma
    both = (keep[:-1] & keep[1:]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / n)


def test_same_seed_same_output_and_new_seed_each_call():
    x = _rand(4, 16, 64)
    torch.manual_seed(0)
    first = scaled_masked_softmax(x, dropout_p=0.5)
    second = scaled_masked_softmax(x, dropout_p=0.5)
    torch.manual_seed(0)
    again = scaled_masked_softmax(x, dropout_p=0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first.eq(0), second.eq(0))
    # Not training, or p = 0: no dropout, and no draw from the generator.
    state = torch.get_rng_state()
    torch.testing.assert_close(scaled_masked_softmax(x, dropout_p=0.5, training=False),
                               torch.softmax(x, -1), **FP32)
    assert torch.equal(state, torch.get_rng_state())


class _OpLog(TorchDispatchMode):
    """Records the aten / zero_ext ops that run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_autograd_saves_the_softmax_only():
    """Eager softmax + dropout saves the softmax output and a mask; the op saves the former."""
    x = _rand(2, 4, 64, 64).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = scaled_masked_softmax(x, dropout_p=0.1)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].dtype == x.dtype
    # The backward is the one kernel: no zero-filled gradient for the internal probs output.
    with _OpLog() as log:
        out.backward(torch.ones_like(out))
    assert [f for f in log.ops if "softmax" in str(f) or "zero" in str(f) or "fill" in str(f)] \
        == [torch.ops.zero_ext.scaled_masked_softmax_backward.default], log.ops
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.dropout(torch.softmax(x, -1), 0.1)
    assert len([t for t in saved if t.numel() == x.numel()]) == 2


def test_bad_arguments():
    x = _rand(2, 3, 4)
    with pytest.raises(TypeError, match=r"zero_ext::scaled_masked_softmax: expected mask to be "
                                         r"Bool \(True = attend\) or Float"):
        scaled_masked_softmax(x, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected mask broadcastable to x's shape"):
        scaled_masked_softmax(x, torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"expected dropout_p in \[0, 1\], got 1.5"):
        scaled_masked_softmax(x, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"causal needs x of at least 2 dimensions"):
        scaled_masked_softmax(torch.randn(5), causal=True)
    with pytest.raises(TypeError, match=r"expected x to be Float, BFloat16, Half or Double"):
        scaled_masked_softmax(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected seed to be a CPU int64 tensor of one element"):
        torch.ops.zero_ext.scaled_masked_softmax(x, None, 1.0, False, 0.1, torch.zeros(2))
    with pytest.raises(ValueError, match=r"_backward: expected grad_out contiguous of probs'"):
        torch.ops.zero_ext.scaled_masked_softmax_backward(
            torch.ones(3), x, 1.0, 0.0, torch.zeros(1, dtype=torch.int64))


def _tiny_model(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
            eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_implementation="eager")
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=16,
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_model_matches_eager(kind):
    import copy

    from zero_ext.fused.attention import use_fused_softmax

    eager = _tiny_model(kind)
    fused = copy.deepcopy(eager)
    assert use_fused_softmax(fused) == 2 and use_fused_softmax(fused) == 2
    assert fused.config._attn_implementation == "zero_ext_eager"
    assert eager.config._attn_implementation == "eager"
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding: masked keys
    outs = []
    for model in (eager, fused):
        out = model(ids, attention_mask=attention_mask, labels=ids)
        out.loss.backward()
        outs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], **FP32)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, **FP32,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_under_autocast_the_attention_runs_eagers_own_steps():
    # The scores come in bf16 from autocast's matmul while the query stays fp32: the fused op
    # (no autocast rule) is not called, and the model matches eager attention under autocast.
    import copy

    from zero_ext.fused.attention import use_fused_softmax

    eager = _tiny_model("llama")
    fused = copy.deepcopy(eager)
    assert use_fused_softmax(fused) == 2
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, :3] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = eager(ids, attention_mask=attention_mask).logits
        got = fused(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_sdpa_model_is_left_alone():
    from zero_ext.fused.attention import use_fused_softmax

    model = _tiny_model("llama")
    model.set_attn_implementation("sdpa")
    assert use_fused_softmax(model) == 0
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", [(2, 3, 37, 300), (1, 2, 3, 9000)], ids=["staged", "long"])
def test_cuda_matches_cpu(shape, kind, dtype):
    """The CUDA kernels draw the CPU kernels' keep-mask and compute the same values, for rows
    staged in shared memory and rows too long for it."""
    import zero_ext

    if zero_ext._C.cuda_archs_built() is None:
        pytest.fail("a GPU is present but zero_ext was built without its CUDA kernels; "
                    "rebuild with ZERO_EXT_CUDA=1")
    x = _rand(*shape, dtype=dtype)
    mask = _mask(kind, shape, dtype)
    grad = _rand(*shape, dtype=dtype, seed=7, scale=1.0)
    results = []
    for device in ("cpu", "cuda"):
        xx = x.to(device).requires_grad_()
        out = scaled_masked_softmax(xx, None if mask is None else mask.to(device), scale=0.3,
                                    causal=kind == "causal", dropout_p=0.2,
                                    generator=torch.Generator().manual_seed(3))
        out.backward(grad.to(device))
        results.append([out.detach().cpu(), xx.grad.cpu()])
    tol = FP32 if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for a, e in zip(results[1], results[0]):
        torch.testing.assert_close(a, e, **tol)
    assert torch.equal(results[1][0].eq(0), results[0][0].eq(0))
