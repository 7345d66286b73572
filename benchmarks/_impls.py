"""The implementations the benchmarks compare, built the same way for every script.

Layers: ``frozen`` (the torch layer, every parameter frozen), ``ours`` (this library, wrapping the very same
layer), ``loralib`` (loralib 0.1.2, weights copied in, ``merge_weights=False`` so ``eval()`` does not merge) and
``peft`` (PEFT's LoRA layer, obtained through ``get_peft_model`` on a one-layer holder module and then called
directly, so PeftModel's wrapper overhead is not timed). In every LoRA implementation only ``lora_A``/``lora_B``
train; the base weight and bias are frozen.

Models: transformers' ``Phi3ForCausalLM`` with full fine-tuning, this library's ``lora.phi3.inject``, PEFT's
``get_peft_model`` (one LoRA over each fused matrix, PEFT's only layout) or loralib (modules swapped by hand:
``MergedLinear`` over ``qkv_proj`` and ``gate_up_proj``, ``Linear`` over ``o_proj`` and ``down_proj``); and this
library's own ``Phi3ForCausalLM`` when it is there.
"""

from __future__ import annotations

import inspect
from typing import Any
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

import _timing  # noqa: F401  (puts the repository root on sys.path)
import lora
from lora.data import causal_lm_loss

PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def have(impl: str) -> bool:
    """Whether the library an implementation needs is installed."""
    module = {"loralib": "loralib", "peft": "peft"}.get(impl)
    return module is None or _timing.optional_import(module) is not None


def preload(impl: str) -> None:
    """Import what ``impl`` needs now, so a peak-memory child counts the case, not the library's code."""
    name = impl.split()[0]
    if name in ("loralib", "peft"):
        __import__(name)
    if name in ("peft", "full", "transformers"):
        from transformers import Phi3Config, Phi3ForCausalLM  # noqa: F401  (transformers imports lazily)
    if name == "peft":
        from peft import LoraConfig, get_peft_model  # noqa: F401


class Holder(nn.Module):
    """One layer under the name ``layer``: what PEFT's ``get_peft_model`` needs to adapt a lone layer."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _peft_layer(base: nn.Module, r: int, lora_alpha: float, lora_dropout: float) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        Holder(base), LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=["layer"])
    )
    return model.base_model.model.layer


def adapt_linear(
    base: nn.Linear,
    impl: str,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    enable_lora: Sequence[bool] | None = None,
    split_sizes: Sequence[int] | None = None,
) -> nn.Module:
    """``base`` (consumed) as ``impl``. With ``enable_lora`` ours and loralib adapt per slice; PEFT always puts one
    LoRA over the whole matrix (the only thing it can do with a fused projection)."""
    if impl == "frozen":
        return base.requires_grad_(False)
    if impl == "ours":
        if enable_lora is None:
            layer = lora.Linear.from_module(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        else:
            layer = lora.MergedLinear.from_module(
                base,
                r=r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                enable_lora=list(enable_lora),
                split_sizes=split_sizes,
            )
        lora.mark_only_lora_as_trainable(layer)
        return layer
    if impl == "loralib":
        import loralib

        kw: dict[str, Any] = dict(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, merge_weights=False, bias=base.bias is not None
        )
        if enable_lora is None:
            layer = loralib.Linear(base.in_features, base.out_features, **kw)
        else:
            if split_sizes is not None and len(set(split_sizes)) != 1:
                raise ValueError(f"loralib's MergedLinear needs equal slices, got split_sizes={list(split_sizes)}")
            layer = loralib.MergedLinear(base.in_features, base.out_features, enable_lora=list(enable_lora), **kw)
        layer = layer.to(base.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(base.weight)
            if base.bias is not None:
                layer.bias.copy_(base.bias)
        loralib.mark_only_lora_as_trainable(layer)
        return layer
    if impl == "peft":
        return _peft_layer(base, r, lora_alpha, lora_dropout)
    raise ValueError(f"unknown impl {impl!r}")


def adapt_conv2d(base: nn.Conv2d, impl: str, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> nn.Module:
    """``base`` (consumed, square kernel, zero padding) as ``impl``."""
    if impl == "frozen":
        return base.requires_grad_(False)
    if impl == "ours":
        layer = lora.Conv2d.from_module(base, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        lora.mark_only_lora_as_trainable(layer)
        return layer
    if impl == "loralib":
        import loralib

        layer = loralib.Conv2d(
            base.in_channels,
            base.out_channels,
            base.kernel_size[0],
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            merge_weights=False,
            stride=base.stride,
            padding=base.padding,
            bias=base.bias is not None,
        )
        with torch.no_grad():
            layer.conv.weight.copy_(base.weight)
            if base.bias is not None:
                layer.conv.bias.copy_(base.bias)
        loralib.mark_only_lora_as_trainable(layer)
        return layer
    if impl == "peft":
        return _peft_layer(base, r, lora_alpha, lora_dropout)
    raise ValueError(f"unknown impl {impl!r}")


def layer_train_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of ``layer`` on ``x`` (which requires grad), gradients dropped before each step."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        layer(x).backward(grad_out)

    return step


def layer_eval_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward under ``torch.no_grad()`` in eval mode."""
    layer.eval()

    def step() -> None:
        with torch.no_grad():
            layer(x)

    return step


