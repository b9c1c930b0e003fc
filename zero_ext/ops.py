"""Typed wrappers of the torch.ops.zero_ext.* operators, with their fake kernels.

Callers (zero_ext.optim, the ZeRO optimizer, CPU offload) use these functions rather than
torch.ops directly. Each op's schema lives in csrc/ops.cpp; the fake kernels here let
torch.compile and torch.library.opcheck trace through the ops without running them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "adamw_step_",
    "dequantize_",
    "dequantize_sum_",
    "flatten_into_",
    "quantize_chunks",
    "quantized_row_bytes",
    "topk_feedback_select",
    "unflatten_from",
]


def adamw_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    params_16bit: Sequence[Tensor] = (),
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool = True,
    bias_correction: bool = True,
    maximize: bool = False,
    inv_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One AdamW (or, with ``decoupled_weight_decay=False``, Adam-with-L2) step, in place.

    For each i: fp32 ``params[i]``, ``exp_avgs[i]`` and ``exp_avg_sqs[i]`` are updated from
    ``grads[i]`` (fp32, bf16 or fp16, one dtype per call) in a single pass, and the one-element
    fp32 CPU tensor ``state_steps[i]`` is incremented first and used for bias correction, as
    ``torch.optim.AdamW`` does. When ``params_16bit`` is given (one bf16 or fp16 tensor per
    param), it receives the updated weights rounded to 16 bits in the same pass.

    ``inv_scale`` (one-element fp32 on the params' device) multiplies every gradient, undoing a
    loss scale; a nonzero ``found_inf`` makes the call a no-op, steps included.
    """
    if not (params or grads or exp_avgs or exp_avg_sqs or state_steps or params_16bit):
        return  # nothing to update, and no tensor for the dispatcher to pick a backend by
    torch.ops.zero_ext.adamw_step_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(state_steps),
        list(params_16bit), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
        bias_correction=bias_correction, maximize=maximize, inv_scale=inv_scale,
        found_inf=found_inf)


@torch.library.register_fake("zero_ext::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, params_16bit, *, lr,
                     beta1, beta2, eps, weight_decay, decoupled_weight_decay=True,
                     bias_correction=True, maximize=False, inv_scale=None, found_inf=None):
    # Mutates its inputs in place and returns nothing: no outputs to describe.
    return None


def flatten_into_(
    flat: Tensor,
    tensors: Sequence[Tensor],
    offsets: Sequence[int],
    *,
    scale: float = 1.0,
    accumulate: bool = False,
) -> None:
    """Copies every tensor into its range of a flat buffer, in one pass, in place.

    For each i, ``flat[offsets[i] : offsets[i] + tensors[i].numel()]`` becomes
    ``tensors[i].flatten() * scale`` (or, with ``accumulate``, that slice plus it), computed in
    fp32 and rounded to nearest even to ``flat``'s dtype: bit-for-bit
    ``(slice.float() + t.float() * scale).to(flat.dtype)``. ``flat`` is 1-D and contiguous;
    ``tensors`` are contiguous, of any shape, on ``flat``'s device, and may mix fp32, bf16 and
    fp16. The ranges must lie inside ``flat`` and be disjoint; elements of ``flat`` outside them
    are left untouched. With ``scale=1`` no multiplication happens (a same-dtype copy is exact).
    """
    if not (tensors or offsets):
        return  # nothing to copy
    torch.ops.zero_ext.flatten_into_(flat, list(tensors), list(offsets), scale=scale,
                                     accumulate=accumulate)


@torch.library.register_fake("zero_ext::flatten_into_")
def _flatten_into_fake(flat, tensors, offsets, *, scale=1.0, accumulate=False):
    # Mutates flat in place and returns nothing: no outputs to describe.
    return None


def unflatten_from(flat: Tensor, tensors: Sequence[Tensor], offsets: Sequence[int]) -> None:
    """Copies each range of a flat buffer back into its tensor, in one pass, in place.

    For each i, ``tensors[i].view(-1).copy_(flat[offsets[i] : offsets[i] + tensors[i].numel()])``,
    cast (round to nearest even) from ``flat``'s dtype to ``tensors[i]``'s. Dtypes, layout and
    range rules are those of :func:`flatten_into_`; the written tensors must not share memory
    with each other or with ``flat`` (except as the exact view of their own range).
    """
    if not (tensors or offsets):
        return  # nothing to copy
    torch.ops.zero_ext.unflatten_from(flat, list(tensors), list(offsets))


