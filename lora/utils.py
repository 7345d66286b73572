"""Model-level helpers: which parameters train, which go in a LoRA checkpoint, and explicit merging.

Selection is by module type (:func:`lora.is_lora_layer`) and exact parameter names (``lora_A``, ``lora_B``,
``bias``), never by substring: loralib's ``'lora_' in name`` also unfreezes a head called ``flora_head``, and its
``'bias' in key`` also saves a causal-mask buffer called ``attn.bias``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .adapters import AdapterSlot, active_adapter, adapter_names, as_default, promote_active
from .base import LoRABase, has_adapter, is_lora_layer
from .layers import Embedding
from .distributed import full_tensor, refuse_sharded
from .qlora import dequantize_layer

__all__ = [
    "BIAS_MODES",
    "lora_parameter_names",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload",
    "loraplus_param_groups",
]

BIAS_MODES = ("none", "all", "lora_only")
_LORALIB_PARAMS = ("lora_A", "lora_B")  # what a loralib-style LoRALayer subclass trains


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got bias={bias!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _lora_params_of(module: nn.Module) -> tuple[str, ...]:
    return module.lora_param_names() if isinstance(module, LoRABase) else _LORALIB_PARAMS


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRABase]]:
    """This library's LoRA layers that have an adapter, with their names."""
    for name, module in model.named_modules():
        if isinstance(module, LoRABase) and has_adapter(module):
            yield name, module


def lora_parameter_names(model: nn.Module, bias: str = "none") -> list[str]:
    """Names (as in ``model.named_parameters()``/``state_dict()``) of the parameters a LoRA run trains and saves.

    ``bias='none'``: the LoRA parameters of LoRA layers. ``'all'``: those and every parameter named exactly
    ``bias``. ``'lora_only'``: those and the ``bias`` of LoRA layers. Named adapters (:mod:`lora.adapters`) are
    LoRA parameters too: ``<layer>.lora_adapters.<name>.lora_A`` / ``lora_B``.
    """
    _check_bias(bias)
    names = []
    for mod_name, module in model.named_modules():
        lora = is_lora_layer(module)
        wanted = _lora_params_of(module) if lora else _LORALIB_PARAMS if isinstance(module, AdapterSlot) else ()
        for p_name, p in module.named_parameters(recurse=False):
            if p is None:
                continue
            if p_name in wanted or (p_name == "bias" and (bias == "all" or (bias == "lora_only" and lora))):
                names.append(_join(mod_name, p_name))
    return names


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Set ``requires_grad`` to True exactly for :func:`lora_parameter_names` and False for every other parameter."""
    trainable = set(lora_parameter_names(model, bias))
    for name, p in model.named_parameters():
        p.requires_grad = name in trainable


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The subset of ``model.state_dict()`` that :func:`lora_parameter_names` selects (loralib's keys), detached.

    Read from the parameters directly: ``state_dict()`` would also compute every merged layer's unmerged weight.
    On a sharded (FSDP2, ``DTensor``) model each tensor is gathered whole: a collective, every rank must call it.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: full_tensor(params[name]) for name in lora_parameter_names(model, bias)}


def _check_mergeable(layers: list[tuple[str, LoRABase]]) -> None:
    """``ValueError`` naming the first layer whose merged weight would not be finite; one layer's delta at a time."""
    for name, m in layers:
        if not m.merged_is_finite():
            raise ValueError(
                f"refusing to merge {name or type(m).__name__}: its merged weight is not finite "
                f"(the delta, or weight + delta in {m.weight.dtype}, is inf or nan); "
                f"no layer was changed"
            )