# ---------------------------------------------------------------------------------------------------------------
# Phi-3 models


def our_phi3() -> tuple[type | None, type | None, str]:
    """``(Phi3ForCausalLM, Phi3Config, "")`` from this library, or ``(None, None, why)`` if it is not there yet."""
    try:
        from lora.phi3 import model as model_module  # noqa: F401
    except ImportError as e:
        return None, None, f"lora.phi3.Phi3ForCausalLM is not available ({e}); its rows are skipped"
    cls = getattr(model_module, "Phi3ForCausalLM", None)
    if cls is None:
        return None, None, "lora/phi3/model.py has no Phi3ForCausalLM yet; its rows are skipped"
    from lora.phi3.config import Phi3Config

    return cls, Phi3Config, ""


def phi3_config_dict(
    hidden: int, layers: int, heads: int, intermediate: int, vocab: int, kv_heads: int | None = None
) -> dict[str, Any]:
    """A Phi-3 ``config.json`` dict (Phi-3-mini-4k's other settings)."""
    special = 32000 if vocab > 32000 else vocab - 1  # eos/pad must lie inside a small test vocabulary
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        hidden_act="silu",
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        sliding_window=2047,
        resid_pdrop=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=special,
        pad_token_id=special,
    )


PHI3_MINI = phi3_config_dict(hidden=3072, layers=32, heads=32, intermediate=8192, vocab=32064)


def hf_phi3(cfg: dict[str, Any], dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> nn.Module:
    """transformers' ``Phi3ForCausalLM`` with random weights, built on ``device`` in ``dtype``, SDPA attention."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(**cfg)
    with torch.device(device):
        model = Phi3ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def ours_phi3(cfg: dict[str, Any], dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> nn.Module:
    """This library's ``Phi3ForCausalLM`` with random weights, built directly on ``device`` in ``dtype``."""
    cls, config_cls, why = our_phi3()
    if cls is None:
        raise RuntimeError(why)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config_cls.from_dict(cfg))
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).train()


def add_lora(model: nn.Module, impl: str, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.05) -> nn.Module:
    """Make ``model`` (a Phi-3, ours or transformers') train as ``impl``: "full", "ours", "peft" or "loralib".

    Returns the model to train (PEFT wraps it; the others change it in place).
    """
    if impl == "full":
        return model.requires_grad_(True)
    if impl in ("ours", "ours-fused"):  # per-slice qkv / gate_up (the default), or one LoRA per fused matrix
        lora.phi3.inject(model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, fused=impl == "ours-fused")
        return model
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(
            model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=PHI3_TARGETS)
        )
    if impl == "loralib":
        import loralib

        cfg = model.config
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if cfg.num_key_value_heads != cfg.num_attention_heads:
                raise ValueError("loralib's MergedLinear needs equal q/k/v slices (no grouped-query attention)")
            attn.qkv_proj = adapt_linear(attn.qkv_proj, "loralib", r, lora_alpha, lora_dropout, [True] * 3)
            attn.o_proj = adapt_linear(attn.o_proj, "loralib", r, lora_alpha, lora_dropout)
            mlp.gate_up_proj = adapt_linear(mlp.gate_up_proj, "loralib", r, lora_alpha, lora_dropout, [True] * 2)
            mlp.down_proj = adapt_linear(mlp.down_proj, "loralib", r, lora_alpha, lora_dropout)
        loralib.mark_only_lora_as_trainable(model)
        return model.train()
    raise ValueError(f"unknown impl {impl!r}")


def lm_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of ``ids: (B, T)``, through the model's own ``labels=`` path when it has one.
    ``labels``: (B, T) with -100 where no loss is taken (default: ``ids``, every position labelled)."""
    labels = ids if labels is None else labels
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # PeftModel passes them on
    kwargs: dict[str, Any] = {"use_cache": False} if "use_cache" in params or takes_kwargs else {}
    if "labels" in params:
        out = model(ids, labels=labels, **kwargs)
        loss = getattr(out, "loss", None)
        if loss is None:
            loss = out["loss"] if isinstance(out, dict) else out[0]
        return loss
    out = model(ids, **kwargs)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return causal_lm_loss(logits, labels)  # the loss our model's labels= path computes


def model_train_step(
    model: nn.Module, ids: torch.Tensor, lr: float = 1e-4, labels: torch.Tensor | None = None
) -> Callable[[], torch.Tensor]:
    """One training step: forward, loss (on ``labels``, default ``ids``), backward, AdamW (torch defaults) over the
    parameters that require grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, ids, labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def gradient_checkpointing(model: nn.Module) -> bool:
    """Turn on activation checkpointing (non-reentrant for transformers); False if the model has no such switch."""
    fn = getattr(model, "gradient_checkpointing_enable", None)
    if fn is None:
        return False
    if "gradient_checkpointing_kwargs" in inspect.signature(fn).parameters:
        fn(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        fn()
    return True
