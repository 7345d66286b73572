"""Phi-3 (``Phi3ForCausalLM``) in plain PyTorch, with transformers' module and parameter names.

A transformers ``Phi3ForCausalLM`` state dict loads into :class:`Phi3ForCausalLM` with ``strict=True`` and back: the
rotary frequencies are non-persistent buffers, nothing else is state. The projections are plain ``nn.Linear``
attributes called as modules (``self.qkv_proj(x)``), so a LoRA injector can swap them for ``nn.Linear`` subclasses.

Math follows transformers' ``models/phi3/modeling_phi3.py`` (v5); where it has a quirk we match it, and the comment
says so (search for "transformers").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lora._io import SafetensorsReader, atomic_write
from lora.adapters import adapter_batch
from lora.qlora import Linear4bit, Weight4bit, is_quantized
from lora.data import causal_lm_loss, lm_head_loss
from lora.phi3.config import Phi3Config

__all__ = ["CausalLMOutput", "KVCache", "Phi3ForCausalLM"]

# One (key, value) pair per decoder layer, each (batch, num_key_value_heads, cached_len, head_dim), rotary applied.
KVCache = tuple[tuple[Tensor, Tensor], ...]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# From torch 2.5 on, F.scaled_dot_product_attention shares key/value heads across query groups itself
# (enable_gqa), and a query row whose keys are all masked gives zeros rather than NaN.
_TORCH_2_5 = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_SDPA_HAS_GQA = _SDPA_ZEROES_EMPTY_ROWS = _TORCH_2_5


class CausalLMOutput:
    """``logits``: (batch, seq, vocab); ``loss``: fp32 scalar when labels were given; ``past_key_values``: the
    updated cache when ``use_cache=True``.

    With labels, the model computes the loss from the hidden states without logits (:func:`lora.data.lm_head_loss`)
    and passes ``hidden_states`` and ``lm_head`` instead: ``logits`` is then computed on first access (outside the
    model's autocast context, if it ran under one), so a training loop that reads only the loss never pays for it.
    """

    def __init__(
        self,
        logits: Tensor | None = None,
        loss: Tensor | None = None,
        past_key_values: KVCache | None = None,
        hidden_states: Tensor | None = None,
        lm_head: nn.Module | None = None,
    ) -> None:
        if (logits is None) == (hidden_states is None or lm_head is None):
            raise ValueError("CausalLMOutput needs logits, or hidden_states and lm_head (not both)")
        self._logits, self._hidden_states, self._lm_head = logits, hidden_states, lm_head
        self.loss, self.past_key_values = loss, past_key_values

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            self._logits = self._lm_head(self._hidden_states)  # (B, T, hidden) -> (B, T, vocab)
            self._hidden_states = self._lm_head = None
        return self._logits


class Phi3RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiplies it, as transformers does."""

    def __init__(self, hidden_size: int, eps: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device))
        self.variance_epsilon = eps

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., hidden_size) -> same shape and dtype."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def _inverse_frequencies(config: Phi3Config, device: torch.device | None) -> tuple[Tensor, Tensor | None]:
    """fp32 (rotary_dim / 2,) inverse frequencies: LongRoPE's short and long sets, or the plain set and None."""
    dim = config.rotary_dim
    # transformers: inv_freq = 1 / (factor * theta ** (2i / dim)), in fp32
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    base = config.rope_theta**exponents
    scaling = config.rope_scaling
    if scaling is None:
        return 1.0 / base, None
    short = torch.tensor(scaling.short_factor, dtype=torch.float32, device=device)
    long = torch.tensor(scaling.long_factor, dtype=torch.float32, device=device)
    return 1.0 / (short * base), 1.0 / (long * base)


