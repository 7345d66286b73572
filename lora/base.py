"""The contract every LoRA layer kind fulfils, and the state and behaviour the kinds share.

A kind (``lora.Linear``, ``lora.Embedding``, ...) is ``class Kind(LoRABase, nn.TorchLayer)``: it *is* the torch
layer it adapts, and :class:`LoRABase` (listed first, so its state-dict hooks take precedence over
``nn.Module``'s) holds what every kind shares: ``r``, ``lora_alpha``, ``scaling``, dropout, merge bookkeeping, the
state-dict semantics of a merged layer, and ``repr``. A kind supplies:

* ``adapts``: the torch layer type it adapts (what :func:`lora.inject` swaps it in for);
* ``base_kwargs(module)``: the constructor arguments of a torch layer like ``module`` (no weights): how a kind is
  built around an existing layer (:meth:`from_module`) and how it becomes the plain layer again (:meth:`to_plain`);
* ``lora_shapes(base_shape, r, ...)``: its LoRA parameters' shapes, the one source for the constructor and for
  checking a file's tensors;
* ``delta_weight()``: the update, shaped like ``weight``; and ``forward``;
* optionally ``lora_fields`` (constructor arguments that shape the adapter, such as ``MergedLinear``'s slices) and
  ``base_fields`` (attributes of the base an adapter must match, such as a convolution's stride), which adapter
  files record and check; and the PEFT mapping (``peft_keys``, :meth:`peft_tensors`, :meth:`peft_shapes`,
  :meth:`check_peft_compatible`).

Everything that deals with "all kinds" (injection, adapter files, PEFT, merging, ``merge_and_unload``) goes
through these; see ``docs/adding-a-layer-kind.md``.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar
from collections.abc import Sequence

import torch
import torch.nn as nn

from . import _merge

__all__ = [
    "LoRALayer",
    "LoRABase",
    "lora_scaling",
    "check_lora_args",
    "check_init",
    "is_mutating_init",
    "is_lora_layer",
    "has_adapter",
    "MUTATING_INITS",
]

# Initialisations that take A and B from the base weight and subtract their product from it (PiSSA: Meng et al.
# 2024, principal singular vectors; OLoRA: Buyukakyuz 2024, QR). "pissa_niter_<k>" is PiSSA by a randomised SVD.
MUTATING_INITS = ("pissa", "olora")


class LoRALayer(abc.ABC):  # noqa: B024  (abstract only so that isinstance covers loralib-style subclasses)
    """loralib's ``LoRALayer``, kept for code written against loralib.

    ``class MyLayer(nn.Linear, LoRALayer)`` calling ``LoRALayer.__init__(self, r, lora_alpha, lora_dropout,
    merge_weights)`` works as in loralib, and :func:`lora.mark_only_lora_as_trainable` / :func:`lora.lora_state_dict`
    treat such a layer's ``lora_A`` / ``lora_B`` as LoRA parameters. This library's own layers derive from it through
    :class:`LoRABase`.
    """

    def __init__(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        check_lora_args(r, lora_alpha, lora_dropout)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = _dropout(lora_dropout)
        self.merged = False
        self.merge_weights = merge_weights


def is_lora_layer(module: nn.Module) -> bool:
    """True for this library's LoRA layers and for loralib-style ``LoRALayer`` subclasses."""
    return isinstance(module, LoRALayer)


def has_adapter(module: nn.Module) -> bool:
    """True for a LoRA layer that has LoRA parameters (``r > 0``, and for ``MergedLinear`` an enabled slice)."""
    return is_lora_layer(module) and getattr(module, "r", 0) > 0 and module._parameters.get("lora_A") is not None


