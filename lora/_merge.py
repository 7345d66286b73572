"""Merge arithmetic: ``W <- round(W + delta)`` in place, a bounded record to undo it bit for bit, and the undo.

The sum is taken in fp32 (fp64 for an fp64 weight or delta) and cast once. A plain subtraction does not undo it
exactly: ``round(round(W + d) - d)`` is off by an ulp here and there, and where ``|d|`` dwarfs ``|W|`` the weight's
low bits are gone altogether. The record keeps, per weight, the difference between the original bits and those of
``round(merged - d)``:

* in 4 bits when it lies in [-7, 7] (almost every weight: the difference is 0 or one ulp unless ``d`` is many times
  ``W``), two to a byte;
* otherwise (code 15, "escape") the original bits themselves, stored sparsely with their flat index.

That is 0.5 bytes per weight plus ``index + value`` bytes per escape. If the escapes would take the record past
:data:`RECORD_BUDGET` bytes per weight (or :data:`RECORD_FLOOR` bytes for a small layer) -- only when the update
swamps a large share of the weights -- no record is kept, a warning says so, and unmerging subtracts (exact to
within one rounding of the merged weight): a merge never costs more than that to keep. The record carries a fingerprint of the merged weight; if the weight changed since (a cast
while merged, a write), the record no longer applies and unmerging subtracts.

Every pass works in chunks of :data:`CHUNK` weights, so temporaries stay small next to the layer's own fp32 delta.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

__all__ = ["RECORD_BUDGET", "RECORD_FLOOR", "MergeRecord", "merged_is_finite", "merge_", "unmerged"]

RECORD_BUDGET = 1.0  # bytes of undo record per weight element, at most ...
RECORD_FLOOR = 4096  # ... or this many bytes in all, whichever is more (a tiny layer's record is no burden)
CHUNK = 1 << 18  # weights per pass (1 MiB per fp32 temporary); even, so 4-bit codes pair up within a chunk
_ESCAPE = 15  # 4-bit code for "difference outside [-7, 7]: the original bits are stored sparsely"
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class MergeRecord:
    """What :func:`merge_` needs to undo itself exactly. Tensors live on the weight's device.

    codes: (ceil(n / 2),) uint8, two 4-bit codes per byte (low nibble first); escape_index: (k,) int32/int64 flat
    positions; escape_bits: (k,) the original weights' bits as ints (ints, so ``model.half()`` cannot convert them);
    fingerprint: of the merged weight, to notice any change since.
    """

    codes: torch.Tensor
    escape_index: torch.Tensor
    escape_bits: torch.Tensor
    fingerprint: tuple

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.escape_index, self.escape_bits))

    def to(self, device: torch.device) -> MergeRecord:
        return MergeRecord(
            self.codes.to(device), self.escape_index.to(device), self.escape_bits.to(device), self.fingerprint
        )


def _acc_dtype(w: torch.Tensor, delta: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(w.dtype, torch.float32), delta.dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()])


def _wide_bits(t: torch.Tensor) -> torch.Tensor:
    """Bits as an int type with room for a difference (int64 wraps for fp64; the undo wraps the same way)."""
    return _bits(t).to(torch.int32 if t.element_size() <= 2 else torch.int64)


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield start, min(start + CHUNK, n)


def fingerprint(w: torch.Tensor) -> tuple:
    """dtype, shape and a position-weighted checksum of the bits: changes when any value changes (not when the
    weight only moves, e.g. a pickle round trip or ``.to(device)``)."""
    flat, total = _bits(w.detach()).reshape(-1), 0
    for a, b in _chunks(flat.numel()):
        weights = torch.arange(a, b, device=w.device, dtype=torch.int64) % 65521 + 1
        total += int((flat[a:b].to(torch.int64) * weights).sum())
    return (w.dtype, tuple(w.shape), total)


def merged_is_finite(w: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether ``round(w + delta)`` in ``w``'s dtype is finite everywhere (an fp16 65000 + 1000 is not)."""
    acc = _acc_dtype(w, delta)
    wf, df = w.detach().reshape(-1), delta.reshape(-1)
    if not wf.numel():
        return True
    # Two reductions settle the usual case: |w + d| <= max|w| + max|d|, and below finfo.max by more than half an
    # ulp nothing rounds up to inf (nan in either makes the comparison false: then the elementwise check decides).
    bound = sum(max(-float(lo), float(hi)) for lo, hi in (torch.aminmax(wf), torch.aminmax(df)))  # no |x| copy
    if bound < torch.finfo(w.dtype).max * (1 - torch.finfo(w.dtype).eps):
        return True
    for a, b in _chunks(wf.numel()):
        if not torch.isfinite((wf[a:b].to(acc) + df[a:b]).to(w.dtype)).all():  # + not add_: see merge_
            return False
    return True


