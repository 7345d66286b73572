"""Adapter files: this library's native safetensors format, and PEFT's format in and out.

Native format (``save_lora`` / ``load_lora``): one ``.safetensors`` file whose tensors are exactly
:func:`lora.lora_state_dict` (loralib's keys, e.g. ``model.layers.0.self_attn.qkv_proj.lora_A``) and whose
safetensors metadata (string -> string) holds:

* ``format``: ``"lora.adapter"``; ``format_version``: ``"1"``; ``bias``: the ``bias`` mode the file was saved with;
* ``modules``: JSON ``{module name: {...}}`` with, per adapted module, ``kind`` (``Linear``, ``MergedLinear``,
  ``Embedding``, ``Conv1d``/``2d``/``3d``), ``r``, ``lora_alpha``, ``use_rslora``, ``lora_dropout``,
  ``lora_dtype``, ``base_shape`` (the shape of the weight it was trained on), ``fan_in_fan_out``, and for
  ``MergedLinear`` ``split_sizes`` / ``enable_lora``, for convolutions ``stride`` / ``padding`` / ``dilation`` /
  ``groups`` / ``padding_mode``;
* ``target_counts``: JSON ``{leaf name: count}``, how many modules of the base had each adapted leaf name (so an
  adapter trained on a 32-layer model is refused by a 40-layer one).

PEFT format (``export_peft`` / ``import_peft``): ``adapter_model.safetensors`` + ``adapter_config.json`` as PEFT
writes them (keys ``base_model.model.<module>.lora_A.weight``). See ``docs/formats.md``.

Nothing here unpickles: adapters are safetensors, and a legacy PEFT ``adapter_model.bin`` is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import atomic_write
from .layers import Conv1d, Conv2d, Conv3d, Embedding, Linear, MergedLinear, is_lora_layer
from .utils import BIAS_MODES, lora_state_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "save_lora", "load_lora", "read_lora", "export_peft", "import_peft"]

FORMAT = "lora.adapter"
FORMAT_VERSION = "1"
_KINDS: dict[str, type] = {c.__name__: c for c in (Linear, MergedLinear, Embedding, Conv1d, Conv2d, Conv3d)}
_CONV_FIELDS = ("stride", "padding", "dilation", "groups", "padding_mode")


# ---------------------------------------------------------------------------------------------------------------
# Writing files atomically


def _json_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _describe(module: nn.Module) -> dict[str, Any]:
    """The metadata entry of one LoRA layer."""
    info: dict[str, Any] = {
        "kind": type(module).__name__,
        "r": module.r,
        "lora_alpha": float(module.lora_alpha),
        "use_rslora": bool(module.use_rslora),
        "lora_dropout": float(getattr(module.lora_dropout, "p", 0.0)),
        "lora_dtype": str(module.lora_A.dtype).removeprefix("torch."),
        "base_shape": list(module.weight.shape),
        "fan_in_fan_out": bool(getattr(module, "fan_in_fan_out", False)),
    }
    if isinstance(module, MergedLinear):
        info["split_sizes"] = list(module.split_sizes)
        info["enable_lora"] = list(module.enable_lora)
    if isinstance(module, (Conv1d, Conv2d, Conv3d)):
        info.update({f: _json_value(getattr(module, f)) for f in _CONV_FIELDS})
    return info


def _adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    found = {}
    for name, m in model.named_modules():
        if is_lora_layer(m) and m._parameters.get("lora_A") is not None:
            if type(m).__name__ not in _KINDS or not isinstance(m, _KINDS[type(m).__name__]):
                raise TypeError(f"module {name!r} is a {type(m).__name__}: only this library's LoRA layers can be saved")
            if m.merged:
                raise ValueError(f"module {name!r} is merged: unmerge_lora(model) before saving the adapter")
            found[name] = m
    return found


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def save_lora(model: nn.Module, path: str | os.PathLike, bias: str = "none") -> None:
    """Write ``model``'s adapter to one safetensors file at ``path`` (atomically; see the module docstring)."""
    modules = _adapted_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA layer with r > 0: nothing to save")
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model, bias=bias).items()}
    leaves = {_leaf(n) for n in modules}
    counts = Counter(_leaf(n) for n, _ in model.named_modules() if _leaf(n) in leaves)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bias": bias,
        "modules": json.dumps({n: _describe(m) for n, m in modules.items()}, sort_keys=True),
        "target_counts": json.dumps(dict(sorted(counts.items()))),
    }
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata))


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type (and OSError) for bad headers and short files
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return tensors, metadata


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "kind": (str,), "r": (int,), "lora_alpha": (int, float), "use_rslora": (bool,), "lora_dropout": (int, float),
    "lora_dtype": (str,), "base_shape": (list,), "fan_in_fan_out": (bool,), "split_sizes": (list,),
    "enable_lora": (list,), "stride": (list,), "padding": (list, str), "dilation": (list,), "groups": (int,),
    "padding_mode": (str,),
}
# Lists whose items must be positive ints (enable_lora: bools; padding may also be a list of non-negative ints).
_INT_LISTS = ("base_shape", "split_sizes", "stride", "dilation")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_info(where: str, name: str, info: Any) -> None:
    """Raise a ``ValueError`` naming the first field of one module's metadata entry that is missing or malformed."""
    at = f"{where}: metadata modules[{name!r}]"
    if not isinstance(info, dict):
        raise ValueError(f"{at} must be an object, got {type(info).__name__}")
    required = ["kind", "r", "lora_alpha", "base_shape"] + (["split_sizes", "enable_lora"]
                                                            if info.get("kind") == "MergedLinear" else [])
    for field in required:
        if field not in info:
            raise ValueError(f"{at} lacks the field {field!r}")
    for field, value in info.items():
        ok = _FIELD_TYPES.get(field)
        if ok and (not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok)):
            raise ValueError(f"{at}.{field}={value!r} has type {type(value).__name__}, "
                             f"expected {'/'.join(t.__name__ for t in ok)}")
    for field in _INT_LISTS:
        if field in info and not all(_is_int(v) and v > 0 for v in info[field]):
            raise ValueError(f"{at}.{field}={info[field]!r} must be a list of positive ints")
    if isinstance(info.get("padding"), list) and not all(_is_int(v) and v >= 0 for v in info["padding"]):
        raise ValueError(f"{at}.padding={info['padding']!r} must be a list of non-negative ints or a string")
    if info["kind"] not in _KINDS:
        raise ValueError(f"{at}.kind={info['kind']!r} is not one of {sorted(_KINDS)}")
    if info["r"] <= 0:
        raise ValueError(f"{at}.r={info['r']!r} must be positive")
    if not (math.isfinite(info["lora_alpha"]) and info["lora_alpha"] > 0):
        raise ValueError(f"{at}.lora_alpha={info['lora_alpha']!r} must be a positive finite number")
    if not 0 <= info.get("lora_dropout", 0.0) < 1:
        raise ValueError(f"{at}.lora_dropout={info['lora_dropout']!r} must be in [0, 1)")
    if "lora_dtype" in info:
        dtype = getattr(torch, info["lora_dtype"], None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{at}.lora_dtype={info['lora_dtype']!r} is not a floating torch dtype")
    ndim = {"Linear": 2, "MergedLinear": 2, "Embedding": 2, "Conv1d": 3, "Conv2d": 4, "Conv3d": 5}[info["kind"]]
    if len(info["base_shape"]) != ndim:
        raise ValueError(f"{at}.base_shape={info['base_shape']!r} must have {ndim} dims for a {info['kind']}")
    if info["kind"] == "MergedLinear":
        sizes, enable = info["split_sizes"], info["enable_lora"]
        if not all(isinstance(e, bool) for e in enable) or len(enable) != len(sizes) or not any(enable):
            raise ValueError(f"{at}: enable_lora={enable!r} must be one bool per split_sizes entry "
                             f"({len(sizes)}), at least one True")
        out_f = info["base_shape"][1 if info.get("fan_in_fan_out") else 0]
        if sum(sizes) != out_f:
            raise ValueError(f"{at}: split_sizes={sizes!r} sum to {sum(sizes)}, not the {out_f} output rows of "
                             f"base_shape={info['base_shape']!r}")


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, int], str]:
    where = f"adapter {str(path)!r}"
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{where} is not a lora adapter file (metadata format={metadata.get('format')!r}, "
                         f"expected {FORMAT!r}); for a PEFT adapter directory use lora.import_peft")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where} has format_version={metadata.get('format_version')!r}; this library reads {FORMAT_VERSION!r}")
    try:
        modules = json.loads(metadata["modules"])
        counts = json.loads(metadata.get("target_counts", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: metadata 'modules'/'target_counts' is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(modules, dict) or not isinstance(counts, dict):
        raise ValueError(f"{where}: metadata 'modules' and 'target_counts' must be JSON objects")
    if not modules:
        raise ValueError(f"{where}: metadata 'modules' is empty; the file adapts nothing")
    for name, info in modules.items():
        _check_info(where, name, info)
    for leaf, n in counts.items():
        if not _is_int(n) or n < 0:
            raise ValueError(f"{where}: metadata target_counts[{leaf!r}]={n!r} must be a non-negative int")
    bias = metadata.get("bias", "none")
    if bias not in BIAS_MODES:
        raise ValueError(f"{where}: metadata bias={bias!r} is not one of {BIAS_MODES}")
    return modules, counts, bias


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Read and check an adapter file; return its tensors and its per-module metadata. Touches no model."""
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    modules, _, _ = _parse_metadata(path, metadata)
    return tensors, modules


def _inject_kwargs(info: dict[str, Any]) -> dict[str, Any]:
    kwargs = {"r": info["r"], "lora_alpha": info["lora_alpha"], "use_rslora": info.get("use_rslora", False),
              "lora_dropout": info.get("lora_dropout", 0.0)}
    if "lora_dtype" in info:
        kwargs["lora_dtype"] = getattr(torch, info["lora_dtype"])
    if info["kind"] == "MergedLinear":
        kwargs["split_sizes"] = tuple(info["split_sizes"])
        kwargs["enable_lora"] = list(info["enable_lora"])
    return kwargs


def _swap_in(model: nn.Module, plan: dict[str, tuple[type, dict[str, Any]]]) -> None:
    """Replace each module named (exactly) in ``plan`` by ``cls.from_module(module, **kwargs)``: all or nothing.

    Not :func:`lora.inject`, which matches dotted-path *suffixes*: a file that names ``fc`` must not also adapt
    ``block.fc``, and one that names both must not be refused as ambiguous.
    """
    built = {name: cls.from_module(model.get_submodule(name), **kwargs) for name, (cls, kwargs) in plan.items()}
    for name, layer in built.items():  # every layer built (and its arguments checked) before the first swap
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def _check_module(name: str, info: dict[str, Any], module: nn.Module, problems: list[str]) -> None:
    """Append to ``problems`` every way ``module`` differs from what the adapter was trained on."""
    found_shape = list(module.weight.shape) if isinstance(getattr(module, "weight", None), torch.Tensor) else None
    if found_shape != info["base_shape"]:
        problems.append(f"{name}: base weight shape expected {tuple(info['base_shape'])}, found "
                        f"{tuple(found_shape) if found_shape else type(module).__name__ + ' without a weight'}")
        return
    kind = _KINDS[info["kind"]]
    if is_lora_layer(module):
        if type(module) is not kind:
            problems.append(f"{name}: expected a {info['kind']}, found a {type(module).__name__}")
            return
        if module.merged:
            problems.append(f"{name}: is merged; unmerge_lora(model) before loading an adapter into it")
        if module.r != info["r"]:
            problems.append(f"{name}: rank expected r={info['r']}, found r={module.r}")
        if kind is MergedLinear and (list(module.split_sizes) != info.get("split_sizes")
                                     or list(module.enable_lora) != info.get("enable_lora")):
            problems.append(f"{name}: slices expected split_sizes={info.get('split_sizes')} enable_lora="
                            f"{info.get('enable_lora')}, found {list(module.split_sizes)} {module.enable_lora}")
    else:
        if not name:
            problems.append(f"(root): the model itself is a plain {type(module).__name__}; LoRA can only be loaded "
                            f"into it if it already is a LoRA layer (a module cannot replace itself)")
            return
        plain = {Linear: nn.Linear, MergedLinear: nn.Linear, Embedding: nn.Embedding,
                 Conv1d: nn.Conv1d, Conv2d: nn.Conv2d, Conv3d: nn.Conv3d}[kind]
        if type(module) is not plain:
            problems.append(f"{name}: expected an {plain.__name__} to adapt, found a {type(module).__name__}")
            return
        if info.get("fan_in_fan_out"):
            problems.append(f"{name}: a fan_in_fan_out adapter needs a lora.Linear(fan_in_fan_out=True) already in place")
    if kind in (Conv1d, Conv2d, Conv3d):
        for f in _CONV_FIELDS:
            if f in info and _json_value(getattr(module, f)) != info[f]:
                problems.append(f"{name}: conv {f} expected {info[f]!r}, found {_json_value(getattr(module, f))!r}")


def load_lora(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load an adapter file onto ``model``; return the names of the adapted modules.

    Modules that are still plain torch layers are injected first from the file's metadata (rank, alpha, slices).
    Everything is checked before anything changes: a module the file names that ``model`` lacks, a base weight of
    another shape, another rank or slice layout, another number of layers, a tensor of the wrong shape, and (with
    ``strict``) LoRA layers in ``model`` that the file does not cover all go into one ``ValueError`` that lists
    every mismatch, and ``model`` is left untouched. LoRA hyper-parameters (alpha, rsLoRA) are taken from the file;
    into LoRA layers already in place the tensors are copied in those layers' dtype. Modules are matched by exact
    name (never by suffix, unlike :func:`lora.inject`).
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    modules, counts, _ = _parse_metadata(path, metadata)
    problems: list[str] = []
    present = dict(model.named_modules())
    for name, info in modules.items():
        if name not in present:
            problems.append(f"{name}: missing from {type(model).__name__} (expected a {info['kind']} over a base "
                            f"weight of shape {tuple(info['base_shape'])}, found no such module)")
        else:
            _check_module(name, info, present[name], problems)
    for leaf, n in counts.items():
        have = sum(1 for m in present if _leaf(m) == leaf)
        if have != n:
            problems.append(f"*.{leaf}: the adapter's base had {n} such modules, {type(model).__name__} has {have}")
    if strict:
        for name, m in present.items():
            if is_lora_layer(m) and m._parameters.get("lora_A") is not None and name not in modules:
                problems.append(f"{name}: has LoRA in the model but not in the adapter file (strict=True)")
    if not problems:
        _check_tensors(tensors, modules, present, problems)
    if problems:
        raise ValueError(f"adapter {str(path)!r} does not fit {type(model).__name__} ({len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''}); nothing was changed:\n  " + "\n  ".join(problems))

    _swap_in(model, {n: (_KINDS[info["kind"]], _inject_kwargs(info))
                     for n, info in modules.items() if not is_lora_layer(present[n])})
    _assign(model, modules, tensors)
    return list(modules)


def _expected_shapes(info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    r, shape, kind = info["r"], info["base_shape"], info["kind"]
    if kind == "Linear":
        out_f, in_f = (shape[1], shape[0]) if info.get("fan_in_fan_out") else shape
        return {"lora_A": (r, in_f), "lora_B": (out_f, r)}
    if kind == "MergedLinear":
        out_f, in_f = (shape[1], shape[0]) if info.get("fan_in_fan_out") else shape
        rows = [s for s, e in zip(info["split_sizes"], info["enable_lora"]) if e]
        return {"lora_A": (r * len(rows), in_f), "lora_B": (sum(rows), r)}
    if kind == "Embedding":
        return {"lora_A": (r, shape[0]), "lora_B": (shape[1], r)}
    return {"lora_A": (r, math.prod(shape[1:])), "lora_B": (shape[0], r)}


def _check_tensors(tensors: dict[str, torch.Tensor], modules: dict[str, dict[str, Any]],
                   present: dict[str, nn.Module], problems: list[str]) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for name, info in modules.items():
        for p, shape in _expected_shapes(info).items():
            expected[f"{name}.{p}" if name else p] = shape
    for key, shape in expected.items():
        if key not in tensors:
            problems.append(f"{key}: tensor missing from the file")
        elif tuple(tensors[key].shape) != shape:
            problems.append(f"{key}: shape expected {shape}, found {tuple(tensors[key].shape)} in the file")
        elif not tensors[key].is_floating_point():
            problems.append(f"{key}: dtype {tensors[key].dtype} is not floating point")
    for key in tensors.keys() - expected.keys():
        mod, _, p = key.rpartition(".")
        # A bias *Parameter* only: a buffer called "bias" (a causal mask) is not something an adapter may overwrite.
        bias_param = present[mod]._parameters.get("bias") if p == "bias" and mod in present else None
        if bias_param is None:
            problems.append(f"{key}: tensor in the file matches no LoRA parameter or bias of the model")
        elif tuple(bias_param.shape) != tuple(tensors[key].shape):
            problems.append(f"{key}: shape expected {tuple(bias_param.shape)}, found {tuple(tensors[key].shape)}")
        elif not tensors[key].is_floating_point():
            problems.append(f"{key}: dtype {tensors[key].dtype} is not floating point")


def _assign(model: nn.Module, modules: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the (checked) tensors into the model's parameters, cast to their dtype; set alpha/rsLoRA/scaling."""
    with torch.no_grad():
        for key, t in tensors.items():
            mod, _, p = key.rpartition(".")
            model.get_submodule(mod)._parameters[p].copy_(t)
    for name, info in modules.items():
        m = model.get_submodule(name)
        m.lora_alpha, m.use_rslora = info["lora_alpha"], info.get("use_rslora", False)
        m.scaling = m.lora_alpha / (math.sqrt(m.r) if m.use_rslora else m.r)


# ---------------------------------------------------------------------------------------------------------------
# PEFT

PEFT_PREFIX = "base_model.model."


def _check_peft_compatible(name: str, m: nn.Module) -> None:
    """Refuse layer options PEFT's LoRA layers compute differently (its forward would not match this library's)."""
    if isinstance(m, nn.Embedding) and m.max_norm is not None:
        # PEFT passes max_norm to the lookup of lora_embedding_A (renormalising the adapter in place); this library
        # renormalises base + update together.
        raise ValueError(f"module {name!r}: PEFT's LoRA Embedding handles max_norm={m.max_norm} differently")
    if isinstance(m, nn.modules.conv._ConvNd):
        # PEFT builds lora_A as Conv(in, r, kernel, stride, padding): no groups, dilation or padding_mode.
        if m.groups != 1:
            raise ValueError(f"module {name!r}: PEFT's conv LoRA differs from this library's for groups={m.groups}")
        if any(d != 1 for d in m.dilation) or m.padding_mode != "zeros":
            raise ValueError(f"module {name!r}: PEFT's conv LoRA ignores dilation={m.dilation} / "
                             f"padding_mode={m.padding_mode!r}; its output would differ")


def _peft_tensors(name: str, m: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """One module's adapter as PEFT's keys and shapes, with rank ``rank`` >= the module's (zero padded)."""
    _check_peft_compatible(name, m)
    A, B = m.lora_A.detach(), m.lora_B.detach()
    if isinstance(m, MergedLinear):
        # k slices of rank r -> one rank r*k LoRA on the fused matrix: A stacked (it already is), B block-structured.
        block = torch.zeros(m.out_features, A.shape[0], dtype=B.dtype, device=B.device)  # (out, r * k)
        for i, (start, size, _, B_i) in enumerate(m._slice_params()):
            block[start:start + size, i * m.r:(i + 1) * m.r] = B_i.detach()
        B = block
    pad = rank - A.shape[0]
    A = torch.cat([A, A.new_zeros(pad, A.shape[1])]) if pad else A  # zero rows/columns leave B @ A unchanged
    B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1) if pad else B
    if isinstance(m, Embedding):
        return {f"{PEFT_PREFIX}{name}.lora_embedding_A": A, f"{PEFT_PREFIX}{name}.lora_embedding_B": B}
    if isinstance(m, (Conv1d, Conv2d, Conv3d)):
        ones = (1,) * len(m.kernel_size)
        A = A.reshape(rank, m.in_channels, *m.kernel_size)  # PEFT: lora_A is Conv(in, r, kernel)
        B = B.reshape(m.out_channels, rank, *ones)  # lora_B is a 1x1 Conv(r, out)
    return {f"{PEFT_PREFIX}{name}.lora_A.weight": A, f"{PEFT_PREFIX}{name}.lora_B.weight": B}


def _pattern_group(values: dict[str, Any]) -> dict[str, Any]:
    r"""{module name: value} -> {PEFT pattern key: value}: the leaf name when all of a leaf's modules agree, else an
    anchored, escaped full name (PEFT reads the keys as regexes, ``(.*\.)?(key)$``, so a bare ``a.fc`` would also
    match ``x.a.fc`` and its dots any character)."""
    by_leaf: dict[str, set] = {}
    for name, v in values.items():
        by_leaf.setdefault(_leaf(name), set()).add(v)
    out = {}
    for name, v in values.items():
        out[re.escape(_leaf(name)) if len(by_leaf[_leaf(name)]) == 1 else "^" + re.escape(name)] = v
    return out


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None,
                uniform_rank: bool = False, task_type: str | None = "CAUSAL_LM") -> dict[str, Any]:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` that PEFT (0.21+) loads onto the same base.

    ``Linear``/``Embedding``/``Conv`` layers export one to one. A per-slice ``MergedLinear`` with ``k`` enabled
    slices exports as one rank ``r * k`` LoRA over the fused matrix: ``lora_A`` stacked, ``lora_B``
    block-structured, and ``lora_alpha`` chosen so PEFT's ``lora_alpha / rank`` equals this layer's scaling.
    Ranks and alphas that differ between modules go in PEFT's ``rank_pattern`` / ``alpha_pattern``; with
    ``uniform_rank=True`` every module is zero-padded to the largest rank instead, for serving tools that read only
    ``r`` and ``lora_alpha`` (vLLM, llama.cpp; see ``docs/formats.md``). rsLoRA is folded into ``lora_alpha`` (the file says ``use_rslora: false``).
    Layer options PEFT computes differently (grouped or dilated convolutions, ``padding_mode``, an embedding's
    ``max_norm``) are a ``ValueError`` before anything is written. Returns the config written.
    """
    modules = _adapted_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA layer with r > 0: nothing to export")
    if "" in modules:
        raise ValueError(f"the model itself is a {type(model).__name__}: PEFT adapts submodules, wrap it in a module")
    fifo = {bool(getattr(m, "fan_in_fan_out", False)) for m in modules.values()}
    if len(fifo) > 1:
        raise ValueError("PEFT's fan_in_fan_out is one flag for the whole adapter; these modules mix both layouts")
    ranks = {n: m.lora_A.shape[0] for n, m in modules.items()}  # r, or r * k for a MergedLinear
    if uniform_rank:
        ranks = dict.fromkeys(ranks, max(ranks.values()))
    # PEFT's scaling is lora_alpha / rank. Without rsLoRA, alpha * rank / r keeps integer alphas integers (alpha * k
    # for a MergedLinear) where scaling * rank would carry the rounding of alpha / r.
    alphas = {n: _number(m.scaling * ranks[n] if m.use_rslora else m.lora_alpha * ranks[n] / m.r)
              for n, m in modules.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        tensors.update({k: v.to("cpu").contiguous() for k, v in _peft_tensors(name, m, ranks[name]).items()})

    r, alpha = Counter((ranks[n], alphas[n]) for n in modules).most_common(1)[0][0]
    rank_pattern = {k: v for k, v in _pattern_group(ranks).items() if v != r}
    alpha_pattern = {k: v for k, v in _pattern_group(alphas).items() if v != alpha}
    leaves = {_leaf(n) for n in modules}
    all_of_leaf = all(n in modules for n, m in model.named_modules() if _leaf(n) in leaves and hasattr(m, "weight"))
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
        "use_dora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
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
    "use_dora": (False, None), "velora_config": (None,), "alora_invocation_tokens": (None,),
    "monteclora_config": (None,), "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,),
    "use_qalora": (False, None), "modules_to_save": (None, [], ()), "bias": ("none",), "lora_bias": (False, None),
    "target_parameters": (None, [], ()), "layer_replication": (None,), "trainable_token_indices": (None, [], {}),
}
# init_lora_weights values with which PEFT rewrites the base weights (or runs a variant) when it loads the adapter,
# so the saved A and B alone do not reproduce it.
_UNSUPPORTED_INITS = ("pissa", "olora", "corda", "loftq", "mica")
_PEFT_KEY = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")
_PEFT_HALF = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
_LORA_FOR = {nn.Linear: Linear, nn.Embedding: Embedding, nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}


def _check_peft_config(cfg_path: Path, cfg: Any) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{str(cfg_path)!r} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{str(cfg_path)!r}: peft_type={cfg.get('peft_type')!r}; only LORA adapters can be imported")
    for key, ok in _UNSUPPORTED_PEFT.items():
        if key in cfg and cfg[key] not in ok:
            raise ValueError(f"{str(cfg_path)!r}: {key}={cfg[key]!r} is not supported by this library "
                             f"(supported: {ok[0]!r}); refusing rather than dropping it silently")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_UNSUPPORTED_INITS):
        raise ValueError(f"{str(cfg_path)!r}: init_lora_weights={init!r} makes PEFT rewrite the base weights (or use a "
                         f"LoRA variant) when it loads the adapter; convert it to a plain LoRA first "
                         f"(PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{str(cfg_path)!r}: fan_in_fan_out=True adapters (GPT-2 Conv1D bases) are not supported")
    for key in ("r", "lora_alpha"):
        if key in cfg and (not isinstance(cfg[key], (int, float)) or isinstance(cfg[key], bool) or not cfg[key] > 0):
            raise ValueError(f"{str(cfg_path)!r}: {key}={cfg[key]!r} must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ValueError(f"{str(cfg_path)!r}: {key}={cfg[key]!r} must be an object")


def import_peft(model: nn.Module, adapter_dir: str | os.PathLike) -> list[str]:
    """Load a PEFT LoRA adapter directory onto ``model`` (this library's layers); return the adapted names.

    Each module with tensors in the file becomes a :class:`lora.Linear` / ``Embedding`` / ``Conv`` with PEFT's rank
    and scaling (from ``r``/``lora_alpha``/``use_rslora`` and the patterns, looked up as PEFT does); which modules
    are adapted follows the tensors (``target_modules`` / ``layers_to_transform`` only chose them at training).
    Options this library does not implement (DoRA and the other LoRA variants, ``modules_to_save``, ``bias`` !=
    ``"none"``, initialisations that rewrite the base such as PiSSA, ...) are a ``ValueError``, as is a tensor whose
    module ``model`` lacks (PEFT would silently drop it). ``model`` is untouched on any error.
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
        if set(ab) != {"A", "B"}:
            problems.append(f"{name}: the adapter has lora_{'A' if 'A' in ab else 'B'} but not the other half")
            continue
        if is_lora_layer(module):
            problems.append(f"{name}: already has LoRA; import a PEFT adapter into the plain base model")
            continue
        if type(module) not in _LORA_FOR:
            problems.append(f"{name}: is a {type(module).__name__}; only nn.Linear, nn.Embedding and nn.Conv1d/2d/3d "
                            f"can be adapted")
            continue
        if not name:
            problems.append("(root): the model itself cannot be replaced by a LoRA layer; wrap it in a module")
            continue
        try:
            _check_peft_compatible(name, module)
        except ValueError as e:
            problems.append(str(e))
            continue
        rank = ab["A"].shape[0] if ab["A"].dim() else 0
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
        expect_rank = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r", 8))
        if rank != expect_rank:
            problems.append(f"{name}: lora_A has rank {rank} but adapter_config.json says r={expect_rank}")
            continue
        for half, shape in _peft_shapes(module, rank).items():
            if tuple(ab[half].shape) != shape:
                problems.append(f"{name}: lora_{half} shape expected {shape}, found {tuple(ab[half].shape)}")
            elif not ab[half].is_floating_point():
                problems.append(f"{name}: lora_{half} dtype {ab[half].dtype} is not floating point")
        plan[name] = (_LORA_FOR[type(module)], {
            "r": rank, "lora_alpha": alpha, "use_rslora": bool(cfg.get("use_rslora", False)),
            "lora_dropout": float(cfg.get("lora_dropout", 0.0)), "lora_dtype": ab["A"].dtype})
    if not per_module and not problems:
        problems.append("the adapter holds no LoRA tensors")
    if problems:
        raise ValueError(f"PEFT adapter {str(adapter_dir)!r} does not fit {type(model).__name__} ({len(problems)} "
                         f"problem{'s' if len(problems) > 1 else ''}); nothing was changed:\n  " + "\n  ".join(problems))
    _swap_in(model, plan)
    with torch.no_grad():
        for name, ab in per_module.items():
            m = model.get_submodule(name)
            m.lora_A.copy_(ab["A"].reshape(m.lora_A.shape))  # conv: (r, in, *k) -> (r, in * prod(k))
            m.lora_B.copy_(ab["B"].reshape(m.lora_B.shape))  # conv: (out, r, 1, ...) -> (out, r)
    return list(per_module)


def _peft_shapes(module: nn.Module, rank: int) -> dict[str, tuple[int, ...]]:
    if type(module) is nn.Linear:
        return {"A": (rank, module.in_features), "B": (module.out_features, rank)}
    if type(module) is nn.Embedding:
        return {"A": (rank, module.num_embeddings), "B": (module.embedding_dim, rank)}
    ones = (1,) * len(module.kernel_size)  # groups == 1 (checked): lora_A is Conv(in, r, kernel), lora_B 1x1
    return {"A": (rank, module.in_channels, *module.kernel_size), "B": (module.out_channels, rank, *ones)}


def _read_peft_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st, pt = adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"
    if st.is_file():
        tensors, _ = _read_safetensors(st)
        return tensors
    if pt.is_file():
        try:  # legacy PEFT format; weights_only refuses anything but tensors (never unpickle code)
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{str(pt)!r} could not be read as a tensor file ({type(e).__name__}: {e})") from e
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise ValueError(f"{str(pt)!r} does not hold a {{name: tensor}} dict")
        return tensors
    raise FileNotFoundError(f"{str(adapter_dir)!r} has neither adapter_model.safetensors nor adapter_model.bin")
