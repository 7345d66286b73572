"""QLoRA: linear layers whose frozen weight is NF4 (4-bit), and turning a model's linears into them.

A quantized layer keeps its torch class (``nn.Linear``, :class:`lora.Linear`, :class:`lora.MergedLinear`), except that
a plain ``nn.Linear`` becomes :class:`Linear4bit` (an ``nn.Linear`` whose forward knows the 4-bit weight). Its
``weight`` is a :class:`Weight4bit`: a module holding the NF4 tensors of :mod:`lora.nf4` as buffers, with the
``shape`` / ``dtype`` / ``device`` of the weight it stands for. State-dict keys: ``<layer>.weight.packed`` and
``<layer>.weight.absmax`` (or, double-quantized, ``.absmax_codes`` / ``.absmax_scales`` / ``.absmax_offset``),
safetensors-ready.

Forward and backward (:func:`linear4bit`) dequantize the weight per use to the compute dtype (the input's, or
autocast's) and drop it again: the autograd node saves nothing but a reference to the 4-bit tensors, and backward
dequantizes once more for the input's gradient. The 4-bit weight never gets a gradient. A LoRA layer over an NF4
base adds its update as usual, so its adapter is an ordinary LoRA adapter over the dequantized weight: saved,
exported to PEFT and loaded like any other.

Merging into 4-bit is refused (re-quantizing ``W + BA`` loses most of the update: it is far below NF4's step);
:func:`dequantize` first, or :func:`lora.merge_and_unload`, which dequantizes each adapted layer before merging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import nf4
from .functional import _gemm_dtype, _row_blocks

__all__ = ["Weight4bit", "Linear4bit", "linear4bit", "is_quantized", "quantize", "dequantize"]


class Weight4bit(nn.Module):
    """A frozen NF4 weight in the place of a linear layer's ``weight`` Parameter.

    Buffers: the tensors of :meth:`lora.nf4.NF4Weight.state_tensors` that hold data (``packed`` and the block
    statistics); ``shape``, ``dtype`` (the dtype it was quantized from) and ``block_size`` are plain attributes.
    ``.to()`` / ``.cuda()`` move the buffers but never change their dtypes (``model.half()`` leaves the 4-bit
    tensors as they are).
    """

    def __init__(self, weight: nf4.NF4Weight) -> None:
        super().__init__()
        self._shape = weight.shape
        self._dtype = weight.dtype
        self.block_size = weight.block_size
        for name, tensor in weight._tensors().items():
            self.register_buffer(name, tensor)

    @classmethod
    def quantize(cls, weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> Weight4bit:
        """NF4 of ``weight`` (see :func:`lora.nf4.quantize`)."""
        return cls(nf4.quantize(weight, block_size=block_size, double_quant=double_quant))

    # -- what code around a weight Parameter reads ---------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight was quantized from (what :meth:`dequantize` gives by default)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def is_meta(self) -> bool:
        return self.packed.is_meta

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def dim(self) -> int:
        return len(self._shape)

    def numel(self) -> int:
        return self._shape.numel()

    @property
    def requires_grad(self) -> bool:
        return False

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value:
            raise ValueError("a 4-bit (NF4) weight is frozen: it cannot require grad (dequantize it to train it)")

    def requires_grad_(self, requires_grad: bool = True) -> Weight4bit:
        self.requires_grad = requires_grad
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the 4-bit codes and statistics."""
        return sum(b.nbytes for b in self._buffers.values())

    # -- values --------------------------------------------------------------------------------------------------

    def nf4(self) -> nf4.NF4Weight:
        """The :class:`lora.nf4.NF4Weight` these buffers hold (no copy)."""
        return nf4.NF4Weight(shape=self._shape, dtype=self._dtype, block_size=self.block_size, **self._buffers)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, ``shape``, in ``dtype`` (default: the dtype it was quantized from); a new tensor."""
        return self.nf4().dequantize(dtype)

    def _apply(self, fn, recurse: bool = True):
        for name, buf in self._buffers.items():
            moved = fn(buf)  # a device move is kept; a dtype cast is not (uint8 codes, float32 statistics)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def extra_repr(self) -> str:
        stats = "double_quant" if "absmax_codes" in self._buffers else "absmax"
        return f"shape={tuple(self._shape)}, dtype={self._dtype}, block_size={self.block_size}, {stats}"


def is_quantized(module: nn.Module) -> bool:
    """True for a layer whose ``weight`` is a :class:`Weight4bit`."""
    return isinstance(getattr(module, "weight", None), Weight4bit)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _row_chunks(weight: nf4.NF4Weight, device: torch.device) -> list[slice]:
    """The output rows to dequantize at a time: on the CPU blocks of whole rows, a multiple of 64
    (``lora.functional._row_blocks``), so a dequantized copy of the whole weight never exists; elsewhere all rows."""
    out_features, in_features = weight.shape
    return _row_blocks(out_features, in_features, 64) if device.type == "cpu" else [slice(0, out_features)]


class _Linear4bit(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantized from 4 bits in the forward and again in the backward (never saved).

    On the CPU the weight is dequantized a chunk of output rows at a time, each chunk multiplied and dropped. On a
    CPU without 16-bit matrix units a 16-bit product runs as an fp32 GEMM over the exactly upcast operands, rounded
    back (``lora.functional._gemm_dtype``): the 16-bit result, at fp32 speed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: nf4.NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the 4-bit tensors only: a few bytes per weight, shared with the layer
        ctx.has_bias = bias is not None
        dtype = x.dtype
        ctx.gemm_dtype = c = _gemm_dtype(dtype, x.device) or dtype
        chunks = _row_chunks(weight, x.device)
        if len(chunks) == 1 and c == dtype:
            return F.linear(x, weight.dequantize(dtype), bias)  # (..., in) @ (in, out) -> (..., out)
        x2 = x.reshape(-1, x.shape[-1]).to(c)  # (N, in)
        # (..., out), returned itself (not a view of it: a caller may add to the output in place)
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=c, device=x.device)
        out2 = out.view(-1, weight.shape[0])  # (N, out)
        for rows in chunks:
            w = weight.dequantize(dtype, rows=rows).to(c)  # (rows, in), the values of the weight in dtype
            torch.mm(x2, w.T, out=out2[:, rows])  # (N, in) @ (in, rows)
        if bias is not None:
            out2 += bias.to(c)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        weight, dtype, c = ctx.weight, grad.dtype, ctx.gemm_dtype
        if ctx.needs_input_grad[0]:
            g2 = grad.reshape(-1, grad.shape[-1]).to(c)  # (N, out)
            grad_x = torch.zeros(g2.shape[0], weight.shape[1], dtype=c, device=grad.device)  # (N, in)
            for rows in _row_chunks(weight, grad.device):
                w = weight.dequantize(dtype, rows=rows).to(c)  # (rows, in)
                grad_x.addmm_(g2[:, rows], w)  # (N, rows) @ (rows, in), summed over the chunks
            grad_x = grad_x.to(dtype).view(*grad.shape[:-1], weight.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
        return grad_x, None, grad_bias


def linear4bit(x: torch.Tensor, weight: Weight4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a 4-bit ``W``, computed in ``x``'s dtype (autocast's under autocast).

    ``x: (..., in_features) -> (..., out_features)``. Backward gives ``x`` (and ``bias``) a gradient, never the
    weight, and holds no dequantized copy of it between forward and backward.
    """
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    if bias is not None:
        bias = bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _Linear4bit.apply(x, weight.nf4(), bias)


