"""LoRA for Phi-3's fused projections, on this library's Phi-3 and on transformers' ``Phi3ForCausalLM`` alike.

Phi-3 fuses q, k and v into ``self_attn.qkv_proj`` (rows ``q | k | v`` of sizes ``heads * head_dim``,
``kv_heads * head_dim``, ``kv_heads * head_dim``) and gate and up into ``mlp.gate_up_proj`` (rows
``gate | up``, ``intermediate_size`` each). By default each slice gets its own rank-``r`` LoRA
(:class:`lora.MergedLinear`); ``fused=True`` puts one LoRA over each fused matrix, as PEFT does.

Only ``model.config``'s ``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``, ``intermediate_size``
and (optionally) ``head_dim`` are read: the core never imports transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..injection import inject as inject_modules

__all__ = ["GATE_UP_SLICES", "QKV_SLICES", "TARGETS", "inject", "split_sizes", "trainable_count"]

TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
QKV_SLICES = ("q", "k", "v")
GATE_UP_SLICES = ("gate", "up")
_PATHS = {
    "qkv_proj": "self_attn.qkv_proj",
    "o_proj": "self_attn.o_proj",
    "gate_up_proj": "mlp.gate_up_proj",
    "down_proj": "mlp.down_proj",
}


def split_sizes(config: Any) -> dict[str, tuple[int, ...]]:
    """Row layout of the fused projections: ``{"qkv_proj": (q, k, v), "gate_up_proj": (gate, up)}``."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "qkv_proj": (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim),
        "gate_up_proj": (config.intermediate_size, config.intermediate_size),
    }


def _check_subset(name: str, chosen: Sequence[str], allowed: Sequence[str]) -> list[bool]:
    if (
        isinstance(chosen, str)
        or not chosen
        or any(c not in allowed for c in chosen)
        or len(set(chosen)) != len(chosen)
    ):
        raise ValueError(f"{name}={chosen!r} must be a non-empty subset of {allowed}")
    return [a in chosen for a in allowed]


def _target_kwargs(
    config: Any, targets: Sequence[str], qkv_slices: Sequence[str], gate_up_slices: Sequence[str], fused: bool
) -> dict[str, dict[str, Any]]:
    if isinstance(targets, str) or not targets or any(t not in TARGETS for t in targets):
        raise ValueError(f"targets={targets!r} must be a non-empty subset of {TARGETS}")
    enable = {
        "qkv_proj": _check_subset("qkv_slices", qkv_slices, QKV_SLICES),
        "gate_up_proj": _check_subset("gate_up_slices", gate_up_slices, GATE_UP_SLICES),
    }
    if fused and (not all(enable["qkv_proj"]) or not all(enable["gate_up_proj"])):
        raise ValueError("fused=True puts one LoRA over the whole fused matrix: it cannot adapt a subset of slices")
    sizes = split_sizes(config)
    per_target: dict[str, dict[str, Any]] = {}
    for t in targets:
        per_target[_PATHS[t]] = {} if fused or t not in sizes else {"split_sizes": sizes[t], "enable_lora": enable[t]}
    return per_target


def inject(
    model: nn.Module,
    r: int = 16,
    lora_alpha: float = 32,
    lora_dropout: float = 0.05,
    targets: Sequence[str] = TARGETS,
    *,
    qkv_slices: Sequence[str] = QKV_SLICES,
    gate_up_slices: Sequence[str] = GATE_UP_SLICES,
    fused: bool = False,
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: str = "default",
    lora_dtype: Any = None,
    mark_trainable: bool = True,
) -> list[str]:
    """Adapt a Phi-3 model's projections with LoRA, in place; return the replaced module names.

    ``targets`` picks among ``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` (default: all four, as
    Hugging Face's Phi-3 LoRA recipe). ``qkv_proj`` becomes a :class:`lora.MergedLinear` over the slices
    ``qkv_slices`` (``("q", "v")`` is the LoRA paper's choice) and ``gate_up_proj`` one over ``gate_up_slices``;
    ``o_proj`` and ``down_proj`` become :class:`lora.Linear`. ``fused=True`` makes every target a plain
    :class:`lora.Linear` (PEFT's layout). ``use_dora`` adds DoRA's magnitude (per slice for a ``MergedLinear``);
    ``init_lora_weights`` as :func:`lora.inject` (PiSSA / OLoRA per slice). ``lm_head`` and the embeddings are never touched. With
    ``mark_trainable`` only LoRA parameters require grad afterwards.
    """
    if not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no .config; expected a Phi-3 causal LM (ours or transformers')")
    per_target = _target_kwargs(model.config, targets, qkv_slices, gate_up_slices, fused)
    return inject_modules(
        model,
        per_target,
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        lora_dtype=lora_dtype,
        mark_trainable=mark_trainable,
    )


def trainable_count(
    config: Any,
    r: int = 16,
    targets: Sequence[str] = TARGETS,
    *,
    qkv_slices: Sequence[str] = QKV_SLICES,
    gate_up_slices: Sequence[str] = GATE_UP_SLICES,
    fused: bool = False,
) -> int:
    """LoRA parameters :func:`inject` creates, from the config alone.

    Per layer and target: a LoRA over an ``in -> out`` matrix has ``r * (in + out)`` parameters; per-slice,
    each enabled slice has its own ``A`` (``r * in``) and its rows of ``B`` (``r * rows``).
    """
    per_target = _target_kwargs(config, targets, qkv_slices, gate_up_slices, fused)
    h, inter = config.hidden_size, config.intermediate_size
    fan = {
        "qkv_proj": (h, sum(split_sizes(config)["qkv_proj"])),
        "o_proj": (split_sizes(config)["qkv_proj"][0], h),
        "gate_up_proj": (h, 2 * inter),
        "down_proj": (inter, h),
    }
    total = 0
    for path, kw in per_target.items():
        fan_in, fan_out = fan[path.rpartition(".")[2]]
        if "split_sizes" in kw:
            enabled = [s for s, e in zip(kw["split_sizes"], kw["enable_lora"]) if e]
            total += r * (fan_in * len(enabled) + sum(enabled))
        else:
            total += r * (fan_in + fan_out)
    return total * config.num_hidden_layers