class Phi3RotaryEmbedding(nn.Module):
    """cos and sin of the rotary angles, LongRoPE-rescaled when the config asks for it.

    The inverse frequencies are fp32 non-persistent buffers (derived from the config, never saved), and stay fp32
    through ``model.to(torch.bfloat16)``; transformers' are rounded by that call (not by ``from_pretrained(dtype=)``).
    """

    def __init__(self, config: Phi3Config, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        inv_freq, long_inv_freq = _inverse_frequencies(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)
        self.attention_factor = config.rope_attention_factor
        self.original_max_position_embeddings = config.original_max_position_embeddings

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Phi3RotaryEmbedding:
        # nn.Module's one path for .to(), .cuda(), .half(): it casts floating buffers too. Rounded to bf16 (relative
        # error up to 2**-9), a frequency near 1 puts position 4000's angle off by up to ~8 radians, so rebuild the
        # frequencies in fp32 wherever they moved.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq, self.long_inv_freq = _inverse_frequencies(self.config, self.inv_freq.device)
        return self

    def forward(
        self, position_ids: Tensor, dtype: torch.dtype, max_position: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """position_ids: (B or 1, T) -> cos, sin: (B or 1, T, 1, rotary_dim) in ``dtype``.

        LongRoPE picks the long factors for the whole batch when ``max(position_ids) + 1`` exceeds
        ``original_max_position_embeddings`` (transformers' rule); pass ``max_position`` when it is known, to
        decide without reading the tensor.
        """
        inv_freq = self.inv_freq
        if self.long_inv_freq is not None:
            limit = self.original_max_position_embeddings
            if max_position is not None:
                inv_freq = self.long_inv_freq if max_position + 1 > limit else self.inv_freq
            else:  # a 0-d condition: no host sync
                inv_freq = torch.where(position_ids.max() + 1 > limit, self.long_inv_freq, self.inv_freq)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, 1) * (dim/2,) -> (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype)[:, :, None], sin.to(dtype)[:, :, None]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, heads, head_dim); cos, sin: (B or 1, T, 1, rotary_dim). Rotates the first rotary_dim channels."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


class _KVBuffer(tuple):
    """One layer's (keys, values) inside :meth:`Phi3ForCausalLM.generate`: views of the first positions of two
    buffers allocated once for the whole generation, so each new token's keys and values are written in place
    instead of concatenated onto a copy of the whole cache (one copy per token and layer, quadratic over a long
    reply). Only ``generate`` makes them and it never hands one out: two continuations of one cache would write
    into the same buffer."""

    buffers: tuple[Tensor, Tensor] | None
    capacity: int

    def __new__(cls, capacity: int, buffers: tuple[Tensor, Tensor] | None = None, length: int = 0) -> _KVBuffer:
        empty = torch.empty(0, 0, 0, 0)  # no buffer yet: past_len 0 to the model, allocated by the first extend
        views = (empty, empty) if buffers is None else (buffers[0][:, :, :length], buffers[1][:, :, :length])
        self = super().__new__(cls, views)
        self.capacity, self.buffers = capacity, buffers
        return self

    def extend(self, k: Tensor, v: Tensor) -> _KVBuffer:
        """This cache followed by ``k``, ``v``: (B, kv, T, head_dim), in the buffers' next T positions."""
        start = self[0].shape[2]
        end = start + k.shape[2]
        buffers = self.buffers
        if buffers is None:
            buffers = tuple(t.new_empty(*t.shape[:2], self.capacity, t.shape[3]) for t in (k, v))
        if end > buffers[0].shape[2]:  # generate sizes the buffers for every position it feeds the model
            raise RuntimeError(f"KV buffer of {buffers[0].shape[2]} positions cannot hold {end}")
        buffers[0][:, :, start:end] = k
        buffers[1][:, :, start:end] = v
        return _KVBuffer(self.capacity, buffers, end)