def check_lora_args(r: int, lora_alpha: float, lora_dropout: float) -> None:
    """``ValueError`` naming the first bad value: r a non-negative int, alpha positive and finite, dropout in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative int, got r={r!r}")
    if (
        isinstance(lora_alpha, bool)
        or not isinstance(lora_alpha, (int, float))
        or not math.isfinite(lora_alpha)
        or not lora_alpha > 0
    ):
        raise ValueError(f"lora_alpha must be a positive finite number, got lora_alpha={lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got lora_dropout={lora_dropout!r}")


def check_init(init_lora_weights: str) -> str:
    """``ValueError`` unless ``init_lora_weights`` is ``"default"``, ``"gaussian"``, ``"pissa"``,
    ``"pissa_niter_<k>"`` (k >= 0) or ``"olora"``; returns it."""
    ok = isinstance(init_lora_weights, str) and (
        init_lora_weights in ("default", "gaussian", "pissa", "olora")
        or (init_lora_weights.startswith("pissa_niter_") and init_lora_weights[12:].isdigit())
    )
    if not ok:
        raise ValueError(
            f"init_lora_weights must be 'default', 'gaussian', 'pissa', 'pissa_niter_<k>' or 'olora', "
            f"got init_lora_weights={init_lora_weights!r}"
        )
    return init_lora_weights


def is_mutating_init(init_lora_weights: str) -> bool:
    """Whether this initialisation subtracts the initial adapter from the base weight (PiSSA, OLoRA)."""
    return init_lora_weights.startswith(MUTATING_INITS)


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023: keeps the update's scale
    stable as r grows); 0 for ``r == 0``."""
    if r == 0:
        return 0.0
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p=p) if p > 0 else nn.Identity()


def _lora_dtype(base_dtype: torch.dtype, lora_dtype: torch.dtype | None) -> torch.dtype:
    """LoRA parameters stay in fp32 over a 16-bit base unless told otherwise (as PEFT's autocast_adapter_dtype)."""
    if lora_dtype is not None:
        if not isinstance(lora_dtype, torch.dtype) or not lora_dtype.is_floating_point:
            raise ValueError(f"lora_dtype must be a floating torch.dtype, got lora_dtype={lora_dtype!r}")
        return lora_dtype
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _quantized(layer: nn.Module) -> bool:
    """Whether the layer's weight is 4-bit (a module, :class:`lora.qlora.Weight4bit`, in the Parameter's place)."""
    return isinstance(layer.weight, nn.Module)


