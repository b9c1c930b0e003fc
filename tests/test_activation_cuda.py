"""The CUDA kernels of zero_ext.fused.swiglu / bias_gelu (csrc/activation_cuda.cu) against eager
on the GPU, forward and gradients, as tests/test_fused_norm.py checks the CPU kernels: fp32 to
1e-5 and bf16 within a step of eager's bf16 error; shapes that take the vector path (16-byte
accesses) and ones that take the scalar path (odd widths). Skipped without a GPU.
"""

import pytest
import torch
from test_fused_norm import (
    ACTIVATIONS,
    FP32,
    _activation,
    _activation_eager,
    _activation_inputs,
    _activation_run,
    _assert_bf16_parity,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(33, 17), (7, 4096), (2048, 1024)], ids=str)
def test_cuda_activation_matches_eager(shape, kind, dtype):
    import zero_ext

    if zero_ext._C.cuda_archs_built() is None:
        pytest.fail("a GPU is present but zero_ext was built without its CUDA kernels; "
                    "rebuild with ZERO_EXT_CUDA=1")
    rows, h = shape
    inputs = [t.cuda() if t is not None else None
              for t in _activation_inputs(kind, rows, h, dtype, seed=rows + h)]
    grad = torch.randn(rows, h, device="cuda")
    got = _activation_run(lambda x, y: _activation(kind, x, y), inputs, grad)
    want = _activation_run(lambda x, y: _activation_eager(kind, x, y), inputs, grad)
    exact = None
    if dtype == torch.bfloat16:
        upcast = [t.float() if t is not None else None for t in inputs]
        exact = _activation_run(lambda x, y: _activation_eager(kind, x, y, round_sum=True),
                                upcast, grad)
    for i, (name, a, e) in enumerate(zip(["out", "grad a", "grad b"], got, want)):
        assert (a is None) == (e is None), name
        if e is None:
            continue
        assert a.is_cuda and a.dtype == e.dtype and a.shape == e.shape, name
        if exact is None:
            torch.testing.assert_close(a, e, **FP32, msg=lambda m, name=name: f"{name}: {m}")
        else:
            _assert_bf16_parity(a, e, exact[i], name)


def test_cuda_activation_rejects_double():
    x = torch.randn(4, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match=r"zero_ext::swiglu: Double runs on the CPU only"):
        torch.ops.zero_ext.swiglu(x, x)
