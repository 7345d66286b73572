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

__all__ = ["LoRALayer", "LoRABase", "lora_scaling", "check_lora_args", "is_lora_layer", "has_adapter"]


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
    if (isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha)
            or not lora_alpha > 0):
        raise ValueError(f"lora_alpha must be a positive finite number, got lora_alpha={lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got lora_dropout={lora_dropout!r}")


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


def _refuse_quantized(layer: nn.Module) -> None:
    if _quantized(layer):
        raise ValueError(
            f"refusing to merge into the 4-bit weight of {type(layer).__name__}: re-quantizing W + BA to NF4 would "
            "lose most of the update (it is far below NF4's step). Dequantize first (lora.dequantize(model, "
            "dtype=torch.bfloat16)) and merge into that; lora.merge_and_unload does so layer by layer")


def _json(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


class LoRABase(LoRALayer):
    """Shared state and behaviour of this library's LoRA layers; the per-kind contract (see the module docstring)."""

    adapts: ClassVar[type[nn.Module]]
    lora_fields: ClassVar[dict[str, tuple[type, ...]]] = {}  # constructor args shaping the adapter -> JSON types
    base_fields: ClassVar[dict[str, tuple[type, ...]]] = {}  # base attributes an adapter must match -> JSON types
    base_ndim: ClassVar[int] = 2  # dims of the adapted weight
    peft_keys: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")  # PEFT's names for A and B

    r: int
    lora_alpha: float
    use_rslora: bool
    scaling: float
    fan_in_fan_out: bool
    merged: bool

    # -- construction ------------------------------------------------------------------------------------------

    def _init_lora(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool, use_rslora: bool,
                   lora_dtype: torch.dtype | None, fan_in_fan_out: bool = False) -> None:
        """Set the shared state and create ``lora_A``/``lora_B`` (after the torch layer's own ``__init__``)."""
        self.r = r
        self.lora_dropout = _dropout(lora_dropout)
        # loralib merges on eval() when this is True. Here eval() never merges: the flag is recorded, nothing more.
        self.merge_weights = merge_weights
        self.merged = False
        self._merge_record: _merge.MergeRecord | None = None
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.weight = nn.Parameter(self.weight.data.T.contiguous())
        self.set_scaling(lora_alpha, use_rslora)
        shapes = self.lora_shapes(tuple(self.weight.shape), r, fan_in_fan_out=fan_in_fan_out,
                                  **{f: getattr(self, f) for f in self.lora_fields})
        if r > 0 and shapes:
            w = self.weight
            dtype = _lora_dtype(w.dtype, lora_dtype)
            for name, shape in shapes.items():
                setattr(self, name, nn.Parameter(torch.empty(shape, device=w.device, dtype=dtype)))
            w.requires_grad = False  # the pretrained weight is frozen, as in loralib
            if not w.is_meta:
                self.reset_lora_parameters()

    def set_scaling(self, lora_alpha: float, use_rslora: bool) -> None:
        """Set ``lora_alpha`` / ``use_rslora`` and the ``scaling`` they give (refused while merged)."""
        if self.merged:
            raise ValueError(f"{type(self).__name__} is merged: unmerge before changing its scaling")
        check_lora_args(self.r, lora_alpha, 0.0)
        self.lora_alpha, self.use_rslora = lora_alpha, bool(use_rslora)
        self.scaling = lora_scaling(self.r, lora_alpha, use_rslora)

    @staticmethod
    @abc.abstractmethod
    def base_kwargs(module: nn.Module) -> dict[str, Any]:
        """Constructor arguments (no weights, device or dtype) of a torch layer configured like ``module``."""

    @classmethod
    @abc.abstractmethod
    def lora_shapes(cls, base_shape: Sequence[int], r: int, fan_in_fan_out: bool = False,
                    **lora_fields: Any) -> dict[str, tuple[int, ...]]:
        """``{"lora_A": shape, "lora_B": shape}`` for a base weight of ``base_shape`` (empty: nothing to adapt)."""

    @classmethod
    def from_module(cls, base: nn.Module, **lora_kwargs: Any) -> LoRABase:
        """Wrap ``base``, adopting its ``weight``/``bias`` Parameter objects (no copy, no re-initialisation)."""
        if lora_kwargs.get("fan_in_fan_out"):
            raise ValueError(f"from_module wraps an {cls.adapts.__name__}, whose weight is (out, in): "
                             f"fan_in_fan_out must be False")
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
            layer.reset_lora_parameters()
        return layer.train(base.training)  # a layer swapped into an eval-mode model must not start dropping out

    def to_plain(self) -> nn.Module:
        """The plain torch layer (``self.adapts``) sharing this layer's weight and bias objects, as they are now."""
        if self.fan_in_fan_out:
            raise ValueError(f"a fan_in_fan_out {type(self).__name__} stores its weight as (in, out) and cannot "
                             f"become an {self.adapts.__name__}; use merge_lora instead")
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
        return tuple(n for n in ("lora_A", "lora_B") if self._parameters.get(n) is not None)

    def reset_lora_parameters(self) -> None:
        """A as ``nn.Linear``'s default (Kaiming-uniform, a=sqrt(5)) and B zero, as loralib and the LoRA paper."""
        if has_adapter(self):
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    @abc.abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """The update in fp32 (fp64 for an fp64 adapter), contiguous and shaped like ``weight``."""

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
        if self.merged or not has_adapter(self):
            return
        _refuse_quantized(self)
        if not self.weight.is_contiguous():
            raise ValueError(f"{type(self).__name__}: merging needs a contiguous weight")
        with torch.no_grad():
            delta = self.delta_weight()
            if safe and not _merge.merged_is_finite(self.weight, delta):
                raise ValueError(f"refusing to merge {type(self).__name__}: its merged weight is not finite "
                                 f"(the delta, or weight + delta in {self.weight.dtype}, is inf or nan)")
            self._merge_record = _merge.merge_(self.weight, delta, record=exact_unmerge)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: bit for bit if its record still applies to the weight, else by subtraction."""
        if not self.merged:
            return
        with torch.no_grad():
            _merge.unmerged(self.weight, self.delta_weight(), self._merge_record, out=self.weight)
        self._merge_record = None
        self.merged = False

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
                w = self.weight.detach()
                destination[prefix + "weight"] = _merge.unmerged(w, self.delta_weight(), self._merge_record,
                                                                 out=torch.empty_like(w))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        was_merged = self.merged
        self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
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
        kwargs = {"r": info["r"], "lora_alpha": info["lora_alpha"], "use_rslora": info.get("use_rslora", False),
                  "lora_dropout": info.get("lora_dropout", 0.0)}
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

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``B @ A`` the update over the whole weight, as PEFT's one LoRA per module has it."""
        return self.lora_A.detach(), self.lora_B.detach()

    def peft_tensors(self, rank: int) -> dict[str, torch.Tensor]:
        """``{peft key suffix: tensor}`` at ``rank`` (>= this layer's own; zero rows/columns leave B @ A as it is)."""
        A, B = self.peft_factors()
        pad = rank - A.shape[0]
        if pad:
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        shape_a, shape_b = self.peft_shapes(self, rank)
        return {self.peft_keys[0]: A.reshape(shape_a), self.peft_keys[1]: B.reshape(shape_b)}

    def load_peft(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy PEFT's A and B (shapes from :meth:`peft_shapes`) into this layer's parameters."""
        with torch.no_grad():
            self.lora_A.copy_(A.reshape(self.lora_A.shape))
            self.lora_B.copy_(B.reshape(self.lora_B.shape))

    # -- repr --------------------------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        fields = "".join(f", {f}={getattr(self, f)}" for f in self.lora_fields)
        return super().extra_repr() + f", r={self.r}, lora_alpha={self.lora_alpha}{fields}, merged={self.merged}"
