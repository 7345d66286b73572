"""LoRA layers: each one *is* the torch layer it adapts, plus a low-rank update.

A LoRA layer computes ``base(x) + scaling * B(A(dropout(x)))`` where ``A`` has ``r`` rows, ``B`` starts at zero
(so a fresh layer equals its base exactly) and ``scaling = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with
``use_rslora=True``, Kalajdzievski 2023). The state-dict keys are loralib's: ``weight``, ``bias``, ``lora_A``,
``lora_B``. What the kinds share lives in :class:`lora.base.LoRABase`; each class here fills in its contract.

Differences from loralib 0.1.2, on purpose:

* ``train()`` / ``eval()`` never touch a parameter. loralib merges the update into ``weight`` on ``eval()`` and
  subtracts it on ``train()``; that drifts low-precision weights and applies LoRA twice when a state dict saved in
  eval mode is loaded. ``merge_weights`` is accepted for signature compatibility and kept as an attribute, but
  merging only ever happens when asked for (:func:`lora.merge_lora`), and a merged layer's state dict holds the
  unmerged weight.
* ``MergedLinear`` takes ``split_sizes`` for unequal slices (grouped-query ``qkv``) and its forward stays factored.
* The conv layers subclass ``nn.ConvNd`` directly (keys ``weight``/``lora_A``/``lora_B``, not loralib's
  ``conv.weight``), support tuple kernels, groups, dilation and every padding mode, and apply dropout. The update is
  ``B @ A`` with ``A: (r, in_channels // groups * prod(kernel_size))`` and ``B: (out_channels, r)``, reshaped to the
  conv weight's shape (loralib's Conv2d uses ``r * k`` x ``in * k`` blocks instead).
* ``Embedding`` honours ``padding_idx`` and applies ``max_norm`` out of place, never rescaling a parameter.
* LoRA parameters over a bf16/fp16 base are kept in fp32 by default (as PEFT does); see ``lora_dtype``.
* Speed: ``Linear``/``MergedLinear`` run one fused autograd node (:mod:`lora.functional`) that accumulates the
  low-rank product into the frozen GEMM's output. It serves both ways of training in 16 bits: 16-bit weights
  without autocast (fp32 adapters are used in the weights' dtype), and autocast over any weights (everything in the
  autocast dtype, as autocast itself would compute it). Under torch.compile they call the same computation
  registered as a custom op (``lora::fused_lora_linear``), which the compiler keeps as one node and fuses around;
  the conv kinds run their plain ops there. An ungrouped fp32 conv without dropout convolves with the merged
  filters ``W + s B A``, so at init it equals the plain conv to within rounding (about 1e-7 relative), not bit for
  bit.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoRABase, LoRALayer, check_lora_args, has_adapter, is_lora_layer
from .functional import _gemm_dtype, _wide, fused_lora_conv, fused_lora_linear  # _wide: fp32, or fp64 if it is
from .adapters import is_routed, routed_forward
from .qlora import Weight4bit, base_linear  # a 4-bit (NF4) frozen weight, and F.linear that also takes one

__all__ = [
    "LoRALayer",
    "LoRABase",
    "Linear",
    "MergedLinear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "is_lora_layer",
    "KINDS",
    "kind_for",
]


def _lora_input(x: torch.Tensor, lora_param: torch.Tensor) -> torch.Tensor:
    # An fp32 adapter over a bf16 base sees the input in fp32; under autocast the matmuls pick their own dtype.
    if x.dtype != lora_param.dtype and not torch.is_autocast_enabled(x.device.type):
        return x.to(lora_param.dtype)
    return x


def _emulated_low_rank_dtype(x: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype of the plain ops' low-rank products (the adapter's, or autocast's) where this CPU would
    emulate it (:func:`lora.functional._gemm_dtype`), else None. Those products then run as fp32 GEMMs over the
    exactly upcast 16-bit operands, each result rounded to the 16-bit dtype (:func:`_as_16_bit`): the 16-bit values
    at fp32 speed, as the fused functions compute them."""
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else lora_A.dtype
    return dtype if _gemm_dtype(dtype, x.device) is not None else None


def _as_16_bit(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t``'s values in ``dtype``, held in fp32 (differentiable); ``t`` itself where ``dtype`` is None (no
    emulated 16-bit products here, see :func:`_emulated_low_rank_dtype`)."""
    return t if dtype is None else t.to(dtype).float()


def _fused_dtype(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused autograd functions of :mod:`lora.functional` run in here, or None for the plain ops.

    Under autocast: its dtype, for every floating input below fp64 (what autocast's own matmuls would use). Without
    it: the weight's dtype when the input has it and the LoRA parameters have it or are fp32 (then used in the
    weight's dtype, as autocast would: the LoRA term is rounded to the base's precision when added anyway). Never
    across devices or over a 4-bit weight. Under torch.compile the same conditions hold: the linear kinds then
    call the fused path's custom op (:mod:`lora.functional`), one opaque node in the graph.
    """
    if x.device != weight.device or isinstance(weight, Weight4bit):
        return None
    if torch.is_autocast_enabled(x.device.type):
        autocast_dtype = torch.get_autocast_dtype(x.device.type)
        ok = all(t.is_floating_point() and t.dtype != torch.float64 for t in (x, weight, lora_A))
        return autocast_dtype if ok else None
    if x.dtype == weight.dtype and lora_A.dtype in (x.dtype, torch.float32):
        return x.dtype
    return None