def _scale_chunk(scale: torch.Tensor | None, shape: tuple[int, ...], a: int, b: int, acc: torch.dtype):
    """Flat elements ``[a, b)`` of ``scale`` broadcast to ``shape`` (``scale`` has ``len(shape)`` dims, at most one of
    them not 1: a per-row or per-column factor), without materialising the broadcast; None stays None."""
    if scale is None:
        return None
    dims = [d for d, n in enumerate(scale.shape) if n != 1]
    if not dims:
        return scale.reshape(()).to(acc)
    dim = dims[0]
    inner = math.prod(shape[dim + 1 :])
    index = (torch.arange(a, b, device=scale.device) // inner) % shape[dim]
    return scale.reshape(-1).to(acc)[index]


def merge_(w: torch.Tensor, delta: torch.Tensor, record: bool, scale: torch.Tensor | None = None) -> MergeRecord | None:
    """``w <- round(w + delta)`` in place (``w`` contiguous, ``delta`` of its shape); the undo record if asked for
    and within budget, else None.

    With ``scale`` (broadcastable to ``w``, one factor per row or column; DoRA): ``w <- round(scale * w + delta)``,
    undone as ``(w - delta) / scale``."""
    acc = _acc_dtype(w, delta)
    wf, df = w.detach().view(-1), delta.reshape(-1)
    n = wf.numel()
    codes, esc_index, esc_bits = [], [], []
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    budget = max(int(RECORD_BUDGET * n), RECORD_FLOOR) - (n + 1) // 2  # bytes left for escapes after the codes
    per_escape = torch.empty((), dtype=index_dtype).element_size() + w.element_size()
    with torch.no_grad():
        for a, b in _chunks(n):
            orig, d = wf[a:b], df[a:b].to(acc)
            s = _scale_chunk(scale, tuple(w.shape), a, b, acc)
            if s is None:
                merged = (orig.to(acc) + d).to(w.dtype)  # not add_: .to() is a no-op (the weight itself) for fp32
            else:
                merged = torch.addcmul(d, orig.to(acc), s).to(w.dtype)
            if record:
                approx = _undo(merged, d, s, w.dtype)
                diff = _wide_bits(orig) - _wide_bits(approx)
                fits = (diff >= -7) & (diff <= 7)
                code = torch.where(fits, diff + 7, _ESCAPE).to(torch.uint8)
                if code.numel() % 2:
                    code = torch.cat([code, code.new_full((1,), 7)])
                codes.append(code[0::2] | (code[1::2] << 4))  # low nibble first
                where = (~fits).nonzero().squeeze(1)
                esc_index.append((where + a).to(index_dtype))
                esc_bits.append(_bits(orig)[where].clone())
                budget -= where.numel() * per_escape
                if budget < 0:  # the update swamps too many weights: keep no record rather than a big one
                    record, codes, esc_index, esc_bits = False, [], [], []
                    share = 50 / per_escape  # percent of the weights whose escapes fit in half a byte per weight
                    warnings.warn(
                        f"merging a LoRA update that swamps more than {share:.0f}% of a {tuple(w.shape)} "
                        f"weight's values: no exact undo record is kept (it would "
                        f"exceed {RECORD_BUDGET:g} byte per weight); unmerging will subtract, exact to "
                        f"within one rounding",
                        stacklevel=4,
                    )
            orig.copy_(merged)
    if not record:
        return None
    int_dtype = _INT_VIEW[w.element_size()]
    return MergeRecord(
        torch.cat(codes) if codes else torch.empty(0, dtype=torch.uint8, device=w.device),
        torch.cat(esc_index) if esc_index else torch.empty(0, dtype=index_dtype, device=w.device),
        torch.cat(esc_bits) if esc_bits else torch.empty(0, dtype=int_dtype, device=w.device),
        fingerprint(w),
    )


def _undo(merged: torch.Tensor, d: torch.Tensor, s: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``round(merged - d)``, or ``round((merged - d) / s)``: the same arithmetic at merge and at unmerge time."""
    approx = merged.to(d.dtype) - d
    return (approx if s is None else approx.div_(s)).to(dtype)


def unmerged(
    w: torch.Tensor, delta: torch.Tensor, rec: MergeRecord | None, out: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Write the weight from before :func:`merge_` into ``out`` (may be ``w`` itself): bit for bit when ``rec``
    still applies to ``w``, else ``round(w - delta)`` (``round((w - delta) / scale)`` with the ``scale`` of the
    merge). Returns ``out``."""
    if rec is not None and rec.fingerprint != fingerprint(w):
        rec = None  # the weight changed since the merge: the record's bits mean nothing now
    acc = _acc_dtype(w, delta)
    wf, df, of = w.detach().reshape(-1), delta.reshape(-1), out.view(-1)
    with torch.no_grad():
        for a, b in _chunks(wf.numel()):
            approx = _undo(wf[a:b], df[a:b].to(acc), _scale_chunk(scale, tuple(w.shape), a, b, acc), w.dtype)
            if rec is not None:
                packed = rec.codes[a // 2 : (b + 1) // 2]
                code = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1)[: b - a].to(torch.int32)
                diff = torch.where(code == _ESCAPE, 0, code - 7)
                approx = (_wide_bits(approx) + diff.to(_wide_bits(approx).dtype)).to(_INT_VIEW[w.element_size()])
                approx = approx.view(w.dtype)
            of[a:b].copy_(approx)
        if rec is not None and rec.escape_index.numel():
            _bits(of)[rec.escape_index.long()] = rec.escape_bits
    return out
