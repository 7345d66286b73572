"""Phi-3 configuration: one frozen dataclass read from, and written to, a Hugging Face ``config.json``.

Two layouts of ``config.json`` exist for ``Phi3ForCausalLM``:

* the Hub's (transformers 4.x): top-level ``rope_theta`` and ``rope_scaling`` (``null``, or
  ``{"type": "longrope" | "su", "short_factor": [...], "long_factor": [...]}``);
* transformers 5's re-saved one: ``rope_parameters`` = ``{"rope_type": "default" | "longrope", "rope_theta": ...,
  "short_factor": ..., "long_factor": ..., "partial_rotary_factor": ..., ...}``.

:meth:`Phi3Config.from_dict` reads both; :meth:`Phi3Config.to_dict` writes the Hub's, which every transformers
version reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["SUPPORTED_MODELS", "LongRoPEScaling", "Phi3Config"]

# Old Phi-3 checkpoints name LongRoPE "su" (and a few "yarn"); transformers maps both to "longrope", and so do we.
_LONGROPE_ALIASES = frozenset({"longrope", "su", "yarn"})

# The checkpoints whose config.json says model_type "phi3" and architectures ["Phi3ForCausalLM"]: what this module
# reads. Phi-3-small ("phi3small": block-sparse attention, GeGLU, muP), Phi-3-vision ("phi3_v"), Phi-3.5-MoE
# ("phimoe") and every other model_type are different architectures, refused before any weight is read.
SUPPORTED_MODELS = (
    "Phi-3-mini-4k",
    "Phi-3-mini-128k",
    "Phi-3.5-mini",
    "Phi-3-medium-4k",
    "Phi-3-medium-128k",
    "Phi-4-mini",
)
_ARCHITECTURE = "Phi3ForCausalLM"


@dataclass(frozen=True)
class LongRoPEScaling:
    """LongRoPE (https://arxiv.org/abs/2402.13753) rescaling of the rotary frequencies.

    ``short_factor`` divides the frequencies while the sequence fits in ``original_max_position_embeddings``,
    ``long_factor`` beyond it; each has one entry per rotary frequency (``rotary_dim // 2``). ``factor`` and
    ``attention_factor`` are kept only when the file gives them; :attr:`Phi3Config.rope_attention_factor` derives the
    effective value the way transformers does.
    """

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    factor: float | None = None
    attention_factor: float | None = None


@dataclass(frozen=True)
class Phi3Config:
    """Hyper-parameters of ``Phi3ForCausalLM``, with transformers' attribute names and defaults (Phi-3-mini-4k).

    ``num_key_value_heads`` defaults to ``num_attention_heads``; ``head_dim`` is derived (``hidden_size //
    num_attention_heads``). Invalid values raise ``ValueError`` naming the field and the value.
    """

    model_type: ClassVar[str] = "phi3"

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: LongRoPEScaling | None = None
    partial_rotary_factor: float = 1.0
    sliding_window: int | None = None
    resid_pdrop: float = 0.0
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 32000
    pad_token_id: int | None = 32000

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()

    # ------------------------------------------------------------------ derived values

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head are rotated: ``int(head_dim * partial_rotary_factor)``, as
        transformers."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_attention_factor(self) -> float:
        """The factor LongRoPE multiplies cos and sin by (1.0 without scaling).

        As transformers' ``_compute_longrope_parameters``: the explicit ``attention_factor`` if given, else
        ``sqrt(1 + log(s) / log(original_max_position_embeddings))`` with ``s`` the explicit ``factor`` or
        ``max_position_embeddings / original_max_position_embeddings``, and 1.0 when ``s <= 1``.
        """
        scaling = self.rope_scaling
        if scaling is None:
            return 1.0
        if scaling.attention_factor is not None:
            return scaling.attention_factor
        factor = scaling.factor
        if factor is None:
            factor = self.max_position_embeddings / self.original_max_position_embeddings
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a (possibly empty) tuple."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "original_max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Phi3Config.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Phi3Config.num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Phi3Config.num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"Phi3Config.hidden_act must be 'silu' (the only activation Phi-3 uses), got {self.hidden_act!r}"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Phi3Config.{name} must be a positive number, got {value!r}")
        for name in ("resid_pdrop", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"Phi3Config.{name} must be in [0, 1), got {value!r}")
        if not isinstance(self.partial_rotary_factor, (int, float)) or not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"Phi3Config.partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"Phi3Config.partial_rotary_factor={self.partial_rotary_factor} gives rotary_dim={self.rotary_dim} "
                f"(head_dim={self.head_dim}); it must be a positive even number"
            )
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool)
            or not isinstance(self.sliding_window, int)
            or self.sliding_window <= 0
        ):
            raise ValueError(
                f"Phi3Config.sliding_window must be None or a positive integer, got {self.sliding_window!r}"
            )
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            # transformers hands pad_token_id to nn.Embedding as padding_idx, which needs it inside the vocabulary.
            raise ValueError(
                f"Phi3Config.pad_token_id={self.pad_token_id} must be None or in [0, vocab_size={self.vocab_size})"
            )
        if self.eos_token_id is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) for i in self.eos_token_ids
        ):
            raise ValueError(
                f"Phi3Config.eos_token_id must be None, an int or a list of ints, got {self.eos_token_id!r}"
            )
        scaling = self.rope_scaling
        if scaling is not None:
            if not isinstance(scaling, LongRoPEScaling):
                raise ValueError(f"Phi3Config.rope_scaling must be None or a LongRoPEScaling, got {scaling!r}")
            n = self.rotary_dim // 2
            for name in ("short_factor", "long_factor"):
                factors = getattr(scaling, name)
                if len(factors) != n or not all(isinstance(f, (int, float)) and f > 0 for f in factors):
                    raise ValueError(
                        f"Phi3Config.rope_scaling.{name} must be {n} positive numbers (rotary_dim // 2), "
                        f"got {len(factors)}: {list(factors)!r}"
                    )
            for name in ("factor", "attention_factor"):
                value = getattr(scaling, name)
                if value is not None and (not isinstance(value, (int, float)) or not value > 0):
                    raise ValueError(f"Phi3Config.rope_scaling.{name} must be a positive number, got {value!r}")

    # ------------------------------------------------------------------ config.json

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Phi3Config:
        """Read a ``config.json`` dict in either layout (see the module docstring). ``d`` is not modified.

        A ``model_type`` other than ``"phi3"``, or ``architectures`` without ``"Phi3ForCausalLM"``, is refused
        first, naming the type and the supported models (:data:`SUPPORTED_MODELS`). Other unknown keys are
        ignored. ``attention_bias=True`` and a ``head_dim`` other than ``hidden_size // num_attention_heads`` are
        refused: Phi-3 has neither.
        """
        if not isinstance(d, dict):
            raise ValueError(f"Phi3Config.from_dict expects a dict, got {type(d).__name__}")
        _check_architecture(d)
        if d.get("attention_bias", False):
            raise ValueError(
                f"Phi3Config: attention_bias={d['attention_bias']!r} is not supported (Phi-3 has no biases)"
            )
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name in d and field.name not in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
                kwargs[field.name] = d[field.name]
        if "original_max_position_embeddings" in d and d["original_max_position_embeddings"] is None:
            del kwargs["original_max_position_embeddings"]
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
        kwargs.update(_parse_rope(d))
        config = cls(**kwargs)
        if d.get("head_dim") is not None and d["head_dim"] != config.head_dim:
            raise ValueError(
                f"Phi3Config: head_dim={d['head_dim']!r} differs from hidden_size // num_attention_heads = "
                f"{config.head_dim}; Phi-3 derives head_dim"
            )
        return config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> Phi3Config:
        """Read a ``config.json`` file; a ``ValueError`` names the file."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        try:
            return cls.from_dict(d)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """The Hub's ``config.json`` layout (``rope_theta`` and ``rope_scaling`` at top level)."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {
                "type": "longrope",
                "short_factor": list(self.rope_scaling.short_factor),
                "long_factor": list(self.rope_scaling.long_factor),
            }
            for name in ("factor", "attention_factor"):
                if getattr(self.rope_scaling, name) is not None:
                    rope_scaling[name] = getattr(self.rope_scaling, name)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "partial_rotary_factor": self.partial_rotary_factor,
            "sliding_window": self.sliding_window,
            "resid_pdrop": self.resid_pdrop,
            "attention_dropout": self.attention_dropout,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
        }


def _check_architecture(d: dict[str, Any]) -> None:
    """Refuse a config.json of another architecture (model_type / architectures), naming it and what is supported."""
    supported = f"supported: model_type 'phi3' with architectures ['{_ARCHITECTURE}'] ({', '.join(SUPPORTED_MODELS)})"
    model_type = d.get("model_type")
    if model_type is not None and model_type != Phi3Config.model_type:
        raise ValueError(f"model_type {model_type!r} is not Phi-3's architecture; {supported}")
    architectures = d.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or _ARCHITECTURE not in architectures):
        raise ValueError(f"architectures {architectures!r} is not Phi-3's causal LM; {supported}")


def _parse_rope(d: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta``, ``rope_scaling`` and ``partial_rotary_factor`` from either layout of ``config.json``."""
    hub, saved = d.get("rope_scaling"), d.get("rope_parameters")
    if hub is not None and saved is not None:
        raise ValueError("Phi3Config: config has both rope_scaling and rope_parameters; expected one layout")
    rope = hub if hub is not None else saved if saved is not None else {}
    field = "rope_scaling" if hub is not None else "rope_parameters"
    if not isinstance(rope, dict):
        raise ValueError(f"Phi3Config.{field} must be null or a dict, got {rope!r}")

    out: dict[str, Any] = {}
    for name, default in (("rope_theta", 10000.0), ("partial_rotary_factor", 1.0)):
        top, inner = d.get(name), rope.get(name)
        if top is not None and inner is not None and top != inner:
            raise ValueError(f"Phi3Config: {name}={top!r} disagrees with {field}.{name}={inner!r}")
        value = inner if inner is not None else top if top is not None else default
        out[name] = value

    # transformers keeps the top-level original_max_position_embeddings over the one inside rope_parameters.
    inner_omp = rope.get("original_max_position_embeddings")
    top_omp = d.get("original_max_position_embeddings")
    if inner_omp is not None and top_omp is not None and inner_omp != top_omp:
        raise ValueError(
            f"Phi3Config: original_max_position_embeddings={top_omp!r} disagrees with "
            f"{field}.original_max_position_embeddings={inner_omp!r}"
        )
    if top_omp is None and inner_omp is not None:
        out["original_max_position_embeddings"] = inner_omp

    # "rope_type" wins over the legacy "type" key, as in transformers' standardize_rope_params.
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        out["rope_scaling"] = None
    elif rope_type in _LONGROPE_ALIASES:
        for name in ("short_factor", "long_factor"):
            if not isinstance(rope.get(name), list):
                raise ValueError(f"Phi3Config.{field}.{name} must be a list of numbers, got {rope.get(name)!r}")
        out["rope_scaling"] = LongRoPEScaling(
            short_factor=tuple(rope["short_factor"]),
            long_factor=tuple(rope["long_factor"]),
            factor=rope.get("factor"),
            attention_factor=rope.get("attention_factor"),
        )
    else:
        raise ValueError(f"Phi3Config.{field} type must be 'default' or 'longrope' (or 'su'), got {rope_type!r}")
    return out