class Phi3Attention(nn.Module):
    """Grouped-query attention with a fused q|k|v projection (rows ordered q, k, v) and rotary embeddings."""

    def __init__(self, config: Phi3Config, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        qkv_size = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        # o_proj first: transformers' registration order, hence its state-dict (and shard) order.
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False, device=device)
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_size, bias=False, device=device)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        past: tuple[Tensor, Tensor] | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x: (B, T, hidden) -> (B, T, hidden), and the layer's (key, value) cache when ``use_cache``."""
        b, t, _ = x.shape
        h, kv = self.num_heads, self.num_key_value_heads
        qkv = self.qkv_proj(x).unflatten(-1, (h + 2 * kv, self.head_dim))  # (B, T, h + 2kv, head_dim)
        # q and k are the leading h + kv heads of the fused projection: rotate them in one go.
        qk = _apply_rotary(qkv[:, :, : h + kv], cos, sin)
        q = qk[:, :, :h].transpose(1, 2)  # (B, h, T, head_dim)
        k = qk[:, :, h:].transpose(1, 2)  # (B, kv, T, head_dim)
        v = qkv[:, :, h + kv :].transpose(1, 2)  # (B, kv, T, head_dim)
        if isinstance(past, _KVBuffer):  # generate's cache: this step's keys and values written in place
            present = past.extend(k, v)
            k, v = present
        else:
            if past is not None:
                k = torch.cat((past[0], k), dim=2)
                v = torch.cat((past[1], v), dim=2)
            present = (k, v)
        present = present if use_cache else None

        gqa: dict[str, bool] = {}
        if kv != h:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:  # (B, kv, S, d) -> (B, h, S, d), each kv head repeated for its group of query heads
                k = k.repeat_interleave(h // kv, dim=1)
                v = v.repeat_interleave(h // kv, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.head_dim**-0.5,
            **gqa,
        )  # (B, h, T, head_dim)
        out = out.transpose(1, 2).reshape(b, t, h * self.head_dim)
        return self.o_proj(out), present


class Phi3MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate|up projection: ``down(up * silu(gate))``."""

    def __init__(self, config: Phi3Config, device: torch.device | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False, device=device)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False, device=device)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., hidden) -> (..., hidden)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Phi3DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: Phi3Config, device: torch.device | None = None) -> None:
        super().__init__()
        self.self_attn = Phi3Attention(config, device=device)
        self.mlp = Phi3MLP(config, device=device)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.resid_pdrop = config.resid_pdrop

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        past: tuple[Tensor, Tensor] | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x: (B, T, hidden) -> (B, T, hidden), and the layer's cache when ``use_cache``."""
        attn, present = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, past, use_cache)
        x = x + F.dropout(attn, self.resid_pdrop, self.training)
        x = x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.resid_pdrop, self.training)
        return x, present


