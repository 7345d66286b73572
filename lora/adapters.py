"""Several adapters on one base: named adapter slots, switching, and mixed batches.

Every LoRA layer has its *default* adapter in ``lora_A`` / ``lora_B`` (loralib's keys, unchanged). Further adapters
live next to it, one :class:`AdapterSlot` per name in the layer's ``lora_adapters`` (an ``nn.ModuleDict`` created
when the first one is added, so a model without extra adapters has exactly the modules and keys it had before):
``<layer>.lora_adapters.<name>.lora_A``. A slot has the layer kind's own shapes at its own rank (so a per-slice
``MergedLinear`` slot is per-slice too) and its own ``lora_alpha`` / ``use_rslora``; it shares the layer's dropout.

What a forward computes:

* :func:`set_adapter` ``(model, name)``: every layer adds the update of adapter ``name`` (``"default"``: as
  before), or none with ``None``; a layer without that adapter adds nothing.
* :func:`adapter_batch` ``(model, names)``: row ``i`` of the batch gets adapter ``names[i]`` (``None``: the base).
  Per layer the low-rank product for all rows is one gathered, batched computation: every adapter's ``A`` and
  ``scaling * B`` over the whole weight (a per-slice ``MergedLinear``'s ``B`` block-structured), zero-padded to the
  largest rank and stacked (with an all-zero entry for the base), gathered by row and applied with two ``bmm``.
  The stacks are built once and reused while no adapter parameter changes (in-place writes bump a tensor's
  version, which the cache checks); with gradients enabled they are rebuilt each forward so they stay
  differentiable.

Switching and mixed batches run on :class:`lora.Linear` and :class:`lora.MergedLinear` (the layers Phi-3's
injection makes); named adapters of other kinds are refused when added. Merging merges the default adapter;
:func:`lora.merge_lora` refuses while another one is active (ambiguous: the default would be folded in, another
would be served), and :func:`lora.merge_and_unload` folds in the active adapter (none for ``None``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LoRABase, has_adapter, is_mutating_init, lora_scaling
from .qlora import base_linear

__all__ = [
    "DEFAULT",
    "AdapterSlot",
    "active_adapter",
    "adapter_batch",
    "adapter_names",
    "adapter_view",
    "delete_adapter",
    "put_slot",
    "set_adapter",
    "slots",
    "supports_named",
]

DEFAULT = "default"  # the adapter in lora_A / lora_B (PEFT's name for its first adapter too)
_NAME = re.compile(r"[A-Za-z0-9_\-]+")


class AdapterSlot(nn.Module):
    """One named adapter of one layer: ``lora_A`` / ``lora_B`` shaped as the layer kind's ``lora_shapes`` at rank
    ``r``, and the scalars that scale it (``scaling = lora_scaling(r, lora_alpha, use_rslora)``)."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        r: int,
        lora_alpha: float,
        use_rslora: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.r = r
        self.lora_alpha, self.use_rslora = lora_alpha, bool(use_rslora)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False))

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, use_rslora={self.use_rslora}"


def supports_named(kind: type | nn.Module) -> bool:
    """Whether a layer (or kind) can hold named adapters: ``lora.Linear`` and ``lora.MergedLinear``, the kinds
    whose forwards route here, with a plain LoRA default adapter (the routed forward knows nothing of DoRA's
    magnitude or of a PiSSA / OLoRA residual base)."""
    if isinstance(kind, nn.Module) and (
        getattr(kind, "use_dora", False) or is_mutating_init(getattr(kind, "init_lora_weights", "default"))
    ):
        return False
    return issubclass(kind if isinstance(kind, type) else type(kind), nn.Linear)


