"""Swap LoRA layers into an existing model, adopting its weights (no copy, no re-initialisation).

``inject(model, ["self_attn.o_proj", "mlp.down_proj"], r=16, lora_alpha=32)`` replaces every ``nn.Linear`` /
``nn.Embedding`` / ``nn.Conv1d/2d/3d`` whose dotted name equals a target or ends with ``"." + target``. Names are
matched on whole path components, never as substrings: ``"proj"`` matches ``mlp.proj`` but not ``mlp.down_proj``.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping, Sequence

import torch.nn as nn

from .base import check_init, is_mutating_init
from .layers import KINDS, is_lora_layer, kind_for
from .utils import mark_only_lora_as_trainable

__all__ = ["inject", "matches", "OVERRIDABLE"]

# Keyword arguments a target may override: the shared ones, and the kinds' own fields, which also choose the kind
# (split_sizes -> MergedLinear).
OVERRIDABLE = frozenset(
    {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "lora_dtype"}
).union(*(kind.lora_fields for kind in KINDS.values()))


def matches(name: str, target: str) -> bool:
    """True if the dotted module ``name`` is ``target`` or ends with ``"." + target``."""
    return name == target or name.endswith("." + target)


def _lora_class(name: str, module: nn.Module, kwargs: Mapping[str, Any]) -> type:
    if is_lora_layer(module):
        raise ValueError(f"module {name!r} already has LoRA ({type(module).__name__}); inject each module once")
    kind = kind_for(module, kwargs)
    if kind is None:
        base_type = type(module)
        adaptable = sorted({k.adapts.__name__ for k in KINDS.values()})
        if any(k.adapts is base_type for k in KINDS.values()):
            raise TypeError(f"module {name!r}: split_sizes/enable_lora need an nn.Linear, got {base_type.__name__}")
        raise TypeError(
            f"module {name!r} is a {base_type.__module__}.{base_type.__name__}; LoRA can be injected "
            f"into exactly {', '.join('nn.' + a for a in adaptable)}"
        )
    return kind


def inject(
    model: nn.Module,
    targets: Sequence[str] | Mapping[str, Mapping[str, Any]],
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    *,
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: str = "default",
    lora_dtype: Any = None,
    mark_trainable: bool = True,
) -> list[str]:
    """Replace the modules named by ``targets`` with LoRA layers, in place; return the replaced names, in order.

    ``targets``: module names or dotted-path suffixes, or a mapping from each to per-target overrides of ``r``,
    ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora`` (DoRA: a trainable magnitude per output row,
    see :meth:`lora.LoRABase.delta_weight`), ``init_lora_weights`` (``"default"``, ``"gaussian"``, ``"pissa"``,
    ``"pissa_niter_<k>"``, ``"olora"``: the last three, linear layers only, subtract the initial adapter from the
    base weight, in place), ``lora_dtype`` (and ``split_sizes`` / ``enable_lora``, which
    make that target a :class:`lora.MergedLinear`). Every target must match at least one module, every matched
    module must be a plain ``nn.Linear`` / ``nn.Embedding`` / ``nn.ConvNd`` without LoRA, and no module may match
    two targets; otherwise a ``ValueError`` / ``TypeError`` is raised before the model is touched.

    The new layers adopt the existing ``weight`` / ``bias`` Parameter objects. With ``mark_trainable`` (default),
    :func:`lora.mark_only_lora_as_trainable` runs afterwards, so only LoRA parameters require grad.
    """
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of module names, not the string {targets!r}")
    per_target = dict(targets) if isinstance(targets, Mapping) else {t: {} for t in targets}
    if not per_target:
        raise ValueError("targets is empty: name at least one module to adapt")
    for target, overrides in per_target.items():
        unknown = set(overrides) - OVERRIDABLE
        if unknown:
            raise ValueError(
                f"target {target!r} overrides unknown arguments {sorted(unknown)}; allowed: {sorted(OVERRIDABLE)}"
            )

    defaults = dict(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        lora_dtype=lora_dtype,
    )
    plan: list[tuple[str, type, dict[str, Any]]] = []
    hits = {t: 0 for t in per_target}
    for name, module in model.named_modules():
        matched = [t for t in per_target if matches(name, t)]
        if not matched:
            continue
        if len(matched) > 1:
            raise ValueError(f"module {name!r} matches several targets {matched}; make the targets unambiguous")
        target = matched[0]
        hits[target] += 1
        kwargs = {**defaults, **per_target[target]}
        cls = _lora_class(name, module, kwargs)
        if is_mutating_init(check_init(kwargs["init_lora_weights"])) and not cls.supports_mutating_init:
            raise ValueError(
                f"module {name!r}: init_lora_weights={kwargs['init_lora_weights']!r} is not available "
                f"for {cls.__name__} (PEFT defines PiSSA and OLoRA for linear layers only)"
            )
        plan.append((name, cls, kwargs))
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ValueError(f"targets {missing} matched no module of {type(model).__name__}")

    # Check every argument on weightless (meta) layers first: PiSSA / OLoRA write the base weights while building,
    # so a bad argument found at the last module must not leave the first ones changed.
    for name, cls, kwargs in plan:
        module = model.get_submodule(name)
        cls(**cls.base_kwargs(module), device="meta", dtype=module.weight.dtype, **kwargs)
    # Then build every new layer, then swap them in: all or nothing.
    built = [(name, cls.from_module(model.get_submodule(name), **kwargs)) for name, cls, kwargs in plan]
    for name, layer in built:
        model.set_submodule(name, layer)
    if mark_trainable:
        mark_only_lora_as_trainable(model)
    return [name for name, _ in built]
