"""The LoRA linear computation as one fused autograd node, and a cheap exact dropout for it.

``y = x W^T + b + scaling * dropout(x) A^T B^T`` costs, for rank ``r << in``, a few percent more arithmetic than the
frozen layer, but written as separate torch ops it costs far more (PEFT and loralib measure 1.16-1.38x on a CPU):

* every ``+`` of two ``(tokens, features)`` tensors is a full pass over memory, in the forward and again in the
  backward where autograd sums the input's two gradients;
* the dropout mask is one Bernoulli draw per input element (tens of milliseconds per 4096 x 3072 on a CPU,
  a quarter of the frozen layer's time), and ``dropout(x)`` is a second copy of the input kept for the backward.

Here the low-rank product is accumulated straight into the frozen layer's GEMM output (``addmm_``, forward), the
frozen layer's input gradient straight into the low-rank one (the GEMM's own ``beta = 1``, backward), and dropout
is computed from the *dropped* positions only: with probability ``p`` each element is dropped independently, so
the gaps between dropped positions are geometric and ``n * p`` random numbers place all of them (Knuth's method)
instead of ``n``. On the CPU the mask is never materialised: the products that need ``dropout(x)`` (``x A^T``
forward, ``dL/dh^T x`` for ``A``'s gradient) read it chunk by chunk of rows, each chunk a copy of a few MiB with
its dropped entries zeroed, still in cache when the product reads it; the backward saves the input (already alive)
plus the dropped positions (int32, ``4 p`` bytes per element). On CUDA (``dense_mask``) an ordinary dense mask is
drawn instead, one bool per input element: there it is cheap, and the sparse path's host synchronisations are not.

The result is the same distribution as ``nn.Dropout`` (an independent Bernoulli(p) per element, survivors scaled
by ``1 / (1 - p)``), drawn from torch's default generator (so ``torch.manual_seed`` and ``get_rng_state`` /
``set_rng_state`` reproduce it), but not the same random stream as ``nn.Dropout``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = ["dropout_positions", "fused_lora_linear", "fused_lora_conv"]

# (output column start, number of columns, first row of B, first row of A) for each adapted slice of the output.
Block = tuple[int, int, int, int]


def dropout_positions(
    n: int, p: float, device: torch.device | str = "cpu", dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Sorted flat positions in ``range(n)``, each included independently with probability ``p`` (``dtype``: int64,
    or int32 where ``n <= 2**31``).

    Geometric gaps: ``gap = floor(log(u) / log(1 - p)) + 1`` with ``u`` uniform on (0, 1] has
    ``P(gap >= k) = (1 - p) ** (k - 1)``, exactly the wait for the next success of a Bernoulli(p) sequence.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got p={p!r}")
    if dtype not in (torch.int32, torch.int64) or (dtype == torch.int32 and n > 2**31):
        raise ValueError(f"dtype={dtype} cannot hold positions below n={n}")
    log_keep = math.log1p(-p)
    chunks = []
    last = -1.0  # position of the last drop so far (float64 holds integers exactly up to 2**53)
    while True:
        expected = (n - 1 - last) * p
        m = int(expected + 6 * math.sqrt(expected) + 32)  # enough almost always; otherwise loop once more
        # in place, one buffer: u = 1 - rand in (0, 1], then gap = floor(log(u) / log(1 - p)) + 1
        gaps = torch.rand(m, dtype=torch.float64, device=device).neg_().add_(1).log_().div_(log_keep)
        pos = torch.cumsum(gaps.floor_().add_(1), 0).add_(last)  # strictly increasing: every gap is >= 1
        inside = pos[: int(torch.searchsorted(pos, float(n)))]  # the positions < n: a prefix
        chunks.append(inside.to(dtype))
        if inside.numel() < m:
            break
        last = float(pos[-1])
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or as it is if fp64: merge arithmetic never narrows a 64-bit tensor, and sums of 16-bit
    products accumulate in fp32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# Rows per chunk of the masked copies below: a few MiB, so that a chunk is still in cache when its product reads it.
_CHUNK_ELEMENTS = 2**19


def _masked_chunks(x2: torch.Tensor, flat: torch.Tensor, dtype: torch.dtype):
    """``x2`` (N, in) with the entries at the sorted flat positions ``flat`` set to zero, in ``dtype``: yields
    ``(row_start, row_stop, chunk)`` over chunks of rows, each a fresh copy (never ``x2`` itself, never the whole
    input at once: a chunk of a few MiB is written, zeroed and read by the caller's product while in cache)."""
    n_rows, n_cols = x2.shape
    step = max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    starts = list(range(0, n_rows, step))
    # where each chunk's positions begin in `flat`: one binary search per chunk
    edges = torch.tensor([*starts, n_rows], dtype=flat.dtype, device=flat.device) * n_cols
    bounds = torch.searchsorted(flat, edges).tolist()
    for i, start in enumerate(starts):
        stop = min(start + step, n_rows)
        chunk = x2[start:stop].to(dtype, copy=True)
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            chunk.view(-1)[flat[lo:hi] - start * n_cols] = 0
        yield start, stop, chunk


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back (a no-op if it has it): with fp32 GEMMs over 16-bit operands, where the
    16-bit path would hold a 16-bit intermediate."""
    return t if t.dtype == dtype else t.to(dtype).to(t.dtype)


class _FusedLoRALinear(torch.autograd.Function):
    """x2: (N, in); weight_t: (in, out) (a view of W^T); A: (R, in); B: (rows, r); see :func:`fused_lora_linear`."""

    @staticmethod
    def forward(
        ctx,
        x2,
        weight_t,
        bias,
        A,
        B,
        scaling: float,
        p: float,
        blocks: tuple[Block, ...],
        r: int,
        dense_mask: bool,
        gemm_dtype: torch.dtype | None = None,
    ):
        # gemm_dtype (fp32 over 16-bit operands, see _gemm_dtype): every product runs on the operands upcast (exact),
        # and what the 16-bit path keeps in 16 bits (h, the output) is rounded to it: the same values, up to the
        # order of fp32 accumulation.
        dtype = x2.dtype
        c = gemm_dtype or dtype
        X, A_c = x2.to(c), A.to(c)  # no-ops without gemm_dtype
        pos = mask = None
        if p > 0 and dense_mask:
            # On a GPU a dense mask is cheap to draw and the sparse path's host syncs are not: keep a bool mask.
            x_dropped, mask = torch.native_dropout(x2, p, True)
            h = x_dropped.to(c) @ A_c.T  # (N, in) @ (in, R) -> (N, R)
        elif p > 0:
            # int32 positions where they fit: half the memory kept for the backward, faster index math
            pos = dropout_positions(x2.numel(), p, x2.device, torch.int32 if x2.numel() <= 2**31 else torch.int64)
            h = torch.empty(x2.shape[0], A.shape[0], dtype=c, device=x2.device)
            for start, stop, chunk in _masked_chunks(x2, pos, c):
                torch.mm(chunk, A_c.T, out=h[start:stop])  # (rows, in) @ (in, R): the dropped inputs are zeros
            h = _round(h, dtype).mul_(1.0 / (1.0 - p))  # the 16-bit path rounds the product, then the scaled h
        else:
            h = X @ A_c.T  # (N, in) @ (in, R) -> (N, R)
        h = _round(h, dtype).to(dtype)
        # (N, in) @ (in, out), then (N, r) @ (r, size) accumulated into each slice's columns: PEFT's order, frozen
        # product first. (The LoRA term first with the GEMM adding onto it would save a pass over the output, but
        # moved a Phi-3's fp32 logits 1.5e-4 from the merged model's, against 0.97e-4 in this order.)
        out = torch.addmm(bias.to(c), X, weight_t.to(c)) if bias is not None else X @ weight_t.to(c)
        del X  # with gemm_dtype an fp32 copy of the input
        out = _round(out, dtype)  # the 16-bit path rounds here, and again after adding the LoRA term
        h_c, B_c = h.to(c), B.to(c)
        for start, size, b_row, a_row in blocks:
            out[:, start : start + size].addmm_(h_c[:, a_row : a_row + r], B_c[b_row : b_row + size].T, alpha=scaling)
        ctx.save_for_backward(x2, weight_t, A, B, h, pos, mask)
        ctx.scaling, ctx.p, ctx.blocks, ctx.r, ctx.has_bias = scaling, p, blocks, r, bias is not None
        ctx.gemm_dtype = gemm_dtype
        return out.to(dtype)

    @staticmethod
    def backward(ctx, g):
        x2, weight_t, A, B, h, pos, mask = ctx.saved_tensors
        s, p, r = ctx.scaling, ctx.p, ctx.r
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dtype = g.dtype
        c = ctx.gemm_dtype or dtype
        g = g.contiguous().to(c)  # (N, out); upcast (exact) only with gemm_dtype
        B_c, h_c = B.to(c), h.to(c)
        gh = torch.empty(g.shape[0], A.shape[0], dtype=c, device=g.device)  # (N, R)
        grad_B = torch.empty_like(B, dtype=c) if need_bb else None
        for start, size, b_row, a_row in ctx.blocks:
            g_slice = g[:, start : start + size]  # (N, size)
            torch.mm(g_slice, B_c[b_row : b_row + size], out=gh[:, a_row : a_row + r])  # (N, size) @ (size, r)
            if need_bb:
                torch.mm(g_slice.T, h_c[:, a_row : a_row + r], out=grad_B[b_row : b_row + size])  # (size, N) @ (N, r)
        if need_bb:
            grad_B = _round(grad_B, dtype)
        gh.mul_(s)
        gh = _round(gh, dtype)
        if need_bb:
            grad_B.mul_(s)
        keep_scale = 1.0 / (1.0 - p) if p > 0 else 1.0
        grad_x = grad_A = None
        if need_x:
            A_c = A.to(c)
            if mask is not None:
                grad_x = _round(g @ weight_t.to(c).T, dtype)  # (N, out) @ (out, in)
                grad_x.addcmul_(gh @ A_c, mask, value=keep_scale)  # dropped inputs get no LoRA gradient
            else:
                # the LoRA term first, (N, R) @ (R, in), then the frozen layer's product accumulated into it by
                # the GEMM itself (beta = 1): no second pass over the (N, in) gradient
                grad_x = _round(torch.mm(_round(gh.mul(keep_scale), dtype) if p > 0 else gh, A_c), dtype)
                if pos is not None:
                    grad_x.view(-1)[pos] = 0  # dropped inputs get no LoRA gradient
                torch.addmm(grad_x, g, weight_t.to(c).T, out=grad_x)  # (N, out) @ (out, in), in place
        if need_a:
            if mask is not None:
                grad_A = gh.T @ (x2.to(c) * mask)  # (R, N) @ (N, in)
            elif pos is not None:
                # summed over chunks in fp32 at least: a 16-bit GEMM rounds each chunk's product, not the running sum
                grad_A = torch.zeros(A.shape, dtype=_wide(gh).dtype, device=A.device)
                for start, stop, chunk in _masked_chunks(x2, pos, c):
                    # (R, rows) @ (rows, in): the dropped inputs are zeros
                    if grad_A.dtype == c:
                        torch.addmm(grad_A, gh[start:stop].T, chunk, out=grad_A)
                    else:
                        grad_A += gh[start:stop].T @ chunk
            else:
                grad_A = gh.T @ x2.to(c)  # (R, N) @ (N, in)
            grad_A = _round(grad_A, dtype)
            if p > 0:
                grad_A.mul_(keep_scale)
        grad_w = (x2.to(c).T @ g) if need_w else None  # (in, N) @ (N, out), the shape of weight_t
        grad_bias = g.sum(0) if need_b and ctx.has_bias else None
        grads = (grad_x, grad_w, grad_bias, grad_A, grad_B)
        return *(t.to(dtype) if t is not None else None for t in grads), None, None, None, None, None, None


@functools.cache
def _cpu_has_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware (AVX512-BF16 / AMX for bf16, AVX512-FP16 / AMX
    for fp16); without, torch emulates them, many times slower than fp32 (24x measured on an AVX2 EPYC)."""
    mkldnn = torch.ops.mkldnn
    try:
        return bool(
            mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported()
        )
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast 16-bit path either
        return False


# Weights upcast or dequantized at a time by a product that reads its weight in blocks of rows: 16 MiB in fp32.
_BLOCK_ELEMENTS = 2**22


def _row_blocks(n_rows: int, row_length: int, multiple: int = 1) -> list[slice]:
    """A weight's rows in blocks of about ``_BLOCK_ELEMENTS`` weights (whole rows, a multiple of ``multiple`` of
    them): the pieces in which a product reads a weight it upcasts (:func:`_gemm_dtype`) or dequantizes, so that no
    copy of the whole weight in the wider dtype exists and each piece is multiplied while it is in cache."""
    step = max(multiple, _BLOCK_ELEMENTS // max(row_length, 1) // multiple * multiple)
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """fp32 for 16-bit products on a CPU that would emulate them, else None (the operands' own dtype).

    A product of two bf16 (8-bit significand) or fp16 (11-bit) numbers is exact in fp32 (24 bits), and torch's
    16-bit GEMMs accumulate in fp32: so an fp32 GEMM over the upcast operands, rounded to 16 bits, gives what the
    16-bit GEMM gives, up to the order of accumulation, at fp32 speed.
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_has_16bit_gemm(dtype):
        return torch.float32
    return None


def fused_lora_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    blocks: Sequence[Block],
    r: int,
    dense_mask: bool | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x @ weight_t + bias``, plus, for each block, ``scaling * dropout(x) @ A_i^T @ B_i^T`` in its columns.

    x: (..., in); weight_t: (in, out); lora_A: (R, in) with ``A_i = lora_A[a_row:a_row + r]``; lora_B: (rows, r)
    with ``B_i = lora_B[b_row:b_row + size]``. ``dropout_p > 0`` applies dropout to the LoRA input (pass 0 in eval
    mode). Everything runs in ``compute_dtype`` (default: ``x``'s): inputs, weight, bias and LoRA parameters of
    another dtype are cast to it, as autocast casts a matmul's operands, and receive their gradients in their own
    dtype; the output has ``compute_dtype``. Autocast is off inside (the operands already have the dtype it would
    pick). On a CPU without 16-bit matrix units the products of a 16-bit ``compute_dtype`` run as fp32 GEMMs over
    the (exactly) upcast operands, rounded back: the 16-bit result at fp32 speed. ``dense_mask`` (default: on CUDA) draws an ordinary dense dropout mask instead of the dropped positions.
    Returns (..., out).
    """
    dtype = compute_dtype or x.dtype
    if dense_mask is None:
        dense_mask = x.is_cuda
    with torch.autocast(x.device.type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # each .to() is a no-op when the dtype already matches
        bias = bias.to(dtype) if bias is not None else None
        out = _FusedLoRALinear.apply(
            x2,
            weight_t.to(dtype),
            bias,
            lora_A.to(dtype),
            lora_B.to(dtype),
            float(scaling),
            float(dropout_p),
            tuple(blocks),
            r,
            bool(dense_mask),
            _gemm_dtype(dtype, x.device),
        )
    return out.view(*x.shape[:-1], out.shape[-1])


_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


class _FusedLoRAConv(torch.autograd.Function):
    """x: (N, in, *S); weight: (out, in, *k); A_w: (r, in, *k); B_w: (out, r); groups == 1.

    Forward: one convolution with the merged filters ``W + s * B A``: the frozen conv's cost, and the output needs
    no second pass. Saved for backward: what the frozen conv saves (the input and its filters) plus ``A`` and ``B``;
    ``A``'s responses ``h`` (needed for ``B``'s gradient) are recomputed in the backward rather than kept, which
    would add ``r / out`` of the output's bytes. Backward: the input gradient through the merged weight alone, exactly
    the frozen layer's cost; ``A``'s gradient is the weight gradient of ``r`` filters for ``dL/dh = s B^T g``; ``B``'s
    is ``s g h^T`` summed over positions.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A_w, B_w, scaling: float, stride, padding, dilation):
        conv = _CONV[x.dim() - 2]
        # (out, r) @ (r, in * prod(k)) -> the update, shaped like the weight
        merged = torch.add(weight, (B_w @ A_w.flatten(1)).view_as(weight), alpha=scaling)
        ctx.save_for_backward(x, merged, A_w, B_w)
        ctx.conf = (scaling, stride, padding, dilation, bias is not None)
        return conv(x, merged, bias, stride, padding, dilation, 1)  # (N, out, *S')

    @staticmethod
    def backward(ctx, g):
        x, merged, A_w, B_w = ctx.saved_tensors
        scaling, stride, padding, dilation, has_bias = ctx.conf
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        g = g.contiguous()
        spatial = list(range(2, g.dim()))
        args = dict(
            bias_sizes=None,
            stride=list(stride),
            padding=list(padding),
            dilation=list(dilation),
            transposed=False,
            output_padding=[0] * len(spatial),
            groups=1,
        )
        g3 = g.flatten(2)  # (N, out, P) with P the output positions
        grad_x = grad_w = grad_A = grad_B = None
        if need_x:  # through W + s B A: the LoRA term's input gradient comes for free
            grad_x = torch.ops.aten.convolution_backward(g, x, merged, output_mask=[True, False, False], **args)[0]
        if need_a:
            gh = torch.matmul(B_w.T * scaling, g3).view(g.shape[0], -1, *g.shape[2:])  # (r, out) @ (N, out, P)
            grad_A = torch.ops.aten.convolution_backward(gh, x, A_w, output_mask=[False, True, False], **args)[1]
        if need_bb:
            # A's r filters padded with zero filters to the conv library's channel blocking: a conv with only r
            # output channels runs far below the rate of one with 16.
            r = A_w.shape[0]
            filters = torch.cat([A_w, A_w.new_zeros(-r % _CHANNEL_BLOCK, *A_w.shape[1:])])
            h = _CONV[x.dim() - 2](x, filters, None, stride, padding, dilation, 1)[:, :r]  # (N, r, *S')
            # (N, out, P) @ (N, P, r) summed over the batch -> (out, r)
            grad_B = torch.bmm(g3, h.flatten(2).transpose(1, 2)).sum(0) * scaling
        if need_w:
            grad_w = torch.ops.aten.convolution_backward(g, x, merged, output_mask=[False, True, False], **args)[1]
        grad_bias = g.sum(dim=[0, *spatial]) if need_b and has_bias else None
        return grad_x, grad_w, grad_bias, grad_A, grad_B, None, None, None, None


_CHANNEL_BLOCK = 16


def fused_lora_conv(x, weight, bias, A_w, B_w, scaling: float, stride, padding, dilation) -> torch.Tensor:
    """``conv(x, weight, bias) + scaling * conv1x1(conv(x, A_w), B_w)`` for an ungrouped conv with int padding
    (apply non-zero padding modes to ``x`` first and pass ``padding=0``). No dropout: use the plain path for it.
    ``A_w``: (r, in, *k); ``B_w``: (out, r)."""
    return _FusedLoRAConv.apply(
        x, weight, bias, A_w, B_w, float(scaling), tuple(stride), tuple(padding), tuple(dilation)
    )
