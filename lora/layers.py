"""LoRA layers: each one *is* the torch layer it adapts, plus a low-rank update.

A LoRA layer computes ``base(x) + scaling * B(A(dropout(x)))`` where ``A`` has ``r`` rows, ``B`` starts at zero
(so a fresh layer equals its base exactly) and ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with
``use_rslora=True``, Kalajdzievski 2023). The state-dict keys are loralib's: ``weight``, ``bias``, ``lora_A``,
``lora_B``.

Differences from loralib 0.1.2, on purpose:

* ``train()`` / ``eval()`` never touch a parameter. loralib merges the update into ``weight`` on ``eval()`` and
  subtracts it on ``train()``; that drifts low-precision weights and applies LoRA twice when a state dict saved in
  eval mode is loaded. ``merge_weights`` is accepted for signature compatibility and kept as an attribute, but
  merging only ever happens when asked for (:func:`lora.merge_lora`).
* ``MergedLinear`` takes ``split_sizes`` for unequal slices (grouped-query ``qkv``) and its forward stays factored.
* The conv layers subclass ``nn.ConvNd`` directly (keys ``weight``/``lora_A``/``lora_B``, not loralib's
  ``conv.weight``), support tuple kernels, groups, dilation and every padding mode, and apply dropout. The update is
  ``B @ A`` with ``A: (r, in_channels // groups * prod(kernel_size))`` and ``B: (out_channels, r)``, reshaped to the
  conv weight's shape (loralib's Conv2d uses ``r * k`` x ``in * k`` blocks instead).
* ``Embedding`` honours ``padding_idx`` and applies ``max_norm`` out of place, never rescaling a parameter.
* LoRA parameters over a bf16/fp16 base are kept in fp32 by default (as PEFT does); see ``lora_dtype``. Without
  autocast, the fused paths (:mod:`lora.functional`) use them in the base's dtype and give them fp32 gradients,
  as autocast would; under autocast (or torch.compile) the plain ops run.
* Speed: ``Linear``/``MergedLinear`` accumulate the low-rank product into the frozen GEMM's output and draw dropout
  from the dropped positions only; an ungrouped fp32 conv without dropout runs ``A``'s filters inside the frozen
  convolution, so at init it equals the plain conv to within rounding (about 1e-7 relative), not bit for bit.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import _wide, fused_lora_conv, fused_lora_linear  # _wide: fp32, or fp64 if it is

__all__ = ["LoRALayer", "Linear", "MergedLinear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "is_lora_layer"]


class LoRALayer(abc.ABC):
    """loralib's ``LoRALayer``, kept for code written against loralib.

    ``class MyLayer(nn.Linear, LoRALayer)`` calling ``LoRALayer.__init__(self, r, lora_alpha, lora_dropout,
    merge_weights)`` works as in loralib, and :func:`lora.mark_only_lora_as_trainable` / :func:`lora.lora_state_dict`
    treat such a layer's ``lora_A`` / ``lora_B`` as LoRA parameters. This library's own layers do not inherit it (a
    LoRA layer is its torch layer, single inheritance); they are registered, so ``isinstance(layer, LoRALayer)``
    holds for them too.
    """

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        _check_lora_args(r, lora_alpha, lora_dropout)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = _dropout(lora_dropout)
        self.merged = False
        self.merge_weights = merge_weights


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers (plain functions: the layers share behaviour, not state).


def _check_lora_args(r: int, lora_alpha: float, lora_dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative int, got r={r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not lora_alpha > 0:
        raise ValueError(f"lora_alpha must be a positive number, got lora_alpha={lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got lora_dropout={lora_dropout!r}")


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p=p) if p > 0 else nn.Identity()


def _scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    if r == 0:
        return 0.0
    # rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) keeps the update's scale stable as r grows.
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _lora_dtype(base_dtype: torch.dtype | None, lora_dtype: torch.dtype | None) -> torch.dtype | None:
    """LoRA parameters stay in fp32 over a 16-bit base unless told otherwise (as PEFT's autocast_adapter_dtype)."""
    if lora_dtype is not None:
        if not isinstance(lora_dtype, torch.dtype) or not lora_dtype.is_floating_point:
            raise ValueError(f"lora_dtype must be a floating torch.dtype, got lora_dtype={lora_dtype!r}")
        return lora_dtype
    if base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


def _init_common(
    layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool, use_rslora: bool
) -> None:
    layer.r = r
    layer.lora_alpha = lora_alpha
    layer.use_rslora = use_rslora
    layer.scaling = _scaling(r, lora_alpha, use_rslora)
    layer.lora_dropout = _dropout(lora_dropout)
    # loralib merges on eval() when this is True. Here eval() never merges: the flag is recorded, nothing more.
    layer.merge_weights = merge_weights
    layer.merged = False


def _new_lora_params(layer: nn.Module, a_shape: tuple[int, ...], b_shape: tuple[int, ...], lora_dtype: torch.dtype | None) -> None:
    w = layer.weight
    dtype = _lora_dtype(w.dtype, lora_dtype)
    layer.lora_A = nn.Parameter(torch.empty(a_shape, device=w.device, dtype=dtype))
    layer.lora_B = nn.Parameter(torch.empty(b_shape, device=w.device, dtype=dtype))
    w.requires_grad = False  # the pretrained weight is frozen, as in loralib
    if not w.is_meta:
        layer.reset_lora_parameters()


def _adopt(layer: nn.Module, base: nn.Module) -> nn.Module:
    """Give ``layer`` (built on ``meta``) the very weight/bias Parameter objects of ``base``: nothing is copied."""
    layer.weight = base.weight
    if getattr(base, "bias", None) is not None:
        layer.bias = base.bias
    if layer.r > 0 and layer._parameters.get("lora_A") is not None:
        layer.weight.requires_grad = False
        for name in ("lora_A", "lora_B"):
            p = layer._parameters[name]
            layer._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=base.weight.device))
        layer.reset_lora_parameters()
    return layer.train(base.training)  # a layer swapped into an eval-mode model must not start dropping out


