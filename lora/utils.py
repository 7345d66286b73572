"""Model-level helpers: which parameters train, which go in a LoRA checkpoint, and explicit merging.

Selection is by module type (:func:`lora.is_lora_layer`) and exact parameter names (``lora_A``, ``lora_B``,
``bias``), never by substring: loralib's ``'lora_' in name`` also unfreezes a head called ``flora_head``, and its
``'bias' in key`` also saves a causal-mask buffer called ``attn.bias``.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, MergedLinear, is_lora_layer

__all__ = [
    "BIAS_MODES",
    "lora_parameter_names",
    "mark_only_lora_as_trainable",
    "lora_state_dict",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload",
]

BIAS_MODES = ("none", "all", "lora_only")
LORA_PARAMS = ("lora_A", "lora_B")


def _check_bias(bias: str) -> None:
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got bias={bias!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_lora_layer(module):
            yield name, module


def lora_parameter_names(model: nn.Module, bias: str = "none") -> list[str]:
    """Names (as in ``model.named_parameters()``/``state_dict()``) of the parameters a LoRA run trains and saves.

    ``bias='none'``: the ``lora_A``/``lora_B`` of LoRA layers. ``'all'``: those and every parameter named exactly
    ``bias``. ``'lora_only'``: those and the ``bias`` of LoRA layers.
    """
    _check_bias(bias)
    names = []
    for mod_name, module in model.named_modules():
        lora = is_lora_layer(module)
        for p_name, p in module.named_parameters(recurse=False):
            if p is None:
                continue
            if (lora and p_name in LORA_PARAMS) or (p_name == "bias" and (bias == "all" or (bias == "lora_only" and lora))):
                names.append(_join(mod_name, p_name))
    return names


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Set ``requires_grad`` to True exactly for :func:`lora_parameter_names` and False for every other parameter."""
    trainable = set(lora_parameter_names(model, bias))
    for name, p in model.named_parameters():
        p.requires_grad = name in trainable


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The subset of ``model.state_dict()`` that :func:`lora_parameter_names` selects (loralib's keys)."""
    wanted = set(lora_parameter_names(model, bias))
    state = model.state_dict()
    # state_dict() keys follow the module tree; named_parameters() drops duplicates (tied weights) but a LoRA
    # parameter is never tied, so every wanted name is a state_dict key.
    return {k: v for k, v in state.items() if k in wanted}


def merge_lora(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold every LoRA layer's update into its weight, in place (fp32 sum, one cast). Idempotent.

    With ``safe=True`` every delta is checked for inf/nan first; if any is not finite a ``ValueError`` names the
    module and no weight is changed. Works on a single layer too. Returns ``model``.
    """
    layers = [(n, m) for n, m in _lora_modules(model) if hasattr(m, "merge")]
    if safe:
        with torch.no_grad():
            for name, m in layers:
                if not m.merged and m.r > 0 and m._parameters.get("lora_A") is not None:
                    if not torch.isfinite(m.delta_weight()).all():
                        raise ValueError(f"refusing to merge {name or type(m).__name__}: its LoRA delta is not finite")
    for _, m in layers:
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` on every merged LoRA layer, restoring the weights bit for bit. Idempotent."""
    for _, m in _lora_modules(model):
        if hasattr(m, "unmerge"):
            m.unmerge()
    return model


_PLAIN = {Linear: nn.Linear, MergedLinear: nn.Linear, Embedding: nn.Embedding,
          Conv1d: nn.Conv1d, Conv2d: nn.Conv2d, Conv3d: nn.Conv3d}


def _plain_copy(m: nn.Module) -> nn.Module:
    """The plain torch layer of a (merged) LoRA layer, sharing its weight and bias objects."""
    if isinstance(m, (Linear, MergedLinear)):
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    elif isinstance(m, Embedding):
        plain = nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, max_norm=m.max_norm,
                             norm_type=m.norm_type, scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse,
                             device="meta")
    else:
        plain = _PLAIN[type(m)](m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                                dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                                padding_mode=m.padding_mode, device="meta")
    plain.weight = m.weight
    if getattr(m, "bias", None) is not None:
        plain.bias = m.bias
    plain.train(m.training)
    return plain


def merge_and_unload(model: nn.Module, safe: bool = True) -> nn.Module:
    """Merge every LoRA layer and replace it by its plain torch layer (``nn.Linear``, ...), for deployment.

    The weights are merged in place and adopted by the plain layers (no copy). ``safe`` (default True) refuses a
    non-finite delta before anything changes. If ``model`` itself is a LoRA layer, the plain layer is returned.
    LoRA layers of other libraries (loralib-style subclasses) are left as they are.
    """
    for name, m in model.named_modules():  # check before merging: a refusal must leave the model as it was
        if type(m) in (Linear, MergedLinear) and m.fan_in_fan_out:
            raise ValueError(f"merge_and_unload cannot turn the fan_in_fan_out layer {name or type(m).__name__!r} "
                             f"into nn.Linear; merge_lora it instead")
    merge_lora(model, safe=safe)
    if type(model) in _PLAIN:
        return _plain_copy(model)
    for name, m in list(model.named_modules()):
        if type(m) in _PLAIN:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, _plain_copy(m))
    return model