def _attention_mask(
    attention_mask: Tensor | None,
    past_len: int,
    q_len: int,
    sliding_window: int | None,
    device: torch.device,
    segment_ids: Tensor | None = None,
) -> tuple[Tensor | None, bool]:
    """The mask for F.scaled_dot_product_attention, and whether its ``is_causal`` fast path applies instead.

    attention_mask: (B, past_len + q_len) of 1 (token) / 0 (padding), or None. Query i is token ``past_len + i`` of
    the key timeline; it sees key j when ``j <= past_len + i``, ``past_len + i - j < sliding_window`` (transformers'
    ``kv_idx > q_idx - sliding_window``: the window counts the query itself) and key j is not padding. Returns a bool
    (B or 1, 1, q_len, kv_len) mask, or None when every query sees every earlier key.

    segment_ids: (B, q_len) ints, several sequences packed into one row (no cache): key j is seen only from a query
    of the same segment, so the mask is block-diagonal causal and attention never crosses a sequence boundary.
    """
    kv_len = past_len + q_len
    padded = False
    if segment_ids is not None:
        if past_len or segment_ids.dim() != 2 or segment_ids.shape[1] != q_len:
            raise ValueError(
                f"segment_ids must be (batch, {q_len}) without a cache (past {past_len}), got {tuple(segment_ids.shape)}"
            )
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] != kv_len:
            raise ValueError(
                f"attention_mask must be (batch, past + new tokens) = (batch, {kv_len}), "
                f"got {tuple(attention_mask.shape)}"
            )
        padded = not bool(attention_mask.all())
    windowed = sliding_window is not None and kv_len > sliding_window
    if not padded and not windowed and segment_ids is None:
        if past_len == 0:
            return None, q_len > 1  # SDPA's is_causal aligns top-left: right only without a cache
        if q_len == 1:
            return None, False
    q_idx = torch.arange(past_len, kv_len, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(kv_len, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx  # (T, S)
    if windowed:
        allowed = allowed & (k_idx > q_idx - sliding_window)
    if segment_ids is not None:  # (T, S) & (B, 1, T, 1) == (B, 1, 1, S) -> (B, 1, T, S)
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    else:
        allowed = allowed[None, None]
    if not padded:
        return allowed, False
    allowed = allowed & attention_mask.bool()[:, None, None, :]  # (T, S) & (B, 1, 1, S) -> (B, 1, T, S)
    if not _SDPA_ZEROES_EMPTY_ROWS:
        # A left-padding query sees no key at all, a NaN row before torch 2.5; let it see itself instead.
        allowed = allowed | (k_idx == q_idx)
    # From torch 2.5 such a row attends to nothing and comes out zero, as in transformers' "sdpa" attention. That
    # matters: the last padding position's logits predict the first real token, so they enter the loss.
    return allowed, False


class Phi3Model(nn.Module):
    """Embeddings, decoder layers and the final norm (transformers' ``Phi3Model``, the ``model.`` prefix)."""

    def __init__(self, config: Phi3Config, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        # transformers passes pad_token_id as padding_idx: that embedding row gets no gradient.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id, device=device)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, device=device) for _ in range(config.num_hidden_layers))
        self.norm = Phi3RMSNorm(config.hidden_size, config.rms_norm_eps, device=device)
        self.rotary_emb = Phi3RotaryEmbedding(config, device=device)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        segment_ids: Tensor | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        """input_ids: (B, T) -> hidden states (B, T, hidden), and the updated cache when ``use_cache``.
        segment_ids: (B, T), packed rows: attention stays within each run of equal ids (see ``_attention_mask``)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.layers)}")
        t = input_ids.shape[1]
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        x = self.embed_tokens(input_ids)

        max_position = None
        if position_ids is None:  # as transformers' forward: positions continue the cache, padding or not
            position_ids = torch.arange(past_len, past_len + t, device=x.device)[None]
            max_position = past_len + t - 1
        cos, sin = self.rotary_emb(position_ids, x.dtype, max_position)
        attn_mask, is_causal = _attention_mask(
            attention_mask, past_len, t, self.config.sliding_window, x.device, segment_ids
        )

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        presents = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            if checkpointing:
                x, present = checkpoint(layer, x, cos, sin, attn_mask, is_causal, past, use_cache, use_reentrant=False)
            else:
                x, present = layer(x, cos, sin, attn_mask, is_causal, past, use_cache)
            presents.append(present)
        return self.norm(x), tuple(presents) if use_cache else None


class Phi3ForCausalLM(nn.Module):
    """Phi-3 with a language-model head; parameter names match transformers' ``Phi3ForCausalLM``.

    ``config`` is kept as an attribute with transformers' names (``num_attention_heads``, ``num_key_value_heads``,
    ``hidden_size``, ``head_dim``, ``intermediate_size``, ``num_hidden_layers``).
    """

    def __init__(self, config: Phi3Config, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not isinstance(config, Phi3Config):
            raise ValueError(f"config must be a Phi3Config, got {type(config).__name__}")
        self.config = config
        self.model = Phi3Model(config, device=device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        # transformers' _init_weights: N(0, initializer_range) for linears and embeddings, padding row zero, norms one.
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        adapter_names: list[str | None] | None = None,
        segment_ids: Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids: (B, T) token ids; attention_mask: (B, past + T) of 1/0 (left or right padding);
        position_ids: (B or 1, T), default ``past + arange(T)``; labels: (B, T), ``-100`` ignored.
        ``adapter_names``: one LoRA adapter name (or None: the base) per row, a mixed batch
        (:func:`lora.adapter_batch`; PEFT calls this argument the same).

        The loss is transformers' (:func:`lora.data.causal_lm_loss`): labels shifted left by one, mean
        cross-entropy over non-ignored tokens, in fp32; it is computed by :func:`lora.data.lm_head_loss` on the
        labelled positions only, in chunks, and ``logits`` only when read.
        ``logits_to_keep > 0`` computes logits for the last that many positions only (generation).
        ``segment_ids``: (B, T) for packed rows (:func:`lora.data.collate_packed`): attention never crosses from one
        segment to another; pass the per-segment ``position_ids`` that come with them.
        """
        if adapter_names is not None:
            with adapter_batch(self, adapter_names):
                return self(
                    input_ids,
                    attention_mask,
                    position_ids,
                    labels,
                    past_key_values,
                    use_cache,
                    logits_to_keep,
                    segment_ids=segment_ids,
                )
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, segment_ids)
        if logits_to_keep:
            if labels is not None:
                raise ValueError("labels need logits for every position; use logits_to_keep=0")
            hidden = hidden[:, -logits_to_keep:]
        if labels is None:
            return CausalLMOutput(logits=self.lm_head(hidden), past_key_values=cache)  # (B, T, vocab)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        if type(self.lm_head) is not nn.Linear or self.lm_head.bias is not None:  # an adapted or quantized head
            logits = self.lm_head(hidden)  # (B, T, vocab)
            return CausalLMOutput(logits=logits, loss=causal_lm_loss(logits, labels), past_key_values=cache)
        loss = lm_head_loss(hidden, self.lm_head.weight, labels)
        return CausalLMOutput(loss=loss, past_key_values=cache, hidden_states=hidden, lm_head=self.lm_head)

    # ------------------------------------------------------------------ training helpers

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in the backward pass (training mode only), trading compute for memory."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def compile_layers(self, **compile_kwargs: object) -> None:
        """``torch.compile`` each decoder layer in place (``nn.Module.compile``), with any LoRA layers inside it:
        parameter names and the state dict stay as they are, and gradient checkpointing still recomputes each
        layer. ``compile_kwargs`` go to ``torch.compile`` (``backend=``, ``mode=``, ``dynamic=``)."""
        for layer in self.model.layers:
            layer.compile(**compile_kwargs)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (a tied embedding counted once); only those with ``requires_grad`` if asked."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | tuple[int, ...] | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        streamer: Callable[[Tensor], None] | None = None,
        adapter_names: list[str | None] | None = None,
    ) -> Tensor:
        """Extend ``input_ids`` (B, T) by up to ``max_new_tokens``; returns (B, T + generated) token ids.

        ``temperature=0`` is greedy; otherwise sample from ``softmax(logits / temperature)`` restricted to the
        top-``top_p`` nucleus. Rows that produced an end token (``eos_token_id``, default the config's) continue with
        ``pad_token_id``; generation stops when every row has ended. ``attention_mask`` (B, T) marks left padding;
        positions then count real tokens only, as in transformers' ``generate``. ``streamer`` gets each new (B,)
        token tensor. ``adapter_names``: one LoRA adapter (or None) per row, as in :meth:`forward`.
        """
        if adapter_names is not None:
            with adapter_batch(self, adapter_names):  # one block for every step: the adapters are stacked once
                return self.generate(
                    input_ids,
                    max_new_tokens,
                    temperature,
                    top_p,
                    eos_token_id,
                    attention_mask,
                    use_cache,
                    generator,
                    streamer,
                )
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if eos_token_id is None:
            eos = self.config.eos_token_ids
        else:
            eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        device = self.lm_head.weight.device
        ids = input_ids.to(device)
        eos_ids = torch.tensor(eos, dtype=ids.dtype, device=device)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (eos[0] if eos else 0)

        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(device)
            positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T)
        else:
            positions = torch.arange(ids.shape[1], device=device)[None].expand(ids.shape[0], -1)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        # every position the model is fed: the prompt and all generated tokens but the last
        capacity = ids.shape[1] + max_new_tokens

        def empty_cache() -> KVCache | None:
            return tuple(_KVBuffer(capacity) for _ in self.model.layers) if use_cache else None

        cache = empty_cache()
        omp = self.config.original_max_position_embeddings
        for _ in range(max_new_tokens):
            past_len = 0 if cache is None else cache[0][0].shape[2]
            # transformers' Phi3 quirk: the cached keys were rotated with LongRoPE's short factors; once the sequence
            # outgrows original_max_position_embeddings, drop the cache and recompute everything with the long ones.
            if past_len and self.config.rope_scaling is not None and ids.shape[1] > omp >= past_len:
                cache, past_len = empty_cache(), 0
            out = self(
                ids[:, past_len:],
                attention_mask=mask,
                position_ids=positions[:, past_len:],
                past_key_values=cache,
                use_cache=use_cache,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].float()  # (B, vocab)
            next_ids = self._next_token(logits, temperature, top_p, generator)
            next_ids = next_ids.masked_fill(finished, pad)
            ids = torch.cat((ids, next_ids[:, None]), dim=1)
            positions = torch.cat((positions, positions[:, -1:] + 1), dim=1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)
            if streamer is not None:
                streamer(next_ids)
            finished = finished | torch.isin(next_ids, eos_ids)
            if eos and bool(finished.all()):
                break
        return ids

    @staticmethod
    def _next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
        """logits: (B, vocab) fp32 -> (B,) token ids."""
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_p < 1.0:
            # transformers' TopPLogitsWarper: drop the least likely tokens whose total mass is <= 1 - top_p.
            sorted_logits, order = logits.sort(dim=-1)
            drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
            drop_sorted[:, -1] = False  # always keep the most likely token
            logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    # ------------------------------------------------------------------ files

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        *,
        quantize: str | None = None,
        double_quant: bool = True,
    ) -> Phi3ForCausalLM:
        """Load a Hugging Face checkpoint directory: ``config.json`` and ``model.safetensors`` or shards listed in
        ``model.safetensors.index.json``.

        The model is built on the meta device and each tensor read once, straight to ``device`` (cast to ``dtype``
        if given, else kept as stored): the weights are never held twice. A tied checkpoint may omit
        ``lm_head.weight``.

        ``quantize="nf4"`` (QLoRA): every linear weight but ``lm_head``'s is quantized to NF4 as it is read (after the
        cast to ``dtype``, which stays the weight's nominal dtype), so at most one full-precision linear weight exists
        at a time; those layers become :class:`lora.qlora.Linear4bit` (see :func:`lora.quantize`; ``double_quant``
        as there). Embeddings, norms and the head keep ``dtype``. The files are then read rather than memory-mapped:
        a mapping would keep every page of the full-precision weights it read resident while the model lives.
        """
        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize must be None or 'nf4', got quantize={quantize!r}")
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
        config = Phi3Config.from_json_file(config_file)
        device = torch.device(device)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            del expected["lm_head.weight"]
        four_bit = set()  # the linear weights quantized while loading
        if quantize is not None:
            four_bit = {
                f"{name}.weight" for name, m in model.named_modules() if type(m) is nn.Linear and name != "lm_head"
            }

        loaded: dict[str, Tensor] = {}
        for file in _weight_files(path):
            with _open_weights(file, device, mapped=quantize is None) as (keys, shape_of, read):
                for key in keys:
                    if config.tie_word_embeddings and key == "lm_head.weight":
                        continue  # transformers ties too, ignoring a stored head
                    if key not in expected:
                        raise ValueError(f"unexpected key {key!r} in {file} (not a parameter of Phi3ForCausalLM)")
                    shape = shape_of(key)
                    if shape != tuple(expected[key]):
                        raise ValueError(
                            f"{file}: {key!r} has shape {shape}, expected {tuple(expected[key])} from {config_file}"
                        )
                    tensor = read(key)
                    tensor = tensor if dtype is None else tensor.to(dtype)
                    if key in four_bit:
                        tensor = Weight4bit.quantize(tensor, double_quant=double_quant)  # the full one goes now
                    loaded[key] = tensor
        missing = sorted(set(expected) - set(loaded))
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} parameter(s): {', '.join(missing)}")
        for key in four_bit:
            name = key.removesuffix(".weight")
            model.set_submodule(name, Linear4bit(loaded.pop(key), model.get_submodule(name).bias))
        model.load_state_dict(loaded, strict=False, assign=True)
        # Non-persistent buffers are not in the checkpoint: build the rotary frequencies on the real device.
        model.model.rotary_emb = Phi3RotaryEmbedding(config, device=device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def save_pretrained(self, path: str | os.PathLike[str], max_shard_size: int | str = "5GB") -> None:
        """Write ``config.json`` and the weights in transformers' layout: ``model.safetensors``, or, past
        ``max_shard_size`` bytes (an int, or a string like ``"5GB"`` / ``"500MiB"``), shards
        ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``. Each file is written to a
        temporary name and renamed into place; weight files of an earlier save that this one does not produce are
        removed. A model with 4-bit layers is refused (transformers' layout has no NF4 weights): save it after
        :func:`lora.dequantize`.
        """
        four_bit = [name for name, m in self.named_modules() if is_quantized(m)]
        if four_bit:
            raise ValueError(
                f"cannot save {len(four_bit)} 4-bit layers ({four_bit[0]}, ...) in Hugging Face layout: "
                "lora.dequantize(model, dtype=torch.bfloat16) first"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        limit = _parse_size(max_shard_size)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            del state["lm_head.weight"]  # the same tensor as model.embed_tokens.weight; safetensors refuses aliases

        shards: list[dict[str, Tensor]] = [{}]
        shard_bytes = 0
        for key, tensor in state.items():
            size = tensor.numel() * tensor.element_size()
            if shards[-1] and shard_bytes + size > limit:
                shards.append({})
                shard_bytes = 0
            shards[-1][key] = tensor
            shard_bytes += size

        written = {CONFIG_NAME}
        _write_text(path / CONFIG_NAME, json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            names = [WEIGHTS_NAME]
        else:
            names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            # transformers refuses safetensors files without the "format" metadata
            atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
            written.add(name)
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_parameters": sum(t.numel() for t in state.values()),
                    "total_size": sum(t.numel() * t.element_size() for t in state.values()),
                },
                "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
            }
            _write_text(path / WEIGHTS_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.add(WEIGHTS_INDEX_NAME)
        for stale in path.iterdir():
            if stale.name not in written and (
                stale.name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME) or _SHARD_NAME.fullmatch(stale.name)
            ):
                stale.unlink()


@contextlib.contextmanager
def _open_weights(file: Path, device: torch.device, mapped: bool):
    """``(keys, shape_of, read)`` for one safetensors file: memory-mapped (a tensor reads from the file's pages as it
    is used, and nothing is copied), or, with ``mapped=False``, read tensor by tensor into memory of its own."""
    if mapped:
        with safe_open(file, framework="pt", device=str(device)) as f:
            yield f.keys(), lambda key: tuple(f.get_slice(key).get_shape()), f.get_tensor
    else:
        with SafetensorsReader(file) as f:
            yield f.keys(), f.shape, lambda key: f.read(key).to(device)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; raises FileNotFoundError naming what is missing."""
    index_file = path / WEIGHTS_INDEX_NAME
    if index_file.is_file():
        with open(index_file, encoding="utf-8") as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        first_key: dict[str, str] = {}
        for key, name in weight_map.items():
            first_key.setdefault(name, key)
        for name, key in first_key.items():
            if not (path / name).is_file():
                raise FileNotFoundError(f"shard {path / name} listed in {index_file} is missing (it holds {key!r})")
        return [path / name for name in sorted(first_key)]
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {path}")


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10**9, as transformers) or ``"500MiB"`` (2**20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
        if match is None:
            raise ValueError(f"max_shard_size must be an int or a size like '5GB' or '500MiB', got {size!r}")
        value = int(float(match[1]) * _SIZE_UNITS[match[2]])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _write_text(target: Path, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