def _lora_input(x: torch.Tensor, lora_param: torch.Tensor) -> torch.Tensor:
    # An fp32 adapter over a bf16 base sees the input in fp32; under autocast the matmuls pick their own dtype.
    if x.dtype != lora_param.dtype and not torch.is_autocast_enabled(x.device.type):
        return x.to(lora_param.dtype)
    return x


def _fusable(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> bool:
    """Whether the fused autograd functions of :mod:`lora.functional` apply: the input in the base weight's dtype,
    LoRA parameters in that dtype or fp32 (then used in the base's dtype, as autocast would: the LoRA term is
    rounded to the base's precision when added to its output anyway), no autocast (it picks its own dtypes per
    op), and not being traced by torch.compile (which fuses the plain ops itself)."""
    return (x.dtype == weight.dtype and lora_A.dtype in (x.dtype, torch.float32) and x.device == weight.device
            and not torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling())


def _dropout_p(layer: nn.Module) -> float:
    """The dropout probability the fused path must apply now (0 in eval mode)."""
    d = layer.lora_dropout
    return d.p if isinstance(d, nn.Dropout) and d.training else 0.0


def _has_lora(layer: nn.Module) -> bool:
    return layer.r > 0 and layer._parameters.get("lora_A") is not None


# Merging. The weight becomes round(W + delta) with the sum taken in fp32 (fp64 for an fp64 weight or adapter). To
# undo it bit for bit (a plain subtraction in bf16 is off by an ulp here and there) the merge keeps the integer
# difference between the original bits and round(merged - delta): one int8 per weight in the usual case, a
# non-persistent buffer.

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.element_size()]).to(torch.int64)


