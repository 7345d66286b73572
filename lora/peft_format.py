"""PEFT's adapter format, out and in: ``adapter_model.safetensors`` + ``adapter_config.json`` as Hugging Face PEFT
(0.21+) writes them, with keys ``base_model.model.<module>.lora_A.weight``. Each layer kind maps its own tensors to
PEFT's names and shapes (:meth:`lora.base.LoRABase.peft_tensors`); see ``docs/formats.md``.

Nothing here unpickles: a legacy PEFT ``adapter_model.bin`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._io import atomic_write, write_safetensors
from .adapters import DEFAULT, adapter_view, check_name, put_slot, slots, supports_named
from .base import has_adapter, is_lora_layer, is_mutating_init
from .checkpoint import adapted_modules, leaf, read_safetensors, swap_in
from .distributed import gathered_lora, is_sharded, is_writer
from .layers import KINDS, kind_for

__all__ = ["PEFT_PREFIX", "export_peft", "import_peft"]

PEFT_PREFIX = "base_model.model."


def _pattern_group(values: dict[str, Any]) -> dict[str, Any]:
    r"""{module name: value} -> {PEFT pattern key: value}: the leaf name when all of a leaf's modules agree, else an
    anchored, escaped full name (PEFT reads the keys as regexes, ``(.*\.)?(key)$``, so a bare ``a.fc`` would also
    match ``x.a.fc`` and its dots any character)."""
    by_leaf: dict[str, set] = {}
    for name, v in values.items():
        by_leaf.setdefault(leaf(name), set()).add(v)
    out = {}
    for name, v in values.items():
        out[re.escape(leaf(name)) if len(by_leaf[leaf(name)]) == 1 else "^" + re.escape(name)] = v
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def export_peft(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    uniform_rank: bool = False,
    task_type: str | None = "CAUSAL_LM",
    convert_to_lora: bool = False,
    adapter_name: str | None = None,
) -> dict[str, Any]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` that PEFT (0.21+) loads onto the same base.

    With several adapters (:mod:`lora.adapters`) ``adapter_name`` picks the one exported (default: ``"default"``).
    """
    with adapter_view(model, adapter_name):
        return _export_default(model, out_dir, base_model_name_or_path, uniform_rank, task_type, convert_to_lora)


def _export_default(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None,
    uniform_rank: bool,
    task_type: str | None,
    convert_to_lora: bool,
) -> dict[str, Any]:
    """:func:`export_peft` of the (single) default adapter.

    ``Linear``/``Embedding``/``Conv`` layers export one to one. A per-slice ``MergedLinear`` with ``k`` enabled
    slices exports as one rank ``r * k`` LoRA over the fused matrix: ``lora_A`` stacked, ``lora_B``
    block-structured, and ``lora_alpha`` chosen so PEFT's ``lora_alpha / rank`` equals this layer's scaling.
    Ranks and alphas that differ between modules go in PEFT's ``rank_pattern`` / ``alpha_pattern``; with
    ``uniform_rank=True`` every module is zero-padded to the largest rank instead, for serving tools that read only
    ``r`` and ``lora_alpha`` (vLLM, llama.cpp; see ``docs/formats.md``). rsLoRA is folded into ``lora_alpha`` (the file says ``use_rslora: false``).
    PiSSA / OLoRA layers (``init_lora_weights``) need ``convert_to_lora=True``: they are written as a plain LoRA of
    rank ``2r`` over the original base, as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
    writes them (PEFT reloading a PiSSA config would rerun its own decomposition on the base instead).
    Layer options PEFT computes differently (grouped or dilated convolutions, ``padding_mode``, an embedding's
    ``max_norm``) are a ``ValueError`` before anything is written. Returns the config written. On a sharded
    (FSDP2) model every rank must call it: the LoRA parameters are gathered whole, and rank 0 writes the files.
    """
    if is_sharded(model):
        with gathered_lora(model):
            return _write_peft(
                model, out_dir, base_model_name_or_path, uniform_rank, task_type, convert_to_lora, write=is_writer()
            )
    return _write_peft(model, out_dir, base_model_name_or_path, uniform_rank, task_type, convert_to_lora)