@torch.library.register_fake("zero_ext::unflatten_from")
def _unflatten_from_fake(flat, tensors, offsets):
    # Mutates tensors in place and returns nothing: no outputs to describe.
    return None


def quantized_row_bytes(m: int, bits: int, block_size: int) -> int:
    """Bytes of one packed row of :func:`quantize_chunks` for a chunk of ``m`` elements.

    ``[data][scales]``: ``nb * block_size * bits / 8`` data bytes then ``nb`` fp32 scales, with
    ``nb = ceil(m / block_size)`` (the last block padded). Callers size all-to-all buffers and
    count wire bytes with it; it is the op's own layout (kernels/quant_math.h).
    """
    if bits not in (4, 8):
        raise ValueError(f"zero_ext.ops.quantized_row_bytes: expected bits 8 or 4, got {bits}")
    if block_size < 8 or block_size % 8:
        raise ValueError("zero_ext.ops.quantized_row_bytes: expected block_size to be a positive "
                         f"multiple of 8, got {block_size}")
    if m < 0:
        raise ValueError(f"zero_ext.ops.quantized_row_bytes: expected m >= 0, got {m}")
    blocks = -(-m // block_size)
    return blocks * block_size * bits // 8 + 4 * blocks


def quantize_chunks(
    x: Tensor,
    chunks: int,
    bits: int,
    block_size: int,
    *,
    skip: Sequence[int] = (),
    residual: Tensor | None = None,
    residual_scale: Tensor | None = None,
    residual_factor: float = 1.0,
) -> Tensor:
    """Blockwise symmetric quantization of ``chunks`` equal chunks of ``x``, one packed row each.

    ``x`` (1-D contiguous fp32, bf16 or fp16, read in its own dtype; ``numel`` divisible by
    ``chunks``) is cut into chunks of ``m = numel / chunks`` elements, each quantized in blocks of
    ``block_size`` (a multiple of 8; the last block padded with zeros) to int8 (``bits=8``) or
    packed int4 (``bits=4``): per block ``scale = absmax / qmax`` (qmax 127 or 7) and
    ``q = clamp(round_half_even(x * (qmax / absmax)), -qmax, qmax)`` in fp32; an all-zero block
    has scale 0, a block holding inf or NaN scale NaN. Returns uint8 ``[chunks, row_bytes]``
    (:func:`quantized_row_bytes`), each row the block data then the fp32 scales. Rows listed in
    ``skip`` (the chunk a caller keeps exact) are left unwritten and cost nothing.

    Error feedback: with ``residual`` (float8_e4m3fn ``[numel]``) and ``residual_scale`` (fp32
    ``[chunks]``), each computed chunk quantizes ``x + float(residual) * residual_scale[c] *
    residual_factor`` and stores, in place, its new quantization error ``e`` as
    ``residual = fp8(clamp(e / s, -448, 448))`` with ``residual_scale[c] = s = max block scale
    / 2 / 448``, one byte per element: what this call failed to send is added to the next one.
    A chunk with a non-finite block drops its residual (zeros, scale 0): that step is skipped.
    ``residual_factor`` rescales the stored residual when the loss scale changed.
    """
    return torch.ops.zero_ext.quantize_chunks(
        x, chunks, bits, block_size, skip=list(skip), residual=residual,
        residual_scale=residual_scale, residual_factor=residual_factor)


@torch.library.register_fake("zero_ext::quantize_chunks")
def _quantize_chunks_fake(x, chunks, bits, block_size, *, skip=(), residual=None,
                          residual_scale=None, residual_factor=1.0):
    torch._check(x.numel() % chunks == 0,
                 lambda: "zero_ext::quantize_chunks: x's numel is not divisible by chunks")
    m = x.numel() // chunks
    return x.new_empty((chunks, quantized_row_bytes(m, bits, block_size)), dtype=torch.uint8)


def dequantize_sum_(
    out: Tensor,
    packed: Tensor,
    bits: int,
    block_size: int,
    *,
    exact: Tensor | None = None,
    exact_index: int = -1,
    accumulate: bool = False,
) -> None:
    """Sums k senders' dequantized chunks into ``out`` in fp32, in place (the receive side of a
    quantized reduce-scatter).

    ``packed`` is uint8 ``[k, g, row_bytes]``: k senders, each g chunks of ``m = out.numel() / g``
    elements quantized by :func:`quantize_chunks` with these ``bits`` and ``block_size``.
    ``out`` (1-D contiguous fp32, bf16 or fp16) becomes ``round((out if accumulate else 0) + v_0
    + ... + v_{k-1})``, summed in fp32 in sender order, where ``v_i = q * scale`` of packed[i],
    except that ``v_{exact_index} = exact`` when ``exact`` is given (the caller's own chunk, never
    quantized; any float dtype, ``out``'s numel, and it may be ``out`` itself).
    """
    torch.ops.zero_ext.dequantize_sum_(out, packed, bits, block_size, exact=exact,
                                       exact_index=exact_index, accumulate=accumulate)


@torch.library.register_fake("zero_ext::dequantize_sum_")
def _dequantize_sum_fake(out, packed, bits, block_size, *, exact=None, exact_index=-1,
                         accumulate=False):
    # Mutates out in place and returns nothing: no outputs to describe.
    return None


def dequantize_(out: Tensor, packed: Tensor, bits: int, block_size: int) -> None:
    """Dequantizes g packed rows (uint8 ``[g, row_bytes]``) into ``out``, in place.

    ``out`` (1-D contiguous fp32, bf16 or fp16, g * m elements) receives the chunks in order,
    each element ``q * scale`` (one fp32 multiply) rounded to ``out``'s dtype: what every rank of
    a quantized all-gather uses, so all ranks hold identical values.
    """
    torch.ops.zero_ext.dequantize_(out, packed, bits, block_size)


@torch.library.register_fake("zero_ext::dequantize_")
def _dequantize_fake(out, packed, bits, block_size):
    # Mutates out in place and returns nothing: no outputs to describe.
    return None


def topk_feedback_select(
    residual: Tensor,
    grad: Tensor,
    chunks: int,
    k: int,
    *,
    momentum: Tensor | None = None,
    momentum_factor: float = 0.0,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """One top-k send with error feedback (Deep Gradient Compression): accumulate, select, pack
    and take out what is sent, in two passes over the residual (CPU).

    ``residual`` (fp32, 1-D contiguous, updated in place) accumulates ``grad`` (fp32, bf16 or
    fp16, same numel): ``v += g``, or with ``momentum`` (fp32, same numel, in place)
    ``u = u * momentum_factor + g * (1 - momentum_factor); v += u``. Per chunk of
    ``m = numel / chunks`` elements the ``k`` entries of largest ``|v|`` are sent (NaN and inf
    first, so a non-finite gradient reaches the receiver's overflow check; equal magnitudes at
    the k-th go to the lowest indices). Returns uint8 ``[chunks, k * (4 + value bytes)]``: per
    row the k int32 indices within the chunk in ascending order, then their values rounded to
    ``dtype`` (``grad``'s when None). The sent entries leave the state: ``v[i] -= float(value)``
    (the rounding error stays) and ``u[i] = 0`` (momentum factor masking).
    """
    return torch.ops.zero_ext.topk_feedback_select(
        residual, grad, chunks, k, momentum=momentum, momentum_factor=momentum_factor,
        dtype=dtype)


@torch.library.register_fake("zero_ext::topk_feedback_select")
def _topk_feedback_select_fake(residual, grad, chunks, k, *, momentum=None, momentum_factor=0.0,
                               dtype=None):
    torch._check(residual.numel() % chunks == 0,
                 lambda: "zero_ext::topk_feedback_select: numel is not divisible by chunks")
    value_bytes = (grad.dtype if dtype is None else dtype).itemsize
    return residual.new_empty((chunks, k * (4 + value_bytes)), dtype=torch.uint8)