def check_name(name: Any) -> str:
    """``name`` if it can name an adapter, else a ``ValueError`` naming it."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter_name={name!r} must be a non-empty string of letters, digits, '_' and '-'")
    return name


def slots(layer: nn.Module) -> dict[str, AdapterSlot]:
    """The extra (named) adapters of ``layer``, in the order they were added (empty for other modules)."""
    container = layer._modules.get("lora_adapters") if isinstance(layer, LoRABase) else None
    return dict(container.items()) if container is not None else {}


def _layers(model: nn.Module) -> Iterator[tuple[str, LoRABase]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRABase):
            yield name, m


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters ``model`` holds: ``"default"`` first if any layer has one, then the named ones in the
    order they were added."""
    names: dict[str, None] = {}
    layers = list(_layers(model))
    if any(has_adapter(m) for _, m in layers):
        names[DEFAULT] = None
    for _, m in layers:
        names.update(dict.fromkeys(slots(m)))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter :func:`set_adapter` made active (``"default"`` until then)."""
    found = {getattr(m, "active_adapter", DEFAULT) for _, m in _layers(model)}
    if len(found) > 1:
        raise ValueError(
            f"the layers of {type(model).__name__} have different active adapters: {sorted(map(str, found))}"
        )
    return found.pop() if found else DEFAULT


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the one every LoRA layer applies (``None``: none, the base model alone).

    ``ValueError`` for a name ``model`` does not hold, or while a layer is merged (its weight already holds the
    default adapter). Layers without adapter ``name`` compute their base layer.
    """
    names = adapter_names(model)
    if name is not None and name not in names:
        raise ValueError(f"adapter_name={name!r} is not one of {type(model).__name__}'s adapters {names}")
    layers = list(_layers(model))
    merged = [n or type(m).__name__ for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"cannot switch adapters while layers are merged ({merged[0]!r}, ...): unmerge_lora first")
    # None (the base alone) needs only a routing forward; a named adapter also needs a plain-LoRA default
    unsupported = [
        n or type(m).__name__
        for n, m in layers
        if name != DEFAULT and not supports_named(type(m) if name is None else m)
    ]
    if unsupported:
        raise TypeError(
            f"switching adapters runs on lora.Linear / lora.MergedLinear only; {unsupported[0]!r} is a "
            f"{type(model.get_submodule(unsupported[0])).__name__}"
        )
    for _, m in layers:
        if name == DEFAULT:
            m.__dict__.pop("active_adapter", None)  # back to the class default: exactly the layer as it was
        else:
            m.active_adapter = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove named adapter ``name`` from every layer. The default adapter (``lora_A`` / ``lora_B``) is the
    layer's own and is not deleted here; the active adapter neither (switch first)."""
    if name == DEFAULT:
        raise ValueError(
            "the default adapter is the layers' lora_A / lora_B; lora.merge_and_unload or "
            "set_adapter(model, None) serve the model without it"
        )
    if name not in adapter_names(model):
        raise ValueError(
            f"adapter_name={name!r} is not one of {type(model).__name__}'s adapters {adapter_names(model)}"
        )
    if active_adapter(model) == name:
        raise ValueError(f"adapter {name!r} is active: set_adapter(model, another name or None) before deleting it")
    for _, m in _layers(model):
        container = m._modules.get("lora_adapters")
        if container is not None and name in container:
            del container[name]
            if not len(container):
                del m._modules["lora_adapters"]


def put_slot(
    layer: LoRABase, name: str, r: int, lora_alpha: float, use_rslora: bool, tensors: dict[str, torch.Tensor]
) -> AdapterSlot:
    """Load adapter ``name`` of ``layer`` from ``tensors`` (``{"lora_A": ..., "lora_B": ...}`` in the kind's
    shapes at rank ``r``, already checked). An existing slot of the same shapes is written in place (hot swap: the
    module and its Parameters stay the same objects); otherwise a new slot replaces it."""
    if not supports_named(layer):
        raise TypeError(
            f"named adapters run on plain-LoRA lora.Linear / lora.MergedLinear only (no DoRA, PiSSA or OLoRA), not on "
            f"{layer!r}"
        )
    shapes = type(layer).lora_shapes(
        tuple(layer.weight.shape),
        r,
        fan_in_fan_out=layer.fan_in_fan_out,
        **{f: getattr(layer, f) for f in layer.lora_fields},
    )
    slot = slots(layer).get(name)
    same = slot is not None and all(tuple(getattr(slot, p).shape) == s for p, s in shapes.items())
    if not same:
        dtype = tensors["lora_A"].dtype if tensors["lora_A"].is_floating_point() else torch.float32
        slot = AdapterSlot(shapes, r, lora_alpha, use_rslora, dtype, device=layer.weight.device)
        if "lora_adapters" not in layer._modules:
            layer.add_module("lora_adapters", nn.ModuleDict())
        layer.lora_adapters[name] = slot
    with torch.no_grad():
        for p, t in tensors.items():
            getattr(slot, p).copy_(t.reshape(shapes[p]))
    slot.r, slot.lora_alpha, slot.use_rslora = r, lora_alpha, bool(use_rslora)
    slot.scaling = lora_scaling(r, lora_alpha, use_rslora)
    return slot


