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
    n: int,
    p: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.int64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sorted flat positions in ``range(n)``, each included independently with probability ``p`` (``dtype``: int64,
    or int32 where ``n <= 2**31``), drawn from ``generator`` (default: torch's default generator of ``device``).

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
        gaps = (
            torch.rand(m, dtype=torch.float64, device=device, generator=generator).neg_().add_(1).log_().div_(log_keep)
        )
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


def _linear_forward(
    x2: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float,
    blocks: Sequence[Block],
    r: int,
    dense_mask: bool,
    gemm_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The fused forward: ``(out: (N, out), h: (N, R), pos, mask)``, where ``h = dropout(x2) A^T`` is kept for B's
    gradient and the dropped inputs are given by ``pos`` (sorted flat positions, sparse path) or ``mask`` (bool,
    ``dense_mask``), both None without dropout. Draws from torch's default generator when ``p > 0``."""
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
        pos = dropout_positions(x2.numel(), p, x2.device, _positions_dtype(x2.numel()))
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
    return out.to(dtype), h, pos, mask


def _linear_backward(
    g: torch.Tensor,
    x2: torch.Tensor,
    weight_t: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    pos: torch.Tensor | None,
    mask: torch.Tensor | None,
    scaling: float,
    p: float,
    blocks: Sequence[Block],
    r: int,
    gemm_dtype: torch.dtype | None,
    needs: Sequence[bool],
    has_bias: bool,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients ``(x2, weight_t, bias, A, B)`` of :func:`_linear_forward` for the output gradient ``g: (N, out)``,
    each None unless ``needs`` (five bools, that order) asks for it; the same dropped inputs (``pos`` / ``mask``)."""
    s = scaling
    need_x, need_w, need_b, need_a, need_bb = needs
    dtype = g.dtype
    c = gemm_dtype or dtype
    g = g.contiguous().to(c)  # (N, out); upcast (exact) only with gemm_dtype
    B_c, h_c = B.to(c), h.to(c)
    gh = torch.empty(g.shape[0], A.shape[0], dtype=c, device=g.device)  # (N, R)
    grad_B = torch.empty_like(B, dtype=c) if need_bb else None
    for start, size, b_row, a_row in blocks:
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
    grad_bias = g.sum(0) if need_b and has_bias else None
    return tuple(t.to(dtype) if t is not None else None for t in (grad_x, grad_w, grad_bias, grad_A, grad_B))


def _positions_dtype(n: int) -> torch.dtype:
    return torch.int32 if n <= 2**31 else torch.int64


class _FusedLoRALinear(torch.autograd.Function):
    """x2: (N, in); weight_t: (in, out) (a view of W^T); A: (R, in); B: (rows, r); see :func:`fused_lora_linear`.
    The eager path (no dispatcher in between); under torch.compile the same two functions run as the custom ops
    below."""

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
        out, h, pos, mask = _linear_forward(x2, weight_t, bias, A, B, scaling, p, blocks, r, dense_mask, gemm_dtype)
        ctx.save_for_backward(x2, weight_t, A, B, h, pos, mask)
        ctx.scaling, ctx.p, ctx.blocks, ctx.r, ctx.has_bias = scaling, p, blocks, r, bias is not None
        ctx.gemm_dtype = gemm_dtype
        return out

    @staticmethod
    def backward(ctx, g):
        x2, weight_t, A, B, h, pos, mask = ctx.saved_tensors
        grads = _linear_backward(
            g, x2, weight_t, A, B, h, pos, mask, ctx.scaling, ctx.p, ctx.blocks, ctx.r, ctx.gemm_dtype,
            ctx.needs_input_grad[:5], ctx.has_bias,
        )  # fmt: skip
        return *grads, None, None, None, None, None, None


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


# ---------------------------------------------------------------------------------------------------------------
# The same computation as torch.library custom ops, for torch.compile: dynamo cannot trace the autograd Function (its
# dropout draws a data-dependent number of positions and its chunks read them back), so while compiling the layers
# call these instead, which dynamo and AOT autograd keep as one opaque node each way; inductor fuses what lies around
# them. Their autograd is registered below; the backward is a second op.
# ``nondeterministic_seeded``: the forward draws from torch's default generator, so it is impure (never dropped),
# inductor keeps the order of such ops (torch/_library/utils.py is_impure, _inductor/fx_passes/post_grad.py
# reorder_for_locality), and where activation checkpointing inside a compiled region recomputes it in the backward,
# AOT autograd saves and restores the generator's state around it (_functorch/partitioners.py
# functionalize_rng_ops): the compiled layers draw the eager stream, op by op. AOT autograd's CSE ignores the tag
# (see _exempt_from_cse).
# Every output has a size known before the op runs (a data-dependent size breaks dynamo's graph unless fullgraph=True
# or capture_dynamic_output_shape_ops): so instead of the dropped positions (as many as were drawn) the forward
# returns the generator's state before its draw, a few KiB, from which the backward draws the same positions again
# (n p random numbers: a small fraction of the layer's backward).


def _flat_blocks(blocks: Sequence[Block]) -> list[int]:
    return [v for block in blocks for v in block]


def _unflat_blocks(flat: Sequence[int]) -> tuple[Block, ...]:
    return tuple((flat[i], flat[i + 1], flat[i + 2], flat[i + 3]) for i in range(0, len(flat), 4))


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of torch's default generator of ``device`` (a uint8 CPU tensor, its size fixed per device type)."""
    return torch.get_rng_state() if device.type == "cpu" else torch.get_device_module(device).get_rng_state(device)


@torch.library.custom_op("lora::fused_lora_linear", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _linear_op(
    x2: torch.Tensor,
    weight_t: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    p: float,
    blocks: list[int],
    r: int,
    dense_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_linear_forward` as an op: ``(out: (N, out), h: (N, R), dropped)``, ``dropped`` the default
    generator's state before the draw of the dropped positions (uint8), the bool mask (``dense_mask``), or empty
    (no dropout). ``blocks``: the :data:`Block` tuples flattened."""
    sparse = p > 0 and not dense_mask
    state = _rng_state(x2.device) if sparse else None
    gemm = _gemm_dtype(x2.dtype, x2.device)
    out, h, _, mask = _linear_forward(x2, weight_t, bias, A, B, scaling, p, _unflat_blocks(blocks), r, dense_mask, gemm)
    dropped = state if sparse else mask if mask is not None else x2.new_empty(0, dtype=torch.uint8)
    return out, h, dropped


@_linear_op.register_fake
def _(x2, weight_t, bias, A, B, scaling, p, blocks, r, dense_mask):
    _exempt_from_cse()  # runs while dynamo traces, before AOT autograd's CSE
    out = x2.new_empty(x2.shape[0], weight_t.shape[1])
    h = x2.new_empty(x2.shape[0], A.shape[0])
    if p > 0 and dense_mask:
        dropped = x2.new_empty(x2.shape, dtype=torch.bool)
    elif p > 0:  # a generator's state is a CPU tensor, whatever its device
        dropped = torch.empty(_rng_state_size(x2.device.type), dtype=torch.uint8, device="cpu")
    else:
        dropped = x2.new_empty(0, dtype=torch.uint8)
    return out, h, dropped


def _exempt_from_cse() -> None:
    """Put the forward op on the list of random ops AOT autograd's common-subexpression elimination leaves alone.

    That pass (``torch/_functorch/compile_utils.py`` ``fx_graph_cse``, torch 2.13) exempts the ATen ops of a fixed
    list (``rand_ops``), not ops tagged ``nondeterministic_seeded``: without this, two calls with the same inputs
    (one LoRA layer applied twice to one tensor) would become one draw. Done lazily, from the fake implementation,
    so that importing lora does not import the compiler; a torch without that list is left as it is.
    """
    try:
        from torch._functorch import compile_utils
    except ImportError:
        return
    rand_ops = getattr(compile_utils, "rand_ops", None)
    if isinstance(rand_ops, list) and torch.ops.lora.fused_lora_linear not in rand_ops:
        rand_ops.append(torch.ops.lora.fused_lora_linear)


@functools.cache
def _rng_state_size(device_type: str) -> int:
    return _rng_state(torch.device(device_type)).numel()


@torch.library.custom_op("lora::fused_lora_linear_backward", mutates_args=())
def _linear_backward_op(
    g: torch.Tensor,
    x2: torch.Tensor,
    weight_t: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    dropped: torch.Tensor,
    scaling: float,
    p: float,
    blocks: list[int],
    r: int,
    needs: list[bool],
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_linear_backward` as an op: the gradients of ``(x2, weight_t, bias, A, B)``, each contiguous, or empty
    where ``needs`` does not ask for it (an op returns no None). The dropped positions are drawn again from the
    state the forward returned, by a generator of this op's own (the default generator is left as it is)."""
    pos = mask = None
    if p > 0 and dropped.dtype == torch.bool:
        mask = dropped
    elif p > 0:
        generator = torch.Generator(x2.device)
        generator.set_state(dropped)
        pos = dropout_positions(x2.numel(), p, x2.device, _positions_dtype(x2.numel()), generator=generator)
    gemm = _gemm_dtype(g.dtype, g.device)
    grads = _linear_backward(
        g, x2, weight_t, A, B, h, pos, mask, scaling, p, _unflat_blocks(blocks), r, gemm, needs, has_bias
    )
    return tuple(g.new_empty(0) if t is None else t.contiguous() for t in grads)


@_linear_backward_op.register_fake
def _(g, x2, weight_t, A, B, h, dropped, scaling, p, blocks, r, needs, has_bias):
    shapes = (x2.shape, weight_t.shape, (weight_t.shape[1],), A.shape, B.shape)
    wanted = (*needs[:2], needs[2] and has_bias, *needs[3:])
    return tuple(g.new_empty(shape if want else (0,)) for shape, want in zip(shapes, wanted))


def _linear_op_setup(ctx, inputs, output) -> None:
    x2, weight_t, bias, A, B, scaling, p, blocks, r, _ = inputs
    _, h, dropped = output
    ctx.save_for_backward(x2, weight_t, A, B, h, dropped)
    ctx.conf = (scaling, p, blocks, r, bias is not None)


def _linear_op_backward(ctx, g, _grad_h, _grad_dropped):
    x2, weight_t, A, B, h, dropped = ctx.saved_tensors
    scaling, p, blocks, r, has_bias = ctx.conf
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    grads = torch.ops.lora.fused_lora_linear_backward(
        g, x2, weight_t, A, B, h, dropped, scaling, p, blocks, r, needs, has_bias
    )
    return *(grad if need else None for grad, need in zip(grads, needs)), None, None, None, None, None


_linear_op.register_autograd(_linear_op_backward, setup_context=_linear_op_setup)


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
        args = (x2, weight_t.to(dtype), bias, lora_A.to(dtype), lora_B.to(dtype), float(scaling), float(dropout_p))
        if torch.compiler.is_compiling():  # the custom op: one opaque node in the graph
            out, _, _ = torch.ops.lora.fused_lora_linear(*args, _flat_blocks(blocks), r, bool(dense_mask))
        else:  # eager: the autograd Function, without the dispatcher's per-call cost
            out = _FusedLoRALinear.apply(*args, tuple(blocks), r, bool(dense_mask), _gemm_dtype(dtype, x.device))
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