def _write_peft(
    model: nn.Module,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None,
    uniform_rank: bool,
    task_type: str | None,
    convert_to_lora: bool,
    write: bool = True,
) -> dict[str, Any]:
    modules = adapted_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA layer with r > 0: nothing to export")
    if "" in modules:
        raise ValueError(f"the model itself is a {type(model).__name__}: PEFT adapts submodules, wrap it in a module")
    fifo = {bool(getattr(m, "fan_in_fan_out", False)) for m in modules.values()}
    if len(fifo) > 1:
        raise ValueError("PEFT's fan_in_fan_out is one flag for the whole adapter; these modules mix both layouts")
    converted = {n for n, m in modules.items() if is_mutating_init(m.init_lora_weights)}
    if converted and not convert_to_lora:
        raise ValueError(
            f"modules {sorted(converted)[:3]}... were initialised with "
            f"{modules[sorted(converted)[0]].init_lora_weights} over a residual base: export them with "
            f"convert_to_lora=True (a plain LoRA of rank 2r over the original base)"
        )
    # r, or r * k for a MergedLinear; doubled for a converted PiSSA / OLoRA adapter
    ranks = {n: m.lora_A.shape[0] * (2 if n in converted else 1) for n, m in modules.items()}
    if uniform_rank:
        ranks = dict.fromkeys(ranks, max(ranks.values()))
    # PEFT's scaling is lora_alpha / rank. Without rsLoRA, alpha * rank / r keeps integer alphas integers (alpha * k
    # for a MergedLinear) where scaling * rank would carry the rounding of alpha / r.
    alphas = {
        n: _number(m.scaling * ranks[n] if m.use_rslora else m.lora_alpha * ranks[n] / m.r) for n, m in modules.items()
    }
    dora = {bool(m.use_dora) for m in modules.values()}
    if len(dora) > 1:
        raise ValueError("PEFT's use_dora is one flag for the whole adapter; these modules mix DoRA and plain LoRA")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        m.check_peft_compatible(name, m)
        tensors.update(
            {f"{PEFT_PREFIX}{name}.{k}": v for k, v in m.peft_tensors(ranks[name], converted=name in converted).items()}
        )

    r, alpha = Counter((ranks[n], alphas[n]) for n in modules).most_common(1)[0][0]
    rank_pattern = {k: v for k, v in _pattern_group(ranks).items() if v != r}
    alpha_pattern = {k: v for k, v in _pattern_group(alphas).items() if v != alpha}
    leaves = {leaf(n) for n in modules}
    all_of_leaf = all(n in modules for n, m in model.named_modules() if leaf(n) in leaves and hasattr(m, "weight"))
    dropouts = Counter(float(getattr(m.lora_dropout, "p", 0.0)) for m in modules.values())
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.most_common(1)[0][0],
        "target_modules": sorted(leaves) if all_of_leaf else sorted(modules),
        "bias": "none",
        "fan_in_fan_out": fifo.pop(),
        "use_rslora": False,  # alphas above already fold in rsLoRA's 1/sqrt(r)
        "use_dora": dora.pop(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if not write:
        return config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda tmp: write_safetensors(tmp, tensors, {"format": "pt"}))
    atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return config


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    r"""PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key, in file order,
    for which ``re.match(rf"(.*\.)?({key})$", name)`` succeeds."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# Options that change what a PEFT adapter computes beyond plain LoRA, refused unless at one of these values: PEFT's
# LoRA variants (the LoraConfig fields it marks is_lora_variant: DoRA, VeLoRA, aLoRA, MonteCLoRA, BD-LoRA, Arrow,
# KaSA), QA-LoRA, trainable biases and extra trained modules or tokens.
_UNSUPPORTED_PEFT: dict[str, tuple[Any, ...]] = {
    "velora_config": (None,),
    "alora_invocation_tokens": (None,),
    "monteclora_config": (None,),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "kasa_config": (None,),
    "use_qalora": (False, None),
    "modules_to_save": (None, [], ()),
    "bias": ("none",),
    "lora_bias": (False, None),
    "target_parameters": (None, [], ()),
    "layer_replication": (None,),
    "trainable_token_indices": (None, [], {}),
}
# init_lora_weights values with which PEFT rewrites the base weights (or runs a variant) when it loads the adapter,
# so the saved A and B alone do not reproduce it.
_UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq", "mica", "lora_ga")
# LoraConfig's fields in PEFT 0.21; any other key is warned about by name, so a newer variant's flag is not dropped
# unseen.
_KNOWN_PEFT_KEYS = frozenset(
    {
        "alora_invocation_tokens",
        "alpha_pattern",
        "arrow_config",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "exclude_modules",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "kasa_config",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "lora_ga_config",
        "megatron_config",
        "megatron_core",
        "modules_to_save",
        "monteclora_config",
        "peft_type",
        "peft_version",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "revision",
        "runtime_config",
        "target_modules",
        "target_parameters",
        "task_type",
        "trainable_token_indices",
        "use_bdlora",
        "use_dora",
        "use_qalora",
        "use_rslora",
        "velora_config",
    }
)
# PEFT's defaults for the two numbers a config may leave out.
_PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}
_PEFT_KEY = re.compile(
    rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    rf"|lora_magnitude_vector)"
)
_PEFT_HALF = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
    "lora_magnitude_vector": "M",
}


def _check_peft_config(cfg_path: Path, cfg: Any) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_path)!r} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{str(cfg_path)!r}: peft_type={cfg.get('peft_type')!r}; only LORA adapters can be imported")
    for key, ok in _UNSUPPORTED_PEFT.items():
        if key in cfg and cfg[key] not in ok:
            raise ValueError(
                f"{str(cfg_path)!r}: {key}={cfg[key]!r} is not supported by this library "
                f"(supported: {ok[0]!r}); refusing rather than dropping it silently"
            )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
        raise ValueError(
            f"{str(cfg_path)!r}: init_lora_weights={init!r} makes PEFT rewrite the base weights (or use a "
            f"LoRA variant) when it loads the adapter; convert it to a plain LoRA first "
            f"(PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{str(cfg_path)!r}: fan_in_fan_out=True adapters (GPT-2 Conv1D bases) are not supported")
    for key in ("r", "lora_alpha"):
        if key in cfg and (not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or not cfg[key] > 0):
            raise ValueError(f"{str(cfg_path)!r}: {key}={cfg[key]!r} must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{str(cfg_path)!r}: {key}={cfg[key]!r} must be an object")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"{str(cfg_path)!r}: {key} key {pattern!r} is not a valid regular expression ({e})"
                ) from e
    unknown = sorted(set(cfg) - _KNOWN_PEFT_KEYS)
    if unknown:
        warnings.warn(
            f"{str(cfg_path)!r}: ignoring keys this library does not know: {unknown} (written by a newer "
            f"PEFT?); check that none of them changes what the adapter computes",
            stacklevel=3,
        )


def import_peft(
    model: nn.Module, adapter_dir: str | os.PathLike, strict: bool = True, adapter_name: str | None = None
) -> list[str]:
    """Load a PEFT LoRA adapter directory onto ``model`` (this library's layers); return the adapted names.

    ``adapter_name`` (other than ``"default"``) imports it as a named adapter (:mod:`lora.adapters`) into
    ``lora.Linear`` layers (plain ``nn.Linear`` modules are injected without a default adapter first); PEFT's is one
    LoRA over each whole matrix, so a per-slice ``MergedLinear`` cannot hold it (inject Phi-3 with ``fused=True``).
    Loading into a name that exists with the same shapes copies the values in place.

    Each module with tensors in the file becomes a :class:`lora.Linear` / ``Embedding`` / ``Conv`` with PEFT's rank
    and scaling (from ``r``/``lora_alpha``/``use_rslora`` and the patterns, looked up as PEFT does); which modules
    are adapted follows the tensors (``target_modules`` / ``layers_to_transform`` only chose them at training).
    DoRA (``use_dora``, ``lora_magnitude_vector``) is imported as this library's DoRA. Options this library does
    not implement (the other LoRA variants, ``modules_to_save``, ``bias`` !=
    ``"none"``, initialisations that rewrite the base such as PiSSA, ...) are a ``ValueError``, as is a tensor whose
    module ``model`` lacks (PEFT would silently drop it), and (with ``strict``, as :func:`lora.load_lora`) LoRA
    layers already in ``model`` that the adapter does not cover. ``model`` is untouched on any error.
    """
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(cfg_path)!r} does not exist: not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(cfg_path)!r} is not valid JSON ({e})") from e
    _check_peft_config(cfg_path, cfg)
    named = adapter_name is not None and check_name(adapter_name) != DEFAULT
    tensors = _read_peft_tensors(adapter_dir)

    present = dict(model.named_modules())
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    problems: list[str] = []
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            problems.append(f"{key}: not a LoRA tensor this library can import")
            continue
        per_module.setdefault(m.group(1), {})[_PEFT_HALF[m.group(2)]] = t
    plan: dict[str, tuple[type, dict[str, Any]]] = {}
    for name, ab in per_module.items():
        module = present.get(name)
        if module is None:
            problems.append(f"{name}: the adapter has tensors for it but {type(model).__name__} has no such module")
            continue
        if not {"A", "B"} <= set(ab):
            problems.append(f"{name}: the adapter has lora_{'A' if 'A' in ab else 'B'} but not the other half")
            continue
        use_dora = bool(cfg.get("use_dora", False))
        if use_dora != ("M" in ab):
            problems.append(
                f"{name}: adapter_config.json says use_dora={use_dora} but the adapter "
                f"{'lacks' if use_dora else 'has'} its lora_magnitude_vector"
            )
            continue
        if named and use_dora:
            problems.append(f"{name}: named adapters are plain LoRA; import a DoRA adapter as the default adapter")
            continue
        if named and is_lora_layer(module) and not supports_named(module):
            problems.append(
                f"{name}: its default adapter is DoRA or PiSSA / OLoRA; named adapters need plain LoRA layers"
            )
            continue
        if is_lora_layer(module) and not (named and type(module) is KINDS["Linear"]):
            problems.append(
                f"{name}: already has LoRA; import a PEFT adapter into the plain base model"
                if not named
                else f"{name}: is a {type(module).__name__}; a named PEFT adapter (one LoRA over the whole "
                f"matrix) goes into a plain nn.Linear or a lora.Linear (Phi-3: inject fused=True)"
            )
            continue
        kind = KINDS["Linear"] if is_lora_layer(module) else kind_for(module)
        if named and kind is not KINDS["Linear"]:
            problems.append(f"{name}: is a {type(module).__name__}; named adapters run on linear layers only")
            continue
        if kind is None:
            adaptable = sorted({k.adapts.__name__ for k in KINDS.values()})
            problems.append(
                f"{name}: is a {type(module).__name__}; only {', '.join('nn.' + a for a in adaptable)} can be adapted"
            )
            continue
        if not name:
            problems.append("(root): the model itself cannot be replaced by a LoRA layer; wrap it in a module")
            continue
        try:
            kind.check_peft_compatible(name, module)
        except ValueError as e:
            problems.append(str(e))
            continue
        rank = ab["A"].shape[0] if ab["A"].dim() else 0
        alpha = _pattern_value(
            cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", _PEFT_DEFAULTS["lora_alpha"])
        )
        expect_rank = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r", _PEFT_DEFAULTS["r"]))
        if rank != expect_rank:
            said = (
                f"says r={expect_rank}"
                if "r" in cfg or (cfg.get("rank_pattern") or {})
                else f"gives no r (PEFT's default is {_PEFT_DEFAULTS['r']})"
            )
            problems.append(f"{name}: lora_A has rank {rank} but adapter_config.json {said}")
            continue
        for half, shape in zip("AB", kind.peft_shapes(module, rank)):
            if tuple(ab[half].shape) != shape:
                problems.append(f"{name}: lora_{half} shape expected {shape}, found {tuple(ab[half].shape)}")
            elif not ab[half].is_floating_point():
                problems.append(f"{name}: lora_{half} dtype {ab[half].dtype} is not floating point")
        if use_dora and tuple(ab["M"].shape) != kind.peft_magnitude_shape(module):
            problems.append(
                f"{name}: lora_magnitude_vector shape expected {kind.peft_magnitude_shape(module)}, "
                f"found {tuple(ab['M'].shape)}"
            )
        plan[name] = (
            kind,
            {
                "r": rank,
                "lora_alpha": alpha,
                "use_rslora": bool(cfg.get("use_rslora", False)),
                "use_dora": use_dora,
                "lora_dropout": float(cfg.get("lora_dropout", 0.0)),
                "lora_dtype": ab["A"].dtype,
            },
        )
    if strict:
        for name, m in present.items():
            if (adapter_name in slots(m) if named else has_adapter(m)) and name not in per_module:
                which = f"adapter {adapter_name!r}" if named else "LoRA"
                problems.append(f"{name}: has {which} in the model but not in the adapter (strict=True)")
    if not per_module and not problems:
        problems.append("the adapter holds no LoRA tensors")
    if problems:
        raise ValueError(
            f"PEFT adapter {str(adapter_dir)!r} does not fit {type(model).__name__} ({len(problems)} "
            f"problem{'s' if len(problems) > 1 else ''}); nothing was changed:\n  " + "\n  ".join(problems)
        )
    if named:  # plain modules become lora.Linear without a default adapter (r=0), then get the named one
        swap_in(model, {n: (kind, {**kw, "r": 0}) for n, (kind, kw) in plan.items() if not is_lora_layer(present[n])})
        for name, ab in per_module.items():
            kw = plan[name][1]
            put_slot(
                model.get_submodule(name),
                adapter_name,
                kw["r"],
                kw["lora_alpha"],
                kw["use_rslora"],
                {"lora_A": ab["A"], "lora_B": ab["B"]},
            )
        return list(per_module)
    swap_in(model, plan)
    for name, ab in per_module.items():
        model.get_submodule(name).load_peft(ab["A"], ab["B"], ab.get("M"))
    return list(per_module)


def _read_peft_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st, pt = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        tensors, _ = read_safetensors(st, what="PEFT adapter file")
        return tensors
    if pt.is_file():
        try:  # legacy PEFT format; weights_only refuses anything but tensors (never unpickle code)
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{str(pt)!r} could not be read as a tensor file ({type(e).__name__}: {e})") from e
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise ValueError(f"{str(pt)!r} does not hold a {{name: tensor}} dict")
        return tensors
    raise FileNotFoundError(f"{str(adapter_dir)!r} has neither adapter_model.safetensors nor adapter_model.bin")