# ---------------------------------------------------------------------------------------------------------------
# Viewing one adapter as the default (saving, exporting, unloading)

_STATE = ("r", "lora_alpha", "use_rslora", "scaling")


def _exchange(layer: LoRABase, slot: AdapterSlot) -> None:
    """Swap the default adapter's parameters and scalars with ``slot``'s (a slot may hold none: ``r == 0``)."""
    for p in ("lora_A", "lora_B"):
        mine = layer._parameters.pop(p, None)
        theirs = slot._parameters.pop(p, None)
        if theirs is not None:
            layer._parameters[p] = theirs
        if mine is not None:
            slot._parameters[p] = mine
    for f in _STATE:
        mine, theirs = getattr(layer, f), getattr(slot, f)
        setattr(layer, f, theirs)
        setattr(slot, f, mine)


@contextlib.contextmanager
def as_default(model: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block, ``model`` looks like a model holding adapter ``name`` alone, as its default adapter:
    layers with it hold it in ``lora_A`` / ``lora_B``, layers without it hold none, and no layer has named slots.
    Everything is put back on exit. ``None`` / ``"default"``: the default adapter alone."""
    name = DEFAULT if name is None else name
    if name not in adapter_names(model):
        raise ValueError(
            f"adapter_name={name!r} is not one of {type(model).__name__}'s adapters {adapter_names(model)}"
        )
    undo = []
    try:
        for _, m in _layers(model):
            container = m._modules.pop("lora_adapters", None)
            if container is None and name == DEFAULT:
                continue
            slot = container[name] if container is not None and name in container else None
            if name != DEFAULT:
                # a layer without the adapter: an empty slot, so that exchanging leaves it with none
                slot = slot or AdapterSlot({}, 0, 1, False, torch.float32)
                _exchange(m, slot)
            undo.append((m, container, slot))
        yield
    finally:
        for m, container, slot in reversed(undo):
            if slot is not None:
                _exchange(m, slot)
            if container is not None:
                m._modules["lora_adapters"] = container


def adapter_view(model: nn.Module, name: str | None) -> contextlib.AbstractContextManager:
    """:func:`as_default`, or nothing to do when ``name`` is None and ``model`` has no named adapters (the model
    then already is what a one-adapter function expects, including one with no adapter at all)."""
    if name is None and not any(slots(m) for _, m in _layers(model)):
        return contextlib.nullcontext()
    return as_default(model, check_name(name) if name is not None else None)


def promote_active(layer: LoRABase) -> bool:
    """For :func:`lora.merge_and_unload`: make the active adapter ``layer``'s default for good (the layer is being
    replaced by its plain layer); return whether there is anything to merge."""
    name = getattr(layer, "active_adapter", DEFAULT)
    if name is None:
        return False
    if name != DEFAULT:
        slot = slots(layer).get(name)
        if slot is None:
            return False
        _exchange(layer, slot)
    return has_adapter(layer)


# ---------------------------------------------------------------------------------------------------------------
# Forward


def is_routed(layer: LoRABase) -> bool:
    """Whether ``layer``'s forward must go through :func:`routed_forward` (another adapter, or a mixed batch)."""
    return getattr(layer, "active_adapter", DEFAULT) != DEFAULT or "lora_rows" in layer._buffers