def merge_lora(model: nn.Module, safe: bool = True) -> nn.Module:
    """Fold every LoRA layer's update into its weight, in place (fp32 sum, one cast). Idempotent.

    ``safe`` (default): every merged weight is checked for inf/nan first; if any would not be finite a
    ``ValueError`` names the module and no weight is changed. Each layer keeps an undo record of at most one byte
    per weight (see :mod:`lora._merge`) so :func:`unmerge_lora` restores the weights bit for bit. Works on a single
    layer too. Returns ``model``.
    """
    refuse_sharded(model, "merge_lora")
    layers = list(_lora_modules(model))
    if safe:
        _check_mergeable(layers)
    for _, m in layers:
        m.merge(safe=False)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` on every merged LoRA layer: bit for bit where the undo record still applies."""
    for _, m in _lora_modules(model):
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge every LoRA layer and replace it by its plain torch layer (``nn.Linear``, ...), for deployment.

    Final: no undo record is kept. Layer by layer (merge one, swap it for its plain layer, go on), so the memory
    above the model's own at any time is one layer's fp32 delta. The merged weights are the LoRA layers' own
    Parameter objects, adopted by the plain layers (no copy). ``safe`` (default) checks every merged weight for
    inf/nan before anything changes. A LoRA layer over a 4-bit (NF4) weight is merged into its dequantized weight
    (in the dtype it was quantized from); plain 4-bit layers stay 4-bit (:func:`lora.dequantize` turns them back
    too). If ``model`` itself is a LoRA layer, the plain layer is returned. LoRA layers of other libraries
    (loralib-style subclasses) are left as they are. With several adapters (:mod:`lora.adapters`) the active one is
    merged (none after ``set_adapter(model, None)``) and the others are dropped.
    """
    refuse_sharded(model, "merge_and_unload")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRABase)]
    for name, m in layers:  # check before merging: a refusal must leave the model as it was
        if m.fan_in_fan_out:
            raise ValueError(
                f"merge_and_unload cannot turn the fan_in_fan_out layer {name or type(m).__name__!r} "
                f"into {m.adapts.__name__}; merge_lora it instead"
            )
    active = active_adapter(model)
    if safe and active in adapter_names(model):
        with as_default(model, active):  # check the adapter that will be merged
            _check_mergeable([(n, m) for n, m in layers if has_adapter(m)])
    for name, m in layers:
        dequantize_layer(m)  # a 4-bit base: merged into its dequantized weight (4 bits would lose the update)
        if not m.merged and promote_active(m):  # the active adapter (lora.set_adapter) becomes the one merged
            m.__dict__.pop("active_adapter", None)
            m.merge(safe=False, exact_unmerge=False)
        m._merge_record = None  # a layer merged earlier by merge_lora: its record is no longer needed
        plain = m.to_plain()
        if not name:
            return plain
        model.set_submodule(name, plain)
    return model


def loraplus_param_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, lr_embedding: float = 1e-6, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024: B learns ``ratio`` times faster than A), as PEFT's
    ``create_loraplus_optimizer`` forms them: ``torch.optim.AdamW(loraplus_param_groups(model, lr=2e-4))``.

    Every parameter that requires grad lands in exactly one group (each group has a ``name``; empty groups are
    left out):

    * ``"A"``, lr ``lr``: ``lora_A`` of the non-embedding LoRA layers, and any other trainable parameter of 2 or
      more dims;
    * ``"B"``, lr ``lr * ratio``: ``lora_B`` of the non-embedding LoRA layers, DoRA's ``lora_magnitude`` (of
      every layer, embeddings included, as PEFT), and any other trainable 1-dim parameter (PEFT puts every vector
      with B) except ...
    * ``"B_no_decay"``, lr ``lr * ratio``, weight decay 0: ... parameters named ``bias``;
    * ``"embedding"``, lr ``lr_embedding`` (PEFT's default 1e-6): ``lora_A`` / ``lora_B`` of :class:`lora.Embedding`.

    ``weight_decay`` applies to every group but ``"B_no_decay"``.
    """
    for name, v in (("lr", lr), ("ratio", ratio), ("lr_embedding", lr_embedding)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a positive number, got {name}={v!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got weight_decay={weight_decay!r}")
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    seen: set[int] = set()
    for module in model.modules():
        lora_names = set(module.lora_param_names()) if isinstance(module, LoRABase) else set()
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))  # tied parameters once
            if p_name in lora_names and isinstance(module, Embedding) and p_name != "lora_magnitude":
                groups["embedding"].append(p)
            elif p_name in lora_names:
                groups["A" if p_name == "lora_A" else "B"].append(p)
            elif p.ndim >= 2:
                groups["A"].append(p)
            else:
                groups["B_no_decay" if p_name == "bias" else "B"].append(p)
    rates = {"A": lr, "embedding": lr_embedding, "B": lr * ratio, "B_no_decay": lr * ratio}
    return [
        {"name": g, "params": ps, "lr": rates[g], "weight_decay": 0.0 if g == "B_no_decay" else weight_decay}
        for g, ps in groups.items()
        if ps
    ]