def base_linear(x: torch.Tensor, weight: torch.Tensor | Weight4bit, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear``, or :func:`linear4bit` for a 4-bit weight (what a LoRA linear's frozen part computes)."""
    if isinstance(weight, Weight4bit):
        return linear4bit(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear4bit(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is NF4 (a :class:`Weight4bit`); the bias, if any, stays as it was.

    ``x: (..., in_features) -> (..., out_features)``, computed in ``x``'s dtype. Built by :func:`quantize`;
    :func:`lora.inject` adapts it like the ``nn.Linear`` it stands for (``plain_type``).
    """

    plain_type: ClassVar[type[nn.Module]] = nn.Linear  # the torch layer this is a 4-bit form of

    def __init__(self, weight: Weight4bit, bias: nn.Parameter | None = None) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        del self.weight
        self.weight = weight
        if bias is not None:
            self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> Linear4bit:
        """The 4-bit form of ``linear`` (its bias object adopted, not copied)."""
        weight = Weight4bit.quantize(linear.weight, block_size=block_size, double_quant=double_quant)
        return cls(weight, linear.bias).train(linear.training)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The plain ``nn.Linear`` with the dequantized weight (frozen) and this layer's bias object."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = nn.Parameter(self.weight.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            plain.bias = self.bias
        return plain.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear4bit(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------------------
# whole models


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _candidates(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    """Names of the linears to quantize; ``ValueError`` naming a target that matched nothing or a non-linear."""
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of module names, not the string {targets!r}")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    if isinstance(model, nn.Linear):  # the model is the layer: a LoRA layer is quantized in place
        from .base import LoRABase

        if not isinstance(model, LoRABase) or targets:
            raise ValueError(
                f"quantize changes the layers inside a model; a bare {type(model).__name__} cannot "
                "replace itself: use lora.qlora.Linear4bit.from_linear(layer)"
            )
        return [""]
    if targets is None:
        return [n for n in linears if not _matches(n, "lm_head")]
    chosen = []
    for target in targets:
        hits = [n for n, m in model.named_modules() if n and _matches(n, target)]
        if not hits:
            raise ValueError(f"quantize target {target!r} matched no module of {type(model).__name__}")
        for name in hits:
            if name not in linears:
                raise ValueError(
                    f"quantize target {target!r} matched {name!r}, a {type(model.get_submodule(name)).__name__}"
                    f" (only nn.Linear layers are quantized)"
                )
            chosen.append(name)
    return chosen


def quantize(
    model: nn.Module, targets: Sequence[str] | None = None, double_quant: bool = True, block_size: int = 64
) -> list[str]:
    """Turn ``nn.Linear`` weights of ``model`` into frozen NF4 (4-bit) weights, in place, one layer at a time.

    ``targets``: module names or dotted-path suffixes (default: every ``nn.Linear`` except ``lm_head``). Plain
    linears become :class:`Linear4bit`; LoRA linears (:class:`lora.Linear`, :class:`lora.MergedLinear`) keep their
    class and adapter, with their base weight quantized. Layers already 4-bit are left alone. Quantized weights no
    longer train. Returns the names quantized now, in order.

    ``ValueError`` before anything changes for: a target that matches nothing or a non-linear module, a merged
    LoRA layer (unmerge first), a ``fan_in_fan_out`` layer, a weight shared with another module (a tied head),
    a weight on the meta device; see :func:`lora.nf4.quantize` for the weights it refuses.
    """
    from .base import LoRABase, is_mutating_init

    nf4._check_block_size(block_size)
    names = [n for n in _candidates(model, targets) if not is_quantized(model.get_submodule(n))]
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{p_name}" if name else p_name)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, LoRABase) and is_mutating_init(layer.init_lora_weights):
            raise ValueError(
                f"cannot quantize {name!r}: its PiSSA / OLoRA adapter was subtracted from the base weight, which "
                f"4 bits cannot hold exactly (plain LoRA and DoRA over a 4-bit base are supported)"
            )
        if isinstance(layer, LoRABase) and (layer.merged or layer.fan_in_fan_out):
            state = "merged (unmerge it first)" if layer.merged else "fan_in_fan_out (its weight is (in, out))"
            raise ValueError(f"cannot quantize {name!r}: it is {state}")
        if not isinstance(layer, LoRABase) and type(layer) is not nn.Linear:
            raise ValueError(f"cannot quantize {name!r}: {type(layer).__name__} is not an nn.Linear or a LoRA linear")
        if layer.weight.is_meta:
            raise ValueError(f"cannot quantize {name!r}: its weight is on the meta device (load it first)")
        shared = [o for o in owners[id(layer.weight)] if o != (f"{name}.weight" if name else "weight")]
        if shared:
            raise ValueError(f"cannot quantize {name!r}: its weight is shared with {shared} (a tied weight)")
        nf4._check_dtype(layer.weight.dtype)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, LoRABase):
            weight = Weight4bit.quantize(layer.weight, block_size=block_size, double_quant=double_quant)
            del layer.weight  # the full-precision weight goes now, before the next layer is quantized
            layer.weight = weight
        else:
            model.set_submodule(name, Linear4bit.from_linear(layer, block_size, double_quant))
    return names


def dequantize_layer(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """The layer with its 4-bit weight replaced by a frozen full-precision one (``dtype``, default: the dtype it
    was quantized from): a :class:`Linear4bit` becomes an ``nn.Linear`` (returned), a LoRA layer is changed in
    place (and returned)."""
    if isinstance(layer, Linear4bit):
        return layer.to_linear(dtype)
    if is_quantized(layer):
        weight = nn.Parameter(layer.weight.dequantize(dtype), requires_grad=False)
        del layer.weight
        layer.weight = weight
    return layer


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Undo :func:`quantize` as far as 4 bits allow: every 4-bit weight becomes the frozen full-precision weight it
    encodes (``dtype``, default: the dtype it was quantized from), one layer at a time. Returns ``model`` (or the
    new layer if ``model`` itself is a :class:`Linear4bit`)."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got dtype={dtype!r}")
    if isinstance(model, Linear4bit) or is_quantized(model):
        return dequantize_layer(model, dtype)
    for name in [n for n, m in model.named_modules() if n and is_quantized(m)]:
        layer = model.get_submodule(name)
        new = dequantize_layer(layer, dtype)
        if new is not layer:
            model.set_submodule(name, new)
    return model