def _factors(layer: LoRABase, A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B_full)``, with ``B_full @ A`` the unscaled update over the whole ``(out, in)`` weight: ``A: (R, in)``,
    ``B_full: (out, R)``. A per-slice ``MergedLinear``'s B is placed block by block (slice ``i`` uses rows
    ``i * r:(i + 1) * r`` of A)."""
    blocks = layer._blocks() if hasattr(layer, "_blocks") else None
    if blocks is None:
        return A, B
    full = B.new_zeros(layer.out_features, A.shape[0])
    for i, (start, size, b_row) in enumerate(blocks):
        full[start : start + size, i * r : (i + 1) * r] = B[b_row : b_row + size]
    return A, full


def _weight_out_in(layer: LoRABase) -> torch.Tensor:
    return layer.weight.T if layer.fan_in_fan_out else layer.weight


def _adapter_params(layer: LoRABase, name: str) -> tuple[torch.Tensor, torch.Tensor, int, float] | None:
    """``(lora_A, lora_B, r, scaling)`` of adapter ``name`` on ``layer``, or None if the layer lacks it."""
    if name == DEFAULT:
        return (layer.lora_A, layer.lora_B, layer.r, layer.scaling) if has_adapter(layer) else None
    slot = slots(layer).get(name)
    return (slot.lora_A, slot.lora_B, slot.r, slot.scaling) if slot is not None else None


def _lora_input(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        return x.to(like.dtype)
    return x


def routed_forward(layer: LoRABase, x: torch.Tensor) -> torch.Tensor:
    """The forward of a ``Linear`` / ``MergedLinear`` serving another adapter than the default, or a mixed batch.

    x: (..., in) -> (..., out); in a mixed batch x: (B, ..., in) with B the number of rows given to
    :func:`adapter_batch`.
    """
    if layer.merged:
        raise ValueError(
            f"{type(layer).__name__} is merged (its weight holds the default adapter): unmerge_lora "
            f"before serving another adapter or a mixed batch"
        )
    result = base_linear(x, _weight_out_in(layer), layer.bias)  # the frozen weight may be 4-bit (lora.qlora)
    rows = layer._buffers.get("lora_rows")
    if rows is None:
        params = _adapter_params(layer, layer.active_adapter) if layer.active_adapter is not None else None
        if params is None:
            return result
        A, B, r, scaling = params
        A, B = _factors(layer, A, B, r)
        h = F.linear(layer.lora_dropout(_lora_input(x, A)), A)  # (..., in) -> (..., R)
        return result + F.linear(h * scaling, B).to(result.dtype)  # (..., R) -> (..., out)
    if x.shape[0] != rows.shape[0]:
        raise ValueError(
            f"adapter_batch was given {rows.shape[0]} rows, but a layer got a batch of {x.shape[0]} "
            f"(input shape {tuple(x.shape)})"
        )
    A_t, B_t, scale = _stacks(layer)
    xb = layer.lora_dropout(_lora_input(x, A_t)).reshape(x.shape[0], -1, x.shape[-1])  # (B, N, in)
    h = torch.bmm(xb, A_t[rows]) * scale[rows]  # (B, N, in) @ (B, in, R) -> (B, N, R), times each row's scaling
    if result.dtype == h.dtype and not torch.is_grad_enabled():
        # accumulated into the base output, as the one-adapter forward does: (B, N, R) @ (B, R, out)
        return torch.baddbmm(result.view(*h.shape[:2], -1), h, B_t[rows], out=result.view(*h.shape[:2], -1)).view(
            result.shape
        )
    return result + torch.bmm(h, B_t[rows]).view(result.shape).to(result.dtype)


def _stacks(layer: LoRABase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A_t: (S, in, R), B_t: (S, R, out), scale: (S, 1, 1))``: entry 0 all zero (the base), entry ``k`` the
    ``k``-th name of the batch (zero where this layer lacks it); R the largest rank. Cached while no parameter
    changed (a parameter's ``_version`` counts its in-place writes) and no gradient is wanted."""
    names = layer._lora_row_names
    params = [_adapter_params(layer, n) for n in names]
    key = tuple((id(p[0]), p[0]._version, id(p[1]), p[1]._version, p[3]) if p is not None else None for p in params)
    # Rebuilt every forward (never cached) when gradients must flow through the stacks, and under torch.compile
    # (plain tensor ops, which it traces and fuses; the cache's buffers and versions would break the graph).
    fresh = torch.is_grad_enabled() and any(
        p is not None and (p[0].requires_grad or p[1].requires_grad) for p in params
    )
    fresh = fresh or torch.compiler.is_compiling()
    if not fresh and getattr(layer, "_lora_stack_key", None) == key and "lora_stack_A" in layer._buffers:
        return layer.lora_stack_A, layer.lora_stack_B, layer.lora_stack_scale
    factors = [
        None if p is None else _factors(layer, p[0], p[1], p[2]) for p in params
    ]  # (A: (R_i, in), B: (out, R_i))
    ref = next((f[0] for f in factors if f is not None), None)
    dtype = ref.dtype if ref is not None else layer.weight.dtype
    device = layer.weight.device
    rank = max([f[0].shape[0] for f in factors if f is not None], default=1)
    zero_a = torch.zeros(layer.in_features, rank, dtype=dtype, device=device)
    zero_b = torch.zeros(rank, layer.out_features, dtype=dtype, device=device)
    a_list, b_list = [zero_a], [zero_b]
    for f in factors:
        if f is None:
            a_list.append(zero_a)
            b_list.append(zero_b)
            continue
        A, B = f
        pad = rank - A.shape[0]
        a_list.append(F.pad(A.T.to(dtype), (0, pad)))  # (in, R_i) -> (in, R), zero columns
        b_list.append(F.pad(B.T.to(dtype), (0, 0, 0, pad)))  # (R_i, out) -> (R, out), zero rows
    A_t, B_t = torch.stack(a_list), torch.stack(b_list)
    scale = torch.tensor([0.0] + [p[3] if p is not None else 0.0 for p in params], dtype=dtype, device=device).view(
        -1, 1, 1
    )
    if not fresh:
        layer.register_buffer("lora_stack_A", A_t, persistent=False)
        layer.register_buffer("lora_stack_B", B_t, persistent=False)
        layer.register_buffer("lora_stack_scale", scale, persistent=False)
        layer._lora_stack_key = key
    return A_t, B_t, scale


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row ``i`` of every batch ``model`` computes uses adapter ``names[i]`` (``None``: the base
    model). Works on any model whose LoRA layers are :class:`lora.Linear` / :class:`lora.MergedLinear` (this
    library's Phi-3, transformers' models); batches must have ``len(names)`` rows (``generate`` with a KV cache
    keeps them). ``ValueError`` for an unknown name or a merged layer, before anything changes.
    """
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise ValueError(f"names must be a non-empty sequence of adapter names or None, one per row, got {names!r}")
    known = adapter_names(model)
    for n in names:
        if n is not None and n not in known:
            raise ValueError(f"adapter name {n!r} is not one of {type(model).__name__}'s adapters {known}")
    layers = [(n, m) for n, m in _layers(model)]
    for n, m in layers:
        if m.merged:
            raise ValueError(f"layer {n!r} is merged (its weight holds the default adapter): unmerge_lora first")
        if not supports_named(m):
            raise TypeError(f"mixed batches run on lora.Linear / lora.MergedLinear only; {n!r} is a {type(m).__name__}")
    if any("lora_rows" in m._buffers for _, m in layers):
        raise ValueError("adapter_batch blocks cannot be nested")
    order = list(dict.fromkeys(n for n in names if n is not None))  # stack entry k + 1 is order[k]
    device = next((m.weight.device for _, m in layers), torch.device("cpu"))
    rows = torch.tensor([0 if n is None else order.index(n) + 1 for n in names], dtype=torch.long, device=device)
    try:
        for _, m in layers:
            m.register_buffer("lora_rows", rows, persistent=False)
            m._lora_row_names = tuple(order)
        yield
    finally:
        for _, m in layers:
            for b in ("lora_rows", "lora_stack_A", "lora_stack_B", "lora_stack_scale"):
                m._buffers.pop(b, None)
            m.__dict__.pop("_lora_row_names", None)
            m.__dict__.pop("_lora_stack_key", None)