def _dense(weight: torch.Tensor | nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as a detached dense tensor of ``dtype`` (a 4-bit :class:`lora.qlora.Weight4bit` dequantized)."""
    if isinstance(weight, nn.Module):
        return weight.dequantize(dtype)
    return weight.detach().to(dtype)


def _refuse_quantized(layer: nn.Module) -> None:
    if _quantized(layer):
        raise ValueError(
            f"refusing to merge into the 4-bit weight of {type(layer).__name__}: re-quantizing W + BA to NF4 would "
            "lose most of the update (it is far below NF4's step). Dequantize first (lora.dequantize(model, "
            "dtype=torch.bfloat16)) and merge into that; lora.merge_and_unload does so layer by layer"
        )


def _json(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


class LoRABase(LoRALayer):
    """Shared state and behaviour of this library's LoRA layers; the per-kind contract (see the module docstring)."""

    adapts: ClassVar[type[nn.Module]]
    lora_fields: ClassVar[dict[str, tuple[type, ...]]] = {}  # constructor args shaping the adapter -> JSON types
    base_fields: ClassVar[dict[str, tuple[type, ...]]] = {}  # base attributes an adapter must match -> JSON types
    base_ndim: ClassVar[int] = 2  # dims of the adapted weight
    supports_mutating_init: ClassVar[bool] = False  # PiSSA / OLoRA (see _mutating_init)
    peft_keys: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")  # PEFT's names for A and B

    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    scaling: float
    fan_in_fan_out: bool
    merged: bool

    # -- construction ------------------------------------------------------------------------------------------

    def _init_lora(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        merge_weights: bool,
        use_rslora: bool,
        lora_dtype: torch.dtype | None,
        fan_in_fan_out: bool = False,
        use_dora: bool = False,
        init_lora_weights: str = "default",
    ) -> None:
        """Set the shared state and create ``lora_A``/``lora_B`` (and DoRA's ``lora_magnitude``) after the torch
        layer's own ``__init__``."""
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be a bool, got use_dora={use_dora!r}")
        self.init_lora_weights = check_init(init_lora_weights)
        if is_mutating_init(init_lora_weights) and not self.supports_mutating_init:
            raise ValueError(
                f"init_lora_weights={init_lora_weights!r} is not available for {type(self).__name__} "
                f"(PEFT defines PiSSA and OLoRA for linear layers only)"
            )
        self.r = r
        self.use_dora = use_dora
        # PiSSA / OLoRA: the initial A and B, whose product was subtracted from the base weight (what converting the
        # trained adapter to a plain LoRA over the original base needs; see converted_factors).
        self.register_buffer("lora_A_init", None, persistent=False)
        self.register_buffer("lora_B_init", None, persistent=False)
        # DoRA: the merge-time factor m / ||W + dW|| (so unmerge divides by the same one), and the weight norm cached
        # for the forward with the A and B it was computed from (see dora_weight_norm).
        for name in ("_dora_merge_scale", "_dora_norm_cache", "_dora_cached_A", "_dora_cached_B"):
            self.register_buffer(name, None, persistent=False)
        self._dora_key: tuple | None = None
        self.lora_dropout = _dropout(lora_dropout)
        # loralib merges on eval() when this is True. Here eval() never merges: the flag is recorded, nothing more.
        self.merge_weights = merge_weights
        self.merged = False
        self._merge_record: _merge.MergeRecord | None = None
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.weight = nn.Parameter(self.weight.data.T.contiguous())
        self.set_scaling(lora_alpha, use_rslora)
        shapes = self.adapter_shapes(
            tuple(self.weight.shape),
            r,
            fan_in_fan_out=fan_in_fan_out,
            use_dora=use_dora,
            **{f: getattr(self, f) for f in self.lora_fields},
        )
        if r > 0 and shapes and is_mutating_init(init_lora_weights):
            self._check_mutating_init()  # before any weight is touched
        if r > 0 and shapes:
            w = self.weight
            dtype = _lora_dtype(w.dtype, lora_dtype)
            for name, shape in shapes.items():
                setattr(self, name, nn.Parameter(torch.empty(shape, device=w.device, dtype=dtype)))
            w.requires_grad = False  # the pretrained weight is frozen, as in loralib
            if not w.is_meta:
                self._reset_adapter()

    def set_scaling(self, lora_alpha: float, use_rslora: bool) -> None:
        """Set ``lora_alpha`` / ``use_rslora`` and the ``scaling`` they give (refused while merged)."""
        if self.merged:
            raise ValueError(f"{type(self).__name__} is merged: unmerge before changing its scaling")
        check_lora_args(self.r, lora_alpha, 0.0)
        init_A = self._buffers.get("lora_A_init")
        if init_A is not None and lora_scaling(self.r, lora_alpha, use_rslora) != self.scaling:
            raise ValueError(
                f"{type(self).__name__} subtracted its {self.init_lora_weights} initial adapter from the "
                f"base at scaling {self.scaling}: changing it (lora_alpha={lora_alpha}) would break "
                f"that; call restore_original_base() first"
            )
        self.lora_alpha, self.use_rslora = lora_alpha, bool(use_rslora)
        self.scaling = lora_scaling(self.r, lora_alpha, use_rslora)

    @staticmethod
    @abc.abstractmethod
    def base_kwargs(module: nn.Module) -> dict[str, Any]:
        """Constructor arguments (no weights, device or dtype) of a torch layer configured like ``module``."""

    @classmethod
    @abc.abstractmethod
    def lora_shapes(
        cls, base_shape: Sequence[int], r: int, fan_in_fan_out: bool = False, **lora_fields: Any
    ) -> dict[str, tuple[int, ...]]:
        """``{"lora_A": shape, "lora_B": shape}`` for a base weight of ``base_shape`` (empty: nothing to adapt)."""

    @classmethod
    def magnitude_shape(
        cls, base_shape: Sequence[int], fan_in_fan_out: bool = False, **lora_fields: Any
    ) -> tuple[int, ...]:
        """Shape of DoRA's magnitude vector: one entry per output row (``weight.shape[dim_of_magnitude]``)."""
        return (base_shape[cls.magnitude_dim(fan_in_fan_out)],)

    @classmethod
    def magnitude_dim(cls, fan_in_fan_out: bool = False) -> int:
        """The weight dimension DoRA's magnitude runs along (the norm is taken over all the others): the output
        rows, dim 0 (dim 1 in GPT-2's ``(in, out)`` layout)."""
        return 1 if fan_in_fan_out else 0

    @classmethod
    def adapter_shapes(
        cls, base_shape: Sequence[int], r: int, fan_in_fan_out: bool = False, use_dora: bool = False, **lora_fields: Any
    ) -> dict[str, tuple[int, ...]]:
        """:meth:`lora_shapes`, plus ``lora_magnitude`` for DoRA: every LoRA parameter's shape."""
        shapes = cls.lora_shapes(base_shape, r, fan_in_fan_out=fan_in_fan_out, **lora_fields)
        if use_dora and shapes:
            shapes["lora_magnitude"] = cls.magnitude_shape(base_shape, fan_in_fan_out=fan_in_fan_out, **lora_fields)
        return shapes

    @classmethod
    def from_module(cls, base: nn.Module, **lora_kwargs: Any) -> LoRABase:
        """Wrap ``base``, adopting its ``weight``/``bias`` Parameter objects (no copy, no re-initialisation)."""
        if lora_kwargs.get("fan_in_fan_out"):
            raise ValueError(
                f"from_module wraps an {cls.adapts.__name__}, whose weight is (out, in): fan_in_fan_out must be False"
            )
        init = lora_kwargs.get("init_lora_weights", "default")
        if isinstance(base.weight, nn.Module) and isinstance(init, str) and is_mutating_init(init):
            raise ValueError(
                f"{type(base).__name__} has a 4-bit (NF4) weight: PiSSA / OLoRA rewrite the base weight, which a "
                f"4-bit base cannot hold exactly (plain LoRA and DoRA over it are supported)"
            )
        layer = cls(**cls.base_kwargs(base), device="meta", dtype=base.weight.dtype, **lora_kwargs)
        if isinstance(base.weight, nn.Module):  # a 4-bit weight (lora.qlora.Weight4bit) is a module, not a Parameter
            del layer.weight
        layer.weight = base.weight
        if getattr(base, "bias", None) is not None:
            layer.bias = base.bias
        if has_adapter(layer):
            layer.weight.requires_grad = False
            for name in layer.lora_param_names():
                p = layer._parameters[name]
                layer._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=base.weight.device))
            layer._reset_adapter()
        return layer.train(base.training)  # a layer swapped into an eval-mode model must not start dropping out

    def to_plain(self) -> nn.Module:
        """The plain torch layer (``self.adapts``) sharing this layer's weight and bias objects, as they are now."""
        if self.fan_in_fan_out:
            raise ValueError(
                f"a fan_in_fan_out {type(self).__name__} stores its weight as (in, out) and cannot "
                f"become an {self.adapts.__name__}; use merge_lora instead"
            )
        if _quantized(self):  # the 4-bit plain layer, sharing the 4-bit weight
            from .qlora import Linear4bit

            return Linear4bit(self.weight, self.bias).train(self.training)
        plain = self.adapts(**self.base_kwargs(self), device="meta")
        plain.weight = self.weight
        if getattr(self, "bias", None) is not None:
            plain.bias = self.bias
        return plain.train(self.training)

    def lora_param_names(self) -> tuple[str, ...]:
        """Names of this layer's LoRA parameters (what trains and what an adapter file holds)."""
        return tuple(n for n in ("lora_A", "lora_B", "lora_magnitude") if self._parameters.get(n) is not None)

    def _reset_adapter(self) -> None:
        """Initialise the LoRA parameters as ``init_lora_weights`` says, then DoRA's magnitude to the adapted
        weight's norm (so that the layer starts at what the LoRA initialisation gives, as PEFT's DoRA)."""
        if not has_adapter(self):
            return
        init = self.init_lora_weights
        if init == "default":
            self.reset_lora_parameters()
        elif init == "gaussian":
            self.reset_lora_parameters()
            self._gaussian_init()
        else:
            with torch.no_grad():
                self._mutating_init(init)
                self.lora_A_init, self.lora_B_init = self.lora_A.detach().clone(), self.lora_B.detach().clone()
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude.copy_(self._weight_norm(self.weight, self.lora_delta()))

    def _gaussian_init(self) -> None:
        """PEFT's "gaussian": A ~ N(0, 1/r^2) (std 1/r), B zero."""
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=1 / self.r)
            nn.init.zeros_(self.lora_B)

    def restore_original_base(self) -> None:
        """Undo a PiSSA / OLoRA initialisation's change to the base weight (kinds without them: nothing to do)."""

    def _check_mutating_init(self) -> None:
        """``ValueError`` if PiSSA / OLoRA cannot initialise this layer (checked before the weight is touched)."""

    def _mutating_init(self, init: str) -> None:
        """Set A and B from the base weight and subtract ``scaling * B @ A`` from it (PiSSA, OLoRA)."""
        raise NotImplementedError

    def reset_lora_parameters(self) -> None:
        """A as ``nn.Linear``'s default (Kaiming-uniform, a=sqrt(5)) and B zero, as loralib and the LoRA paper."""
        if has_adapter(self):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @abc.abstractmethod
    def lora_delta(self) -> torch.Tensor:
        """The low-rank update ``scaling * B @ A`` in fp32 (fp64 for an fp64 adapter), contiguous, shaped like
        ``weight``."""

    def delta_weight(self) -> torch.Tensor:
        """What the adapter adds to ``weight`` (what the forward computes, and what merging adds), in fp32 (fp64
        for an fp64 adapter), contiguous, shaped like ``weight``: :meth:`lora_delta`, or for DoRA
        ``(f - 1) * W + f * lora_delta`` with ``f = magnitude / ||W + lora_delta||`` along the magnitude's dim."""
        delta = self.lora_delta()
        if not (self.use_dora and has_adapter(self)):
            return delta
        f = self._dora_full_scale(self._weight_norm(self.weight, delta))
        return delta.mul_(f).add_(_dense(self.weight, delta.dtype) * (f - 1)).contiguous()

    # -- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") ---------------------------------
    # W' = m * (W + dW) / ||W + dW||, the norm taken per output row (PEFT's and the paper's "column-wise" norm of
    # the (in, out) matrix) and treated as a constant in the backward (the paper's section 4.3, as PEFT).

    def _magnitude_rows(self) -> slice | torch.Tensor:
        """Which entries along the magnitude's dim have a magnitude (all; ``MergedLinear``: its enabled rows)."""
        return slice(None)

    def _weight_norm(self, weight: torch.Tensor, lora_delta: torch.Tensor, all_rows: bool = False) -> torch.Tensor:
        """``||W + dW||`` over every dim but the magnitude's, for the rows that have a magnitude (``all_rows``: for
        every row); fp32 (fp64 for an fp64 adapter), detached."""
        with torch.no_grad():
            v = _dense(weight, lora_delta.dtype) + lora_delta
            dim = self.magnitude_dim(self.fan_in_fan_out)
            norm = torch.linalg.vector_norm(v, dim=tuple(d for d in range(v.dim()) if d != dim))
            return norm if all_rows else norm[self._magnitude_rows()]

    def dora_weight_norm(self) -> torch.Tensor:
        """``||W + dW||`` for the forward, detached: cached, and recomputed only when something it depends on
        changed. ``lora_A`` / ``lora_B`` are compared by value with the copies the cache was computed from (small;
        this sees every write, even through ``.data``); the frozen ``weight`` by its version counter and storage
        (every in-place write through the Parameter, ``load_state_dict`` and ``.to()`` change one of them), and the
        scaling and dtypes by value."""
        if torch.compiler.is_compiling():
            return self._weight_norm(self.weight, self.lora_delta())
        A, B = self.lora_A.detach(), self.lora_B.detach()
        stored = self.weight.packed if _quantized(self) else self.weight  # a 4-bit weight: its packed codes
        key = (stored._version, stored.data_ptr(), self.weight.dtype, self.weight.device, self.scaling)
        fresh = (
            key == self._dora_key
            and self._dora_norm_cache is not None
            and self._dora_cached_A is not None
            and self._dora_cached_A.dtype == A.dtype
            and torch.equal(self._dora_cached_A, A)
            and torch.equal(self._dora_cached_B, B)
        )
        if not fresh:
            self._dora_norm_cache = self._weight_norm(self.weight, self.lora_delta())
            self._dora_cached_A, self._dora_cached_B = A.clone(), B.clone()
            self._dora_key = key
        return self._dora_norm_cache

    def dora_scale(self) -> torch.Tensor:
        """``magnitude / ||W + dW||`` (the norm detached, so the gradient reaches the magnitude only through the
        numerator), one entry per magnitude row."""
        return self.lora_magnitude / self.dora_weight_norm().to(self.lora_magnitude.dtype)

    def _spread(self, scale: torch.Tensor) -> torch.Tensor:
        """One factor per magnitude row -> one per entry of the magnitude's dim (1 where there is no magnitude)."""
        rows = self._magnitude_rows()
        if isinstance(rows, slice):
            return scale
        n = self.weight.shape[self.magnitude_dim(self.fan_in_fan_out)]
        return scale.new_ones(n).index_copy(0, rows.to(scale.device), scale)  # differentiable in `scale`

    def _dora_full_scale(self, norm: torch.Tensor) -> torch.Tensor:
        """``magnitude / norm`` (1 for rows without a magnitude), shaped to broadcast against ``weight``."""
        scale = self._spread(self.lora_magnitude.detach().to(norm.dtype) / norm)
        dim = self.magnitude_dim(self.fan_in_fan_out)
        shape = [1] * self.weight.dim()
        shape[dim] = self.weight.shape[dim]
        return scale.reshape(shape)

    def _merge_terms(self, scale: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(s, d)`` with merged weight ``s * W + d`` (``s`` None for plain LoRA). DoRA: ``s = f``, ``d = f * dW``;
        ``scale`` gives the ``f`` of an earlier merge (unmerging needs the factor of the *unmerged* weight)."""
        delta = self.lora_delta()
        if not (self.use_dora and has_adapter(self)):
            return None, delta
        if scale is None:
            scale = self._dora_full_scale(self._weight_norm(self.weight, delta))
        return scale, delta.mul_(scale)

    # -- merging -----------------------------------------------------------------------------------------------

    def merged_is_finite(self) -> bool:
        """Whether merging now would give a finite weight (checks the sum, not just the delta; for a 4-bit weight, the
        sum with its dequantized weight)."""
        if self.merged or not has_adapter(self):
            return True
        with torch.no_grad():  # a 4-bit weight: the merge lora.merge_and_unload does, into the dequantized weight
            weight = self.weight.dequantize() if _quantized(self) else self.weight
            return _merge.merged_is_finite(weight, self.delta_weight())

    def merge(self, safe: bool = True, exact_unmerge: bool = True) -> None:
        """Fold the update into ``weight`` (fp32 sum, one cast), in place. Idempotent.

        ``safe`` (default) refuses, changing nothing, if the merged weight would not be finite. ``exact_unmerge``
        keeps a record (at most one byte per weight; see :mod:`lora._merge`) so that :meth:`unmerge` restores the
        weight bit for bit; without it, or past that budget, unmerging subtracts.
        """
        if getattr(self, "active_adapter", "default") != "default":  # set by lora.set_adapter
            raise ValueError(
                f"{type(self).__name__}: adapter {self.active_adapter!r} is active, but merging folds in "
                f"the default adapter; set_adapter(model, 'default') first (merge_and_unload merges "
                f"the active one)"
            )
        if self.merged or not has_adapter(self):
            return
        _refuse_quantized(self)
        if not self.weight.is_contiguous():
            raise ValueError(f"{type(self).__name__}: merging needs a contiguous weight")
        with torch.no_grad():
            if safe and not _merge.merged_is_finite(self.weight, self.delta_weight()):
                raise ValueError(
                    f"refusing to merge {type(self).__name__}: its merged weight is not finite "
                    f"(the delta, or weight + delta in {self.weight.dtype}, is inf or nan)"
                )
            scale, delta = self._merge_terms()
            self._merge_record = _merge.merge_(self.weight, delta, record=exact_unmerge, scale=scale)
            self._dora_merge_scale = scale
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: bit for bit if its record still applies to the weight, else by subtraction."""
        if not self.merged:
            return
        with torch.no_grad():
            self._unmerged_weight(out=self.weight)
        self._merge_record = None
        self._dora_merge_scale = None
        self.merged = False

    def _unmerged_weight(self, out: torch.Tensor) -> torch.Tensor:
        """The weight from before :meth:`merge`, written into ``out`` (may be ``weight`` itself)."""
        scale, delta = self._merge_terms(self._dora_merge_scale)
        return _merge.unmerged(self.weight, delta, self._merge_record, out=out, scale=scale)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.half() while merged: move the record along (a changed dtype is caught by its fingerprint).
        out = super()._apply(fn, *args, **kwargs)
        if self._merge_record is not None:
            self._merge_record = self._merge_record.to(self.weight.device)
        return out

    # A merged layer's state dict holds the *unmerged* weight, so every state dict means the same thing (weight +
    # adapter) whatever the merge state: loading one never applies the adapter twice (loralib's and PEFT's merged
    # state dicts do). Loading into a merged layer unmerges, loads, and merges the loaded adapter again.

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and prefix + "weight" in destination:
            with torch.no_grad():
                destination[prefix + "weight"] = self._unmerged_weight(out=torch.empty_like(self.weight.detach()))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        was_merged = self.merged
        self.unmerge()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if was_merged:
            self.merge()

    # -- adapter files -----------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """This layer's entry in an adapter file's metadata (JSON-able); :meth:`rebuild_kwargs` reads it back."""
        info = {
            "kind": type(self).__name__,
            "r": self.r,
            "lora_alpha": float(self.lora_alpha),
            "use_rslora": bool(self.use_rslora),
            "use_dora": bool(self.use_dora),
            "init_lora_weights": self.init_lora_weights,
            "lora_dropout": float(getattr(self.lora_dropout, "p", 0.0)),
            "lora_dtype": str(self.lora_A.dtype).removeprefix("torch."),
            "base_shape": list(self.weight.shape),
            "fan_in_fan_out": bool(self.fan_in_fan_out),
        }
        info.update({f: _json(getattr(self, f)) for f in (*self.lora_fields, *self.base_fields)})
        return info

    @classmethod
    def rebuild_kwargs(cls, info: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for :meth:`from_module` that rebuild the adapter ``info`` describes."""
        kwargs = {
            "r": info["r"],
            "lora_alpha": info["lora_alpha"],
            "use_rslora": info.get("use_rslora", False),
            "use_dora": info.get("use_dora", False),
            "lora_dropout": info.get("lora_dropout", 0.0),
        }
        if "lora_dtype" in info:
            kwargs["lora_dtype"] = getattr(torch, info["lora_dtype"])
        kwargs.update({f: info[f] for f in cls.lora_fields})
        return kwargs

    @classmethod
    def check_fields(cls, info: dict[str, Any]) -> str | None:
        """What is inconsistent in a (type-checked) metadata entry of this kind, or None."""
        return None

    def mismatches(self, info: dict[str, Any]) -> list[str]:
        """How this layer differs from what the adapter ``info`` was trained on (empty: it fits)."""
        problems = []
        if self.r != info["r"]:
            problems.append(f"rank expected r={info['r']}, found r={self.r}")
        if self.use_dora != info.get("use_dora", False):
            problems.append(f"use_dora expected {info.get('use_dora', False)}, found {self.use_dora}")
        for f in (*self.lora_fields, *self.base_fields):
            if f in info and _json(getattr(self, f)) != info[f]:
                problems.append(f"{f} expected {info[f]!r}, found {_json(getattr(self, f))!r}")
        return problems

    # -- PEFT --------------------------------------------------------------------------------------------------

    @classmethod
    def check_peft_compatible(cls, name: str, module: nn.Module) -> None:
        """``ValueError`` if PEFT's LoRA layer computes something else for ``module`` (a layer of this kind or its
        base) than this library does."""

    @classmethod
    def peft_shapes(cls, module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """PEFT's shapes of A and B at ``rank`` over ``module`` (a plain layer of ``cls.adapts``)."""
        shapes = cls.lora_shapes(tuple(module.weight.shape), rank)
        return shapes["lora_A"], shapes["lora_B"]

    def peft_factors(self, converted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``B @ A`` the update over the whole weight, as PEFT's one LoRA per module has it
        (``converted``: of the PiSSA / OLoRA adapter converted to a plain LoRA)."""
        if converted:
            return self.converted_factors()
        return self.lora_A.detach(), self.lora_B.detach()

    def converted_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A PiSSA / OLoRA adapter as a plain LoRA over the original base (the kinds that support them)."""
        raise ValueError(f"{type(self).__name__} has no PiSSA / OLoRA initial adapter to convert")

    peft_magnitude_key: ClassVar[str] = "lora_magnitude_vector"  # PEFT's name for DoRA's magnitude

    @classmethod
    def peft_magnitude_shape(cls, module: nn.Module) -> tuple[int, ...]:
        """PEFT's shape of DoRA's magnitude over ``module``: one entry per row of the whole weight."""
        return (module.weight.shape[cls.magnitude_dim(getattr(module, "fan_in_fan_out", False))],)

    def peft_tensors(self, rank: int, converted: bool = False) -> dict[str, torch.Tensor]:
        """``{peft key suffix: tensor}`` at ``rank`` (>= this layer's own; zero rows/columns leave B @ A as it is),
        with DoRA's magnitude under ``lora_magnitude_vector`` (rows without a magnitude, a ``MergedLinear``'s
        disabled slices, get their weight norm: a factor of 1, as here). ``converted``: a PiSSA / OLoRA adapter as
        its plain rank-``2r`` LoRA over the original base (see ``converted_factors``)."""
        A, B = self.peft_factors(converted)
        pad = rank - A.shape[0]
        if pad:
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        shape_a, shape_b = self.peft_shapes(self, rank)
        out = {self.peft_keys[0]: A.reshape(shape_a), self.peft_keys[1]: B.reshape(shape_b)}
        if self.use_dora:
            m = self.lora_magnitude.detach()
            rows = self._magnitude_rows()
            if not isinstance(rows, slice):
                full = self._weight_norm(self.weight, self.lora_delta(), all_rows=True).to(m.dtype)
                m = full.index_copy(0, rows.to(m.device), m)
            out[self.peft_magnitude_key] = m.reshape(self.peft_magnitude_shape(self))
        return out

    def load_peft(self, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None = None) -> None:
        """Copy PEFT's A and B (shapes from :meth:`peft_shapes`), and DoRA's magnitude, into this layer's
        parameters."""
        with torch.no_grad():
            self.lora_A.copy_(A.reshape(self.lora_A.shape))
            self.lora_B.copy_(B.reshape(self.lora_B.shape))
            if magnitude is not None:
                self.lora_magnitude.copy_(magnitude.reshape(self.lora_magnitude.shape))

    # -- repr --------------------------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        fields = "".join(f", {f}={getattr(self, f)}" for f in self.lora_fields)
        dora = ", use_dora=True" if self.use_dora else ""
        return super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}{fields}{dora}, merged={self.merged}"