def _dropout_p(layer: LoRABase) -> float:
    """The dropout probability the fused path must apply now (0 in eval mode)."""
    d = layer.lora_dropout
    return d.p if isinstance(d, nn.Dropout) and d.training else 0.0


def _linear_shapes(base_shape: Sequence[int], fan_in_fan_out: bool) -> tuple[int, int]:
    """(out, in) of a linear weight stored as (out, in), or as (in, out) with ``fan_in_fan_out``."""
    return (base_shape[1], base_shape[0]) if fan_in_fan_out else (base_shape[0], base_shape[1])


class _LinearKind(LoRABase):
    """What ``Linear`` and ``MergedLinear`` share: the torch layer they adapt and its GPT-2 (``fan_in_fan_out``)
    layout."""

    adapts = nn.Linear

    @staticmethod
    def base_kwargs(module: nn.Module) -> dict[str, Any]:
        return {"in_features": module.in_features, "out_features": module.out_features, "bias": module.bias is not None}

    @classmethod
    def peft_shapes(cls, module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, module.in_features), (module.out_features, rank)  # PEFT's (r, in), (out, r) in any layout

    def _weight_out_in(self) -> torch.Tensor:
        return self.weight.T if self.fan_in_fan_out else self.weight

    supports_mutating_init = True

    def _block_rows(self) -> list[tuple[int, int, int]]:
        """``(row_start, rows, first row in lora_B)`` per adapted block of output rows (the i-th block's A is
        ``lora_A[i * r:(i + 1) * r]``)."""
        return [(0, self.out_features, 0)]

    def _mutating_init(self, init: str) -> None:
        """PEFT's PiSSA / OLoRA, per block of rows (per slice for a ``MergedLinear``), computed in fp32:

        * ``"pissa"``: ``W_blk = U S V^T`` (SVD); ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``, so that
          ``s B A`` is the best rank-``r`` approximation of the block; ``"pissa_niter_<k>"``: the same from
          ``torch.svd_lowrank(W_blk, r, niter=k)`` (randomised, as PEFT);
        * ``"olora"``: ``W_blk = Q R``; ``A = R[:r]``, ``B = Q[:, :r]``;

        then ``W_blk -= s B A`` (with A and B as stored, so the layer's output is unchanged up to rounding).
        """
        r, w_all = self.r, self._weight_out_in()
        for i, (start, size, b_row) in enumerate(self._block_rows()):
            w = _wide(w_all[start : start + size])  # (size, in)
            if init == "olora":
                q, rr = torch.linalg.qr(w)
                a, b = rr[:r], q[:, :r]
            else:
                if init == "pissa":
                    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                    u, sv, vh = u[:, :r], sv[:r], vh[:r]
                else:
                    u, sv, v = torch.svd_lowrank(w, r, niter=int(init.removeprefix("pissa_niter_")))
                    vh = v.T
                root = (sv / self.scaling).sqrt()
                a, b = root[:, None] * vh, u * root[None, :]  # (r, in), (size, r)
            self.lora_A[i * r : (i + 1) * r] = a
            self.lora_B[b_row : b_row + size] = b
        self._subtract_initial(self.lora_A.detach(), self.lora_B.detach())

    def _check_mutating_init(self) -> None:
        smallest = min([size for _, size, _ in self._block_rows()] + [self.in_features])
        if self.r > smallest:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} needs r <= min(rows of each adapted block, "
                f"in_features) = {smallest}, got r={self.r}"
            )

    def _subtract_initial(self, A0: torch.Tensor, B0: torch.Tensor, sign: float = 1.0) -> None:
        """``W <- W - sign * s B0 A0`` per block (fp32, one cast): to and from the residual base PiSSA / OLoRA
        train on."""
        r, w_all = self.r, self._weight_out_in()
        with torch.no_grad():
            for i, (start, size, b_row) in enumerate(self._block_rows()):
                w = _wide(w_all[start : start + size])
                # (size, r) @ (r, in) -> (size, in)
                w.sub_(_wide(B0[b_row : b_row + size]) @ _wide(A0[i * r : (i + 1) * r]), alpha=sign * self.scaling)
                w_all[start : start + size] = w.to(w_all.dtype)
        self._dora_key = None

    def restore_original_base(self) -> None:
        """Undo a PiSSA / OLoRA initialisation's subtraction (``W += s B0 A0``, to within one rounding) and forget
        the initial adapter: the base is the original one again. Nothing to do for other initialisations."""
        if self.lora_A_init is not None:
            self._subtract_initial(self.lora_A_init, self.lora_B_init, sign=-1.0)
            self.lora_A_init = self.lora_B_init = None
            self.init_lora_weights = "default"

    def adopt_initial(self, init: str, A0: torch.Tensor, B0: torch.Tensor) -> None:
        """Make this layer the PiSSA / OLoRA layer whose initial adapter was ``(A0, B0)``: back to the original base
        if it had an initial adapter of its own, then subtract ``s B0 A0`` and keep them for conversion. For loading
        an unconverted adapter (onto the original base, or to resume training)."""
        self.restore_original_base()
        self.init_lora_weights = init
        self._subtract_initial(A0, B0)
        self.lora_A_init = A0.to(self.lora_A.dtype).clone()
        self.lora_B_init = B0.to(self.lora_B.dtype).clone()
        self._dora_key = None

    def converted_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A PiSSA / OLoRA adapter as a plain LoRA of rank ``2r`` over the *original* base (PEFT's
        ``path_initial_model_for_weight_conversion``): ``s (B A - B0 A0) = s [B | -B0] [A ; A0]``, per block.
        Returns ``(A': (2r * blocks, in), B': (rows, 2r))`` in this layer's layout (its scaling is unchanged when
        ``lora_alpha`` is doubled, or multiplied by sqrt(2) with rsLoRA)."""
        if self.lora_A_init is None:
            raise ValueError(
                f"{type(self).__name__} has init_lora_weights={self.init_lora_weights!r}: there is no "
                f"initial adapter to convert from"
            )
        r, A, B = self.r, self.lora_A.detach(), self.lora_B.detach()
        A0, B0 = self.lora_A_init, self.lora_B_init
        a_parts, b_parts = [], []
        for i, (_, size, b_row) in enumerate(self._block_rows()):
            a_parts += [A[i * r : (i + 1) * r], A0[i * r : (i + 1) * r]]
            b_parts.append(torch.cat([B[b_row : b_row + size], -B0[b_row : b_row + size]], dim=1))
        return torch.cat(a_parts), torch.cat(b_parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in)`` -> ``(..., out)``: the frozen product (4-bit weights included) plus the adapter, by
        the kind's ``_lora_forward`` (or DoRA's); other adapters and mixed batches go through :mod:`lora.adapters`."""
        if is_routed(self):  # another adapter than the default, or a mixed batch (lora.adapters)
            return routed_forward(self, x)
        if self.merged or not has_adapter(self):
            return base_linear(x, self._weight_out_in(), self.bias)
        if self.use_dora:
            return self._dora_forward(x)
        return self._lora_forward(x, self.bias, dropout=True)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA: ``f * (x W^T + s x A^T B^T) + b`` with ``f = magnitude / ||W + s B A||`` per output (1 for rows
        without a magnitude). Under dropout, PEFT's form: ``x W^T + b + (f - 1) * d W^T + f * s d A^T B^T`` with
        ``d = dropout(x)``."""
        f = self._spread(self.dora_scale())  # (out,), differentiable in the magnitude
        weight = self._weight_out_in()
        if _dropout_p(self) == 0:
            z = self._lora_forward(x, None, dropout=False)  # (..., out): x W^T + s x A^T B^T, one fused node
            f = f.to(z.dtype)
            return z * f if self.bias is None else torch.addcmul(self.bias.to(z.dtype), z, f)
        d = self.lora_dropout(_lora_input(x, self.lora_A))
        dw = base_linear(d.to(weight.dtype), weight, None)  # (..., out): the second GEMM PEFT's form needs
        h = F.linear(d, self.lora_A) * self.scaling  # (..., r * n_blocks)
        blocks = self._lora_blocks()
        low_rank = dw.new_zeros(dw.shape) if len(blocks) > 1 or blocks[0][1] != self.out_features else None
        for i, (start, size, _, B_i) in enumerate(blocks):
            part = F.linear(h[..., i * self.r : (i + 1) * self.r], B_i).to(dw.dtype)  # (..., r) @ (r, size)
            if low_rank is None:
                low_rank = part
            else:
                low_rank[..., start : start + size] = part
        return base_linear(x, weight, self.bias) + (f - 1).to(dw.dtype) * dw + f.to(dw.dtype) * low_rank

    def _lora_blocks(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(row_start, rows, A_i, B_i)`` per adapted block of output rows."""
        return [(0, self.out_features, self.lora_A, self.lora_B)]

    def _delta_out_in(self, blocks: Sequence[tuple[int, int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``scaling * B_i @ A_i`` in rows ``[start, start + size)`` of each block, in fp32 (fp64 for an fp64
        adapter), laid out like ``weight`` and contiguous."""
        if len(blocks) == 1 and blocks[0][1] == self.out_features:  # one block over every row: no zero fill
            _, _, A, B = blocks[0]
            # (in, r) @ (r, out) in GPT-2's (in, out) layout, else (out, r) @ (r, in)
            delta = _wide(A).T @ _wide(B).T if self.fan_in_fan_out else _wide(B) @ _wide(A)
            return delta.mul_(self.scaling)
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        delta = torch.zeros(tuple(self.weight.shape), device=self.lora_A.device, dtype=dtype)
        for start, size, A_i, B_i in blocks:
            if self.fan_in_fan_out:  # (in, r) @ (r, size) -> columns of the (in, out) weight
                delta[:, start : start + size] = _wide(A_i).T @ _wide(B_i).T
            elif torch.is_grad_enabled():  # (size, r) @ (r, in) -> rows of the (out, in) weight
                delta[start : start + size] = _wide(B_i) @ _wide(A_i)
            else:  # merging: straight into the rows, no second slice-sized temporary
                torch.mm(_wide(B_i), _wide(A_i), out=delta[start : start + size])
        return delta.mul_(self.scaling)


# ---------------------------------------------------------------------------------------------------------------
# Linear


class Linear(_LinearKind, nn.Linear):
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
        use_dora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_lora_args(r, lora_alpha, lora_dropout)
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(
            r,
            lora_alpha,
            lora_dropout,
            merge_weights,
            use_rslora,
            lora_dtype,
            fan_in_fan_out,
            use_dora,
            init_lora_weights,
        )

    @classmethod
    def lora_shapes(
        cls, base_shape: Sequence[int], r: int, fan_in_fan_out: bool = False, **lora_fields: Any
    ) -> dict[str, tuple[int, ...]]:
        out_f, in_f = _linear_shapes(base_shape, fan_in_fan_out)
        return {"lora_A": (r, in_f), "lora_B": (out_f, r)}

    def lora_delta(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32 (fp64 for an fp64 adapter), shaped like ``weight`` (``(in, out)`` if
        ``fan_in_fan_out``)."""
        return self._delta_out_in([(0, self.out_features, self.lora_A, self.lora_B)])

    def _lora_forward(self, x: torch.Tensor, bias: torch.Tensor | None, dropout: bool) -> torch.Tensor:
        """``x W^T + bias + s dropout(x) A^T B^T`` (no dropout unless ``dropout``)."""
        weight = self._weight_out_in()
        A, B = self.lora_A, self.lora_B
        dtype = _fused_dtype(x, self.weight, A)
        if dtype is not None:
            return fused_lora_linear(
                x,
                weight.T,
                bias,
                A,
                B,
                self.scaling,
                _dropout_p(self) if dropout else 0.0,
                ((0, self.out_features, 0, 0),),
                self.r,
                compute_dtype=dtype,
            )
        result = base_linear(x, weight, bias)
        low = _emulated_low_rank_dtype(x, A)  # with it: the same products as fp32 GEMMs, each rounded to low
        with torch.autocast(x.device.type, enabled=False) if low else contextlib.nullcontext():
            x = _as_16_bit(x, low) if low else _lora_input(x, A)
            A, B = _as_16_bit(A, low), _as_16_bit(B, low)
            h = _as_16_bit(F.linear(self.lora_dropout(x) if dropout else x, A) * self.scaling, low)  # (..., r)
            return result + _as_16_bit(F.linear(h, B), low).to(result.dtype)  # (..., r) -> (..., out)


# ---------------------------------------------------------------------------------------------------------------
# MergedLinear


def _split_layout(out_features: int, enable_lora: Sequence[bool], split_sizes: Sequence[int] | None) -> tuple[int, ...]:
    if len(enable_lora) == 0 or not all(isinstance(e, (bool, int)) for e in enable_lora):
        raise ValueError(f"enable_lora must be a non-empty list of bools, got enable_lora={list(enable_lora)!r}")
    if split_sizes is None:
        if out_features % len(enable_lora) != 0:
            raise ValueError(
                f"out_features={out_features} is not divisible by len(enable_lora)={len(enable_lora)} "
                f"(enable_lora={list(enable_lora)!r}); pass split_sizes for unequal slices"
            )
        return (out_features // len(enable_lora),) * len(enable_lora)
    sizes = tuple(split_sizes)
    if (
        len(sizes) != len(enable_lora)
        or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes)
        or sum(sizes) != out_features
    ):
        raise ValueError(
            f"split_sizes={list(sizes)!r} must be {len(enable_lora)} positive ints (one per enable_lora entry) "
            f"summing to out_features={out_features}"
        )
    return sizes


class MergedLinear(_LinearKind, nn.Linear):
    """One fused projection (e.g. Phi-3's ``qkv_proj``) with a separate LoRA per enabled slice of its outputs.

    The output rows are split into ``split_sizes`` (default: ``len(enable_lora)`` equal parts, as loralib); slice
    ``i`` gets its own rank-``r`` update when ``enable_lora[i]``. Parameters, as loralib's:
    ``lora_A: (r * n_enabled, in_features)`` (the enabled slices' A matrices stacked) and
    ``lora_B: (sum of enabled slice sizes, r)`` (their B matrices stacked). The forward stays factored: it never
    builds the ``out x in`` delta.
    """

    lora_fields = {"split_sizes": (list,), "enable_lora": (list,)}

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
        use_dora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_lora_args(r, lora_alpha, lora_dropout)
        sizes = _split_layout(out_features, enable_lora, split_sizes)
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.enable_lora = [bool(e) for e in enable_lora]
        self.split_sizes = sizes
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        # (row offset in the output, number of rows) of each enabled slice; plain ints, so nothing to move.
        self.lora_slices = tuple((starts[i], sizes[i]) for i, e in enumerate(self.enable_lora) if e)
        self._init_lora(
            r,
            lora_alpha,
            lora_dropout,
            merge_weights,
            use_rslora,
            lora_dtype,
            fan_in_fan_out,
            use_dora,
            init_lora_weights,
        )

    @classmethod
    def lora_shapes(
        cls,
        base_shape: Sequence[int],
        r: int,
        fan_in_fan_out: bool = False,
        *,
        split_sizes: Sequence[int] = (),
        enable_lora: Sequence[bool] = (),
        **lora_fields: Any,
    ) -> dict[str, tuple[int, ...]]:
        _, in_f = _linear_shapes(base_shape, fan_in_fan_out)
        rows = [s for s, e in zip(split_sizes, enable_lora) if e]
        return {"lora_A": (r * len(rows), in_f), "lora_B": (sum(rows), r)} if rows else {}

    @classmethod
    def check_fields(cls, info: dict[str, Any]) -> str | None:
        sizes, enable = info["split_sizes"], info["enable_lora"]
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            return f"split_sizes={sizes!r} must be a list of positive ints"
        if not all(isinstance(e, bool) for e in enable) or len(enable) != len(sizes) or not any(enable):
            return f"enable_lora={enable!r} must be one bool per split_sizes entry ({len(sizes)}), at least one True"
        out_f, _ = _linear_shapes(info["base_shape"], info.get("fan_in_fan_out", False))
        if sum(sizes) != out_f:
            return (
                f"split_sizes={sizes!r} sum to {sum(sizes)}, not the {out_f} output rows of "
                f"base_shape={info['base_shape']!r}"
            )
        return None

    @classmethod
    def magnitude_shape(
        cls,
        base_shape: Sequence[int],
        fan_in_fan_out: bool = False,
        *,
        split_sizes: Sequence[int] = (),
        enable_lora: Sequence[bool] = (),
        **lora_fields: Any,
    ) -> tuple[int, ...]:
        """DoRA per slice: one magnitude per row of the enabled slices (as PEFT's DoRA on the unfused modules)."""
        return (sum(s for s, e in zip(split_sizes, enable_lora) if e),)

    def _magnitude_rows(self) -> torch.Tensor:
        return torch.cat([torch.arange(start, start + size) for start, size in self.lora_slices])

    def _blocks(self) -> list[tuple[int, int, int]]:
        """``(row_start, rows, first row in lora_B)`` per enabled slice."""
        starts_in_b = [sum(size for _, size in self.lora_slices[:i]) for i in range(len(self.lora_slices))]
        return [(start, size, b_row) for (start, size), b_row in zip(self.lora_slices, starts_in_b)]

    def _slice_params(self):
        """Yield ``(row_start, rows, A_i: (r, in), B_i: (rows, r))`` per enabled slice."""
        for i, (start, size, b_row) in enumerate(self._blocks()):
            yield start, size, self.lora_A[i * self.r : (i + 1) * self.r], self.lora_B[b_row : b_row + size]

    def _lora_blocks(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        return list(self._slice_params())

    def _block_rows(self) -> list[tuple[int, int, int]]:
        return self._blocks()

    def lora_delta(self) -> torch.Tensor:
        """The update in fp32 (fp64 for an fp64 adapter), shaped like ``weight``; rows of disabled slices are zero."""
        return self._delta_out_in(list(self._slice_params()))

    def peft_factors(self, converted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # k slices of rank r -> one rank r*k LoRA on the fused matrix: A stacked (it already is), B block-structured.
        A, B_stacked = self.converted_factors() if converted else (self.lora_A.detach(), self.lora_B.detach())
        r = A.shape[0] // len(self.lora_slices)  # 2r per slice when converted
        B = torch.zeros(self.out_features, A.shape[0], dtype=A.dtype, device=A.device)  # (out, r * k)
        for i, (start, size, b_row) in enumerate(self._blocks()):
            B[start : start + size, i * r : (i + 1) * r] = B_stacked[b_row : b_row + size]
        return A, B

    def _lora_forward(self, x: torch.Tensor, bias: torch.Tensor | None, dropout: bool) -> torch.Tensor:
        """``x W^T + bias`` plus each enabled slice's ``s dropout(x) A_i^T B_i^T`` (no dropout unless ``dropout``)."""
        weight = self._weight_out_in()
        dtype = _fused_dtype(x, self.weight, self.lora_A)
        if dtype is not None:
            blocks = [(start, size, b_row, i * self.r) for i, (start, size, b_row) in enumerate(self._blocks())]
            return fused_lora_linear(
                x,
                weight.T,
                bias,
                self.lora_A,
                self.lora_B,
                self.scaling,
                _dropout_p(self) if dropout else 0.0,
                blocks,
                self.r,
                compute_dtype=dtype,
            )
        result = base_linear(x, weight, bias)
        low = _emulated_low_rank_dtype(x, self.lora_A)  # with it: fp32 GEMMs rounded to low, as in Linear
        with torch.autocast(x.device.type, enabled=False) if low else contextlib.nullcontext():
            x = _as_16_bit(x, low) if low else _lora_input(x, self.lora_A)
            A = _as_16_bit(self.lora_A, low)
            h = _as_16_bit(F.linear(self.lora_dropout(x) if dropout else x, A) * self.scaling, low)  # (..., r * n)
            for i, (start, size, _, B_i) in enumerate(self._slice_params()):
                # (..., r) @ (r, size) -> (..., size), added in place into this slice's columns of the output
                y = F.linear(h[..., i * self.r : (i + 1) * self.r], _as_16_bit(B_i, low))
                result[..., start : start + size] += _as_16_bit(y, low).to(result.dtype)
        return result


# ---------------------------------------------------------------------------------------------------------------
# Embedding


class Embedding(LoRABase, nn.Embedding):
    """``nn.Embedding`` with a LoRA update: ``y = W[x] + scaling * (A^T)[x] B^T``.

    Signature as loralib's ``Embedding(num_embeddings, embedding_dim, r, lora_alpha, merge_weights, **kwargs)``.
    ``lora_A: (r, num_embeddings)`` starts at zero and ``lora_B: (embedding_dim, r)`` normal (loralib's choice, so
    the looked-up rows get a gradient from the start). ``padding_idx``: that row's update stays zero (its column of
    ``lora_A`` starts at zero and gets no gradient). ``max_norm``: the looked-up rows (base + update) are rescaled
    out of place, with the scale treated as a constant as torch does; no parameter is ever renormalised in place.
    ``lora_dropout`` (keyword) drops entries of the looked-up rank-``r`` rows.
    """

    adapts = nn.Embedding
    peft_keys = ("lora_embedding_A", "lora_embedding_B")

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
        use_dora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        check_lora_args(r, lora_alpha, lora_dropout)
        if use_dora and kwargs.get("max_norm") is not None:
            raise ValueError(
                f"use_dora=True with max_norm={kwargs['max_norm']} is not supported: DoRA's magnitude "
                f"and max_norm both rescale the looked-up rows"
            )
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._init_lora(
            r,
            lora_alpha,
            lora_dropout,
            merge_weights,
            use_rslora,
            lora_dtype,
            use_dora=use_dora,
            init_lora_weights=init_lora_weights,
        )

    @staticmethod
    def base_kwargs(module: nn.Module) -> dict[str, Any]:
        return {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
            "max_norm": module.max_norm,
            "norm_type": module.norm_type,
            "scale_grad_by_freq": module.scale_grad_by_freq,
            "sparse": module.sparse,
        }

    @classmethod
    def lora_shapes(
        cls, base_shape: Sequence[int], r: int, fan_in_fan_out: bool = False, **lora_fields: Any
    ) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (r, base_shape[0]), "lora_B": (base_shape[1], r)}

    @classmethod
    def check_peft_compatible(cls, name: str, module: nn.Module) -> None:
        if module.max_norm is not None:
            # PEFT passes max_norm to the lookup of lora_embedding_A (renormalising the adapter in place); this
            # library renormalises base + update together.
            raise ValueError(f"module {name!r}: PEFT's LoRA Embedding handles max_norm={module.max_norm} differently")

    def _gaussian_init(self) -> None:
        """PEFT's "gaussian" leaves its embedding LoRA at the embedding initialisation (A zero, B normal): so here."""

    @classmethod
    def magnitude_dim(cls, fan_in_fan_out: bool = False) -> int:
        # PEFT's DoRA embedding: one magnitude per embedding dimension, the norm taken over the vocabulary
        return 1

    def reset_lora_parameters(self) -> None:
        """A zero, B standard normal (loralib's Embedding init: the update still starts at exactly zero)."""
        if has_adapter(self):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def lora_delta(self) -> torch.Tensor:
        """The update in fp32 (fp64 for an fp64 adapter), shaped like ``weight``: ``scaling * (B @ A)^T``."""
        delta = _wide(self.lora_A).T @ _wide(self.lora_B).T  # (num, r) @ (r, dim) -> (num, dim)
        return delta.mul_(self.scaling)

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        # max_norm deliberately not passed: F.embedding would renormalise `table` in place.
        return F.embedding(x, table, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, self.sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self._lookup(x, self.weight)  # (...,) -> (..., dim)
        if has_adapter(self) and not self.merged:
            h = self.lora_dropout(self._lookup(x, self.lora_A.T))  # (..., r)
            result = result + F.linear(h * self.scaling, self.lora_B).to(result.dtype)  # (..., r) -> (..., dim)
            if self.use_dora:  # DoRA: each embedding dimension rescaled by magnitude / ||its column of W + dW||
                result = result * self.dora_scale().to(result.dtype)
        if self.max_norm is not None:
            # torch's embedding_renorm_: rows whose norm exceeds max_norm are scaled by max_norm / (norm + 1e-7).
            with torch.no_grad():
                norm = result.norm(p=self.norm_type, dim=-1, keepdim=True)
                scale = torch.where(norm > self.max_norm, self.max_norm / (norm + 1e-7), torch.ones_like(norm))
            result = result * scale
        return result


# ---------------------------------------------------------------------------------------------------------------
# Convolutions


class _ConvLoRA(LoRABase, nn.modules.conv._ConvNd):
    """Shared body of ``Conv1d``/``Conv2d``/``Conv3d``; each of those is also its ``nn.ConvNd``.

    Update: ``delta = scaling * (B @ A).view(weight.shape)`` with ``A: (r, in_channels // groups * prod(kernel))``
    and ``B: (out_channels, r)``. The plain forward is factored: a conv of the input with ``A`` (``r`` output
    channels per group, same stride/padding/dilation as the base), then a 1x1 grouped conv with ``B``.
    """

    _conv: Any  # F.conv1d / F.conv2d / F.conv3d, set by the subclasses
    base_fields = {
        "stride": (list,),
        "padding": (list, str),
        "dilation": (list,),
        "groups": (int,),
        "padding_mode": (str,),
    }

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
        use_dora: bool = False,
        init_lora_weights: str = "default",
        lora_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        check_lora_args(r, lora_alpha, lora_dropout)
        self.adapts.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(
            r,
            lora_alpha,
            lora_dropout,
            merge_weights,
            use_rslora,
            lora_dtype,
            use_dora=use_dora,
            init_lora_weights=init_lora_weights,
        )

    @staticmethod
    def base_kwargs(module: nn.Module) -> dict[str, Any]:
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "groups": module.groups,
            "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }

    @classmethod
    def lora_shapes(
        cls, base_shape: Sequence[int], r: int, fan_in_fan_out: bool = False, **lora_fields: Any
    ) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (r, math.prod(base_shape[1:])), "lora_B": (base_shape[0], r)}

    @classmethod
    def check_fields(cls, info: dict[str, Any]) -> str | None:
        for f in ("stride", "dilation"):
            if f in info and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in info[f]):
                return f"{f}={info[f]!r} must be a list of positive ints"
        pad = info.get("padding")
        if isinstance(pad, list) and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pad):
            return f"padding={pad!r} must be a list of non-negative ints or a string"
        return None

    @classmethod
    def check_peft_compatible(cls, name: str, module: nn.Module) -> None:
        # PEFT builds lora_A as Conv(in, r, kernel, stride, padding): no groups, dilation or padding_mode.
        if module.groups != 1:
            raise ValueError(
                f"module {name!r}: PEFT's conv LoRA differs from this library's for groups={module.groups}"
            )
        if any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
            raise ValueError(
                f"module {name!r}: PEFT's conv LoRA ignores dilation={module.dilation} / "
                f"padding_mode={module.padding_mode!r}; its output would differ"
            )

    @classmethod
    def peft_magnitude_shape(cls, module: nn.Module) -> tuple[int, ...]:
        return (1, module.out_channels, *(1,) * len(module.kernel_size))  # PEFT keeps its norm's keepdim shape

    @classmethod
    def peft_shapes(cls, module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ones = (1,) * len(module.kernel_size)  # groups == 1 (checked): lora_A is Conv(in, r, kernel), lora_B 1x1
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, *ones)

    def lora_delta(self) -> torch.Tensor:
        """The update in fp32 (fp64 for an fp64 adapter), shaped like ``weight``: ``(out, in // groups, *kernel)``."""
        return (_wide(self.lora_B) @ _wide(self.lora_A)).mul_(self.scaling).view(self.weight.shape)

    def _lora_branch(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        g, r = self.groups, self.r
        x = _lora_input(x, self.lora_A)
        x = self.lora_dropout(x) if dropout else x
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
        if self.merged or not has_adapter(self):
            return self._conv_forward(x, self.weight, self.bias)
        if self.use_dora:
            return self._dora_forward(x)
        return self._lora_forward(x, self.bias, dropout=True)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """DoRA (as :meth:`Linear._dora_forward`), with one magnitude per output channel."""
        ones = (1,) * len(self.kernel_size)
        f = self.dora_scale().view(-1, *ones)  # (out, 1, ...), differentiable in the magnitude
        if _dropout_p(self) == 0:
            z = self._lora_forward(x, None, dropout=False)  # (N, out, ...): conv(x, W) + LoRA branch
            f = f.to(z.dtype)
            return z * f if self.bias is None else torch.addcmul(self.bias.to(z.dtype).view(-1, *ones), z, f)
        d = self.lora_dropout(x)
        zd = self._lora_forward(d, None, dropout=False)
        return (
            self._conv_forward(x, self.weight, self.bias)
            + zd * f.to(zd.dtype)
            - self._conv_forward(d, self.weight, None)
        )

    def _lora_forward(self, x: torch.Tensor, bias: torch.Tensor | None, dropout: bool) -> torch.Tensor:
        """``conv(x, W) + bias`` plus the LoRA branch of ``dropout(x)`` (no dropout unless ``dropout``)."""
        # The fused conv uses the merged filters; in 16-bit types their rounding would make an adapter at init
        # differ from its base, so it runs in fp32/fp64 only (and without autocast, which picks its own dtypes).
        if (
            self.groups == 1
            and not isinstance(self.padding, str)
            and (_dropout_p(self) == 0 or not dropout)
            and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling()  # the plain ops, which the compiler traces and fuses itself
            and _fused_dtype(x, self.weight, self.lora_A) == x.dtype
        ):
            padding = self.padding
            if self.padding_mode != "zeros":
                x, padding = (
                    F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode),
                    (0,) * len(padding),
                )
            A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # fp32 adapters run in the base's dtype
            return fused_lora_conv(
                x,
                self.weight,
                bias,
                A.view(self.r, -1, *self.kernel_size),
                B,
                self.scaling,
                self.stride,
                padding,
                self.dilation,
            )
        result = self._conv_forward(x, self.weight, bias)
        return result + self._lora_branch(x, dropout).to(result.dtype)


class Conv1d(_ConvLoRA, nn.Conv1d):
    """``nn.Conv1d`` with a LoRA update; see :class:`_ConvLoRA`. ``x: (N, C_in, L)``."""

    adapts = nn.Conv1d
    base_ndim = 3
    _conv = staticmethod(F.conv1d)


class Conv2d(_ConvLoRA, nn.Conv2d):
    """``nn.Conv2d`` with a LoRA update; see :class:`_ConvLoRA`. ``x: (N, C_in, H, W)``."""

    adapts = nn.Conv2d
    base_ndim = 4
    _conv = staticmethod(F.conv2d)


class Conv3d(_ConvLoRA, nn.Conv3d):
    """``nn.Conv3d`` with a LoRA update; see :class:`_ConvLoRA`. ``x: (N, C_in, D, H, W)``."""

    adapts = nn.Conv3d
    base_ndim = 5
    _conv = staticmethod(F.conv3d)


# Every kind, by the name adapter files use. Injection, adapter files and PEFT derive what they need from these.
KINDS: dict[str, type[LoRABase]] = {c.__name__: c for c in (Linear, MergedLinear, Embedding, Conv1d, Conv2d, Conv3d)}


def kind_for(module: nn.Module, lora_kwargs: dict[str, Any] | None = None) -> type[LoRABase] | None:
    """The kind that adapts ``module`` (by exact type) given these keyword arguments, or None if none does.

    A kind with ``lora_fields`` (``MergedLinear``: ``split_sizes``/``enable_lora``) is chosen when one of them is
    given; otherwise the kind without any.
    """
    special = set(lora_kwargs or ()) & {f for kind in KINDS.values() for f in kind.lora_fields}
    for kind in KINDS.values():
        if (
            kind.adapts is getattr(module, "plain_type", type(module))
            and special <= set(kind.lora_fields)
            and bool(special) == bool(kind.lora_fields)
        ):
            return kind
    return None