def _residual(original: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    # For 64-bit floats the difference wraps around (e.g. -0.0 vs +0.0 gives INT64_MIN, whose abs() is still
    # negative); wrapped arithmetic is undone by the wrapped addition in _apply_residual, so check the range, not abs.
    diff = _bits(original) - _bits(approx)
    if diff.numel() == 0 or (int(diff.min()) >= -128 and int(diff.max()) <= 127):
        return diff.to(torch.int8)
    return diff


def _apply_residual(approx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    bits = _bits(approx) + residual.to(torch.int64)
    width = approx.element_size() * 8
    if width < 64:  # wrap into the signed range of the float's integer view
        half = 1 << (width - 1)
        bits = (bits + half) % (1 << width) - half
    return bits.to(_INT_VIEW[approx.element_size()]).view(approx.dtype)


def _merge(layer: nn.Module, safe: bool) -> None:
    if layer.merged or not _has_lora(layer):
        return
    with torch.no_grad():
        delta = layer.delta_weight()  # fp32 (or fp64), shaped like layer.weight
        if safe and not torch.isfinite(delta).all():
            raise ValueError(f"refusing to merge {type(layer).__name__}: its LoRA delta is not finite (inf or nan)")
        w = layer.weight
        acc = torch.promote_types(_wide(w).dtype, delta.dtype)
        merged = (w.to(acc) + delta.to(acc)).to(w.dtype)
        residual = _residual(w, (merged.to(acc) - delta.to(acc)).to(w.dtype))
        layer.weight.copy_(merged)
    layer.register_buffer("_unmerge_residual", residual, persistent=False)
    layer._merged_dtype = merged.dtype  # the residual counts in this dtype's bits
    layer.merged = True


def _unmerge(layer: nn.Module) -> None:
    if not layer.merged:
        return
    with torch.no_grad():
        w, delta = layer.weight, layer.delta_weight()
        acc = torch.promote_types(_wide(w).dtype, delta.dtype)
        approx = (w.to(acc) - delta.to(acc)).to(w.dtype)
        # After a cast while merged (model.half()) the residual's bits mean nothing; the subtraction is all there is.
        if w.dtype == layer._merged_dtype:
            approx = _apply_residual(approx, layer._unmerge_residual)
        layer.weight.copy_(approx)
    del layer._buffers["_unmerge_residual"]
    layer.merged = False


# ---------------------------------------------------------------------------------------------------------------
# Linear


class Linear(nn.Linear):
    """``nn.Linear`` with a LoRA update: ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    Arguments mirror loralib's ``Linear`` (``r``, ``lora_alpha``, ``lora_dropout``, ``fan_in_fan_out``,
    ``merge_weights``) and torch's (``bias``, ``device``, ``dtype``). ``fan_in_fan_out=True`` stores ``weight`` as
    ``(in_features, out_features)`` (GPT-2's Conv1D layout), as loralib does. ``lora_dtype`` sets the LoRA
    parameters' dtype (default: fp32 over a bf16/fp16 base, else the base's dtype).

    Shapes: ``x: (..., in_features) -> (..., out_features)``; ``lora_A: (r, in_features)``,
    ``lora_B: (out_features, r)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        *,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_lora_args(r, lora_alpha, lora_dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _init_common(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.weight = nn.Parameter(self.weight.data.T.contiguous())
        if r > 0:
            _new_lora_params(self, (r, in_features), (out_features, r), lora_dtype)

    @classmethod
    def from_module(cls, base: nn.Linear, **lora_kwargs: Any) -> "Linear":
        """Wrap ``base``, adopting its weight and bias objects (no copy, no re-initialisation of the base)."""
        if lora_kwargs.get("fan_in_fan_out"):
            raise ValueError("from_module wraps an nn.Linear, whose weight is (out, in): fan_in_fan_out must be False")
        layer = cls(base.in_features, base.out_features, bias=base.bias is not None, device="meta",
                    dtype=base.weight.dtype, **lora_kwargs)
        return _adopt(layer, base)

    def reset_lora_parameters(self) -> None:
        """A as ``nn.Linear``'s default (Kaiming-uniform, a=sqrt(5)) and B zero, as loralib and the LoRA paper."""
        if _has_lora(self):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update in fp32 (fp64 for an fp64 adapter), shaped like ``weight``: ``scaling * B @ A``.

        Transposed to ``(in, out)`` if ``fan_in_fan_out``.
        """
        delta = (_wide(self.lora_B) @ _wide(self.lora_A)) * self.scaling  # (out, r) @ (r, in) -> (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.T if self.fan_in_fan_out else self.weight
        if self.merged or not _has_lora(self):
            return F.linear(x, weight, self.bias)
        A, B = self.lora_A, self.lora_B
        if _fusable(x, self.weight, A):
            return fused_lora_linear(x, weight.T, self.bias, A, B, self.scaling, _dropout_p(self),
                                     ((0, self.out_features, 0, 0),), self.r)
        result = F.linear(x, weight, self.bias)
        h = F.linear(self.lora_dropout(_lora_input(x, A)), A)  # (..., in) -> (..., r)
        return result + F.linear(h * self.scaling, B).to(result.dtype)  # (..., r) -> (..., out)

    def merge(self, safe: bool = False) -> None:
        """Fold the update into ``weight`` (fp32 sum, one cast). Idempotent. ``safe`` refuses a non-finite delta."""
        _merge(self, safe)

    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the previous ``weight`` bit for bit. Idempotent."""
        _unmerge(self)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------------------------
# MergedLinear


def _split_layout(out_features: int, enable_lora: Sequence[bool], split_sizes: Sequence[int] | None) -> tuple[int, ...]:
    if len(enable_lora) == 0 or not all(isinstance(e, (bool, int)) for e in enable_lora):
        raise ValueError(f"enable_lora must be a non-empty list of bools, got enable_lora={list(enable_lora)!r}")
    if split_sizes is None:
        if out_features % len(enable_lora) != 0:
            raise ValueError(
                f"out_features={out_features} is not divisible by len(enable_lora)={len(enable_lora)} "
                f"(enable_lora={list(enable_lora)!r}); "
                f"pass split_sizes for unequal slices")
        return (out_features // len(enable_lora),) * len(enable_lora)
    sizes = tuple(split_sizes)
    if len(sizes) != len(enable_lora) or any(not isinstance(s, int) or s <= 0 for s in sizes) or sum(sizes) != out_features:
        raise ValueError(
            f"split_sizes={list(sizes)!r} must be {len(enable_lora)} positive ints (one per enable_lora entry) "
            f"summing to out_features={out_features}")
    return sizes


class MergedLinear(nn.Linear):
    """One fused projection (e.g. Phi-3's ``qkv_proj``) with a separate LoRA per enabled slice of its outputs.

    The output rows are split into ``split_sizes`` (default: ``len(enable_lora)`` equal parts, as loralib); slice
    ``i`` gets its own rank-``r`` update when ``enable_lora[i]``. Parameters, as loralib's:
    ``lora_A: (r * n_enabled, in_features)`` (the enabled slices' A matrices stacked) and
    ``lora_B: (sum of enabled slice sizes, r)`` (their B matrices stacked). The forward stays factored: it never
    builds the ``out x in`` delta.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        enable_lora: Sequence[bool] = (False,),
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        *,
        split_sizes: Sequence[int] | None = None,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_lora_args(r, lora_alpha, lora_dropout)
        self_sizes = _split_layout(out_features, enable_lora, split_sizes)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        _init_common(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.enable_lora = [bool(e) for e in enable_lora]
        self.split_sizes = self_sizes
        self.fan_in_fan_out = fan_in_fan_out
        starts = [sum(self_sizes[:i]) for i in range(len(self_sizes))]
        # (row offset in the output, number of rows) of each enabled slice; plain ints, so nothing to move.
        self.lora_slices = tuple((starts[i], self_sizes[i]) for i, e in enumerate(self.enable_lora) if e)
        if fan_in_fan_out:
            self.weight = nn.Parameter(self.weight.data.T.contiguous())
        if r > 0 and self.lora_slices:
            n_rows = sum(size for _, size in self.lora_slices)
            _new_lora_params(self, (r * len(self.lora_slices), in_features), (n_rows, r), lora_dtype)

    from_module = classmethod(Linear.from_module.__func__)  # same body: build on meta, adopt base's weight
    reset_lora_parameters = Linear.reset_lora_parameters

    def _blocks(self) -> list[tuple[int, int, int]]:
        """``(row_start, rows, first row in lora_B)`` per enabled slice."""
        starts_in_b = [sum(size for _, size in self.lora_slices[:i]) for i in range(len(self.lora_slices))]
        return [(start, size, b_row) for (start, size), b_row in zip(self.lora_slices, starts_in_b)]

    def _slice_params(self):
        """Yield ``(row_start, rows, A_i: (r, in), B_i: (rows, r))`` per enabled slice."""
        for i, (start, size, b_row) in enumerate(self._blocks()):
            yield start, size, self.lora_A[i * self.r:(i + 1) * self.r], self.lora_B[b_row:b_row + size]

    def delta_weight(self) -> torch.Tensor:
        """The update in fp32 (fp64 for an fp64 adapter), shaped like ``weight``; rows of disabled slices are zero."""
        delta = torch.zeros(self.out_features, self.in_features, device=self.lora_A.device,
                            dtype=torch.promote_types(self.lora_A.dtype, torch.float32))
        for start, size, A_i, B_i in self._slice_params():
            delta[start:start + size] = (_wide(B_i) @ _wide(A_i)) * self.scaling  # (size, r) @ (r, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.T if self.fan_in_fan_out else self.weight
        if self.merged or not _has_lora(self):
            return F.linear(x, weight, self.bias)
        if _fusable(x, self.weight, self.lora_A):
            blocks = [(start, size, b_row, i * self.r) for i, (start, size, b_row) in enumerate(self._blocks())]
            return fused_lora_linear(x, weight.T, self.bias, self.lora_A, self.lora_B, self.scaling,
                                     _dropout_p(self), blocks, self.r)
        result = F.linear(x, weight, self.bias)
        h = F.linear(self.lora_dropout(_lora_input(x, self.lora_A)), self.lora_A) * self.scaling  # (..., r * n)
        for i, (start, size, _, B_i) in enumerate(self._slice_params()):
            # (..., r) @ (r, size) -> (..., size), added in place into this slice's columns of the output
            result[..., start:start + size] += F.linear(h[..., i * self.r:(i + 1) * self.r], B_i).to(result.dtype)
        return result

    merge = Linear.merge
    unmerge = Linear.unmerge

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, split_sizes={self.split_sizes}, "
                f"enable_lora={self.enable_lora}, merged={self.merged}")


# ---------------------------------------------------------------------------------------------------------------
# Embedding


class Embedding(nn.Embedding):
    """``nn.Embedding`` with a LoRA update: ``y = W[x] + scaling * (A^T)[x] B^T``.

    Signature as loralib's ``Embedding(num_embeddings, embedding_dim, r, lora_alpha, merge_weights, **kwargs)``.
    ``lora_A: (r, num_embeddings)`` starts at zero and ``lora_B: (embedding_dim, r)`` normal (loralib's choice, so
    the looked-up rows get a gradient from the start). ``padding_idx``: that row's update stays zero (its column of
    ``lora_A`` starts at zero and gets no gradient). ``max_norm``: the looked-up rows (base + update) are rescaled
    out of place, with the scale treated as a constant as torch does; no parameter is ever renormalised in place.
    ``lora_dropout`` (keyword) drops entries of the looked-up rank-``r`` rows.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: float = 1,
        merge_weights: bool = True,
        *,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        _check_lora_args(r, lora_alpha, lora_dropout)
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        _init_common(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = False
        if r > 0:
            _new_lora_params(self, (r, num_embeddings), (embedding_dim, r), lora_dtype)

    @classmethod
    def from_module(cls, base: nn.Embedding, **lora_kwargs: Any) -> "Embedding":
        """Wrap ``base``, adopting its weight object (no copy, no re-initialisation of the base)."""
        layer = cls(base.num_embeddings, base.embedding_dim, padding_idx=base.padding_idx, max_norm=base.max_norm,
                    norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
                    device="meta", dtype=base.weight.dtype, **lora_kwargs)
        return _adopt(layer, base)

    def reset_lora_parameters(self) -> None:
        """A zero, B standard normal (loralib's Embedding init: the update still starts at exactly zero)."""
        if _has_lora(self):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update in fp32 (fp64 for an fp64 adapter), shaped like ``weight``: ``scaling * (B @ A)^T``."""
        return (_wide(self.lora_B) @ _wide(self.lora_A)).T * self.scaling  # ((dim, r) @ (r, num))^T -> (num, dim)

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        # max_norm deliberately not passed: F.embedding would renormalise `table` in place.
        return F.embedding(x, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._lookup(x, self.weight)  # (...,) -> (..., dim)
        if _has_lora(self) and not self.merged:
            h = self.lora_dropout(self._lookup(x, self.lora_A.T))  # (..., r)
            result = result + F.linear(h * self.scaling, self.lora_B).to(result.dtype)  # (..., r) -> (..., dim)
        if self.max_norm is not None:
            # torch's embedding_renorm_: rows whose norm exceeds max_norm are scaled by max_norm / (norm + 1e-7).
            with torch.no_grad():
                norm = result.norm(p=self.norm_type, dim=-1, keepdim=True)
                scale = torch.where(norm > self.max_norm, self.max_norm / (norm + 1e-7), torch.ones_like(norm))
            result = result * scale
        return result

    merge = Linear.merge
    unmerge = Linear.unmerge

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------------------------
# Convolutions


class _ConvLoRA(nn.modules.conv._ConvNd):
    """Shared body of ``Conv1d``/``Conv2d``/``Conv3d``; each of those is also its ``nn.ConvNd``.

    Update: ``delta = scaling * (B @ A).view(weight.shape)`` with ``A: (r, in_channels // groups * prod(kernel))``
    and ``B: (out_channels, r)``. The forward is factored: a conv of the input with ``A`` (``r`` output channels per
    group, same stride/padding/dilation as the base), then a 1x1 grouped conv with ``B``.
    """

    _conv: Any  # F.conv1d / F.conv2d / F.conv3d, set by the subclasses

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        *,
        use_rslora: bool = False,
        lora_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        _check_lora_args(r, lora_alpha, lora_dropout)
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        _init_common(self, r, lora_alpha, lora_dropout, merge_weights, use_rslora)
        self.fan_in_fan_out = False
        if r > 0:
            fan_in = in_channels // self.groups * math.prod(self.kernel_size)
            _new_lora_params(self, (r, fan_in), (out_channels, r), lora_dtype)

    @classmethod
    def from_module(cls, base: nn.modules.conv._ConvNd, **lora_kwargs: Any) -> "_ConvLoRA":
        """Wrap ``base``, adopting its weight and bias objects (no copy, no re-initialisation of the base)."""
        layer = cls(base.in_channels, base.out_channels, base.kernel_size, stride=base.stride, padding=base.padding,
                    dilation=base.dilation, groups=base.groups, bias=base.bias is not None,
                    padding_mode=base.padding_mode, device="meta", dtype=base.weight.dtype, **lora_kwargs)
        return _adopt(layer, base)

    reset_lora_parameters = Linear.reset_lora_parameters

    def delta_weight(self) -> torch.Tensor:
        """The update in fp32 (fp64 for an fp64 adapter), shaped like ``weight``: ``(out, in // groups, *kernel)``."""
        return (_wide(self.lora_B) @ _wide(self.lora_A)).view(self.weight.shape) * self.scaling

    def _lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        g, r = self.groups, self.r
        x = self.lora_dropout(_lora_input(x, self.lora_A))
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        else:
            padding = self.padding
        # A as a conv weight, repeated per group: (g * r, in // g, *kernel) -> h: (N, g * r, *out_spatial)
        a = self.lora_A.view(r, -1, *self.kernel_size).repeat(g, *([1] * (1 + len(self.kernel_size))))
        h = self._conv(x, a, None, self.stride, padding, self.dilation, g)
        # B as a 1x1 grouped conv: (out, r, 1, ...): each output channel mixes the r channels of its group
        b = (self.lora_B * self.scaling).view(self.out_channels, r, *([1] * len(self.kernel_size)))
        return self._conv(h, b, None, 1, 0, 1, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not _has_lora(self):
            return self._conv_forward(x, self.weight, self.bias)
        # The fused conv runs the frozen filters inside a wider convolution; in 16-bit types the library may then
        # pick another kernel and round differently, so an adapter at init would no longer equal its base exactly.
        if (self.groups == 1 and not isinstance(self.padding, str) and _dropout_p(self) == 0
                and x.dtype in (torch.float32, torch.float64) and _fusable(x, self.weight, self.lora_A)):
            padding = self.padding
            if self.padding_mode != "zeros":
                x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0,) * len(padding)
            A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # fp32 adapters run in the base's dtype
            return fused_lora_conv(x, self.weight, self.bias, A.view(self.r, -1, *self.kernel_size), B,
                                   self.scaling, self.stride, padding, self.dilation)
        result = self._conv_forward(x, self.weight, self.bias)
        return result + self._lora_branch(x).to(result.dtype)

    merge = Linear.merge
    unmerge = Linear.unmerge

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}"


class Conv1d(_ConvLoRA, nn.Conv1d):
    """``nn.Conv1d`` with a LoRA update; see :class:`_ConvLoRA`. ``x: (N, C_in, L)``."""

    _conv = staticmethod(F.conv1d)


class Conv2d(_ConvLoRA, nn.Conv2d):
    """``nn.Conv2d`` with a LoRA update; see :class:`_ConvLoRA`. ``x: (N, C_in, H, W)``."""

    _conv = staticmethod(F.conv2d)


class Conv3d(_ConvLoRA, nn.Conv3d):
    """``nn.Conv3d`` with a LoRA update; see :class:`_ConvLoRA`. ``x: (N, C_in, D, H, W)``."""

    _conv = staticmethod(F.conv3d)


for _cls in (Linear, MergedLinear, Embedding, Conv1d, Conv2d, Conv3d):
    LoRALayer.register(_cls)


def is_lora_layer(module: nn.Module) -> bool:
    """True for this library's LoRA layers and for loralib-style ``LoRALayer`` subclasses."""
    return isinstance(module, LoRALayer)
