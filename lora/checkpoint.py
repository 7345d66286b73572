"""This library's adapter file: one safetensors file holding :func:`lora.lora_state_dict` and the metadata to rebuild
the adapter on a plain base model and to refuse the wrong base.

Metadata (string -> string):

* ``format``: ``"lora.adapter"``; ``format_version``: ``"1"``; ``bias``: the ``bias`` mode the file was saved with;
* ``modules``: JSON ``{module name: entry}``, each entry what the layer's ``describe()`` gives (``kind``, ``r``,
  ``lora_alpha``, ``use_rslora``, ``use_dora``, ``lora_dropout``, ``lora_dtype``, ``base_shape``, ``fan_in_fan_out``, and the
  kind's own fields, e.g. ``MergedLinear``'s ``split_sizes`` / ``enable_lora`` or a convolution's ``stride``, ...);
* ``target_counts``: JSON ``{leaf name: count}``, how many modules of the base had each adapted leaf name (so an
  adapter trained on a 32-layer model is refused by a 40-layer one).

The same model and settings always give the same bytes (sorted tensors and metadata). PEFT's format is in
:mod:`lora.peft_format`; ``docs/formats.md`` describes both. Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open

from ._io import atomic_write, remove_stale_temporaries, write_safetensors
from .adapters import DEFAULT, adapter_view, check_name, put_slot, slots, supports_named
from .base import LoRABase, check_init, has_adapter, is_lora_layer, is_mutating_init, lora_scaling
from .distributed import copy_full_into, is_sharded, is_writer
from .layers import KINDS
from .qlora import Weight4bit
from .utils import BIAS_MODES, lora_state_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "save_lora", "load_lora", "read_lora"]

FORMAT = "lora.adapter"
FORMAT_VERSION = "1"


def adapted_modules(model: nn.Module) -> dict[str, LoRABase]:
    """This library's LoRA layers with an adapter, by name; ``TypeError``/``ValueError`` for what cannot be saved."""
    found = {}
    for name, m in model.named_modules():
        if has_adapter(m):
            if not isinstance(m, LoRABase) or KINDS.get(type(m).__name__) is not type(m):
                raise TypeError(
                    f"module {name!r} is a {type(m).__name__}: only this library's LoRA layers can be saved"
                )
            if m.merged:
                raise ValueError(f"module {name!r} is merged: unmerge_lora(model) before saving the adapter")
            found[name] = m
    return found


def leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _convert_entry(info: dict[str, Any], m: LoRABase) -> dict[str, Any]:
    """The metadata entry of ``m``'s PiSSA / OLoRA adapter converted to a plain rank-``2r`` LoRA (same scaling)."""
    alpha = m.lora_alpha * math.sqrt(2) if m.use_rslora else m.lora_alpha * 2
    return {
        **info,
        "r": 2 * m.r,
        "lora_alpha": float(alpha),
        "init_lora_weights": "default",
        "converted_from": m.init_lora_weights,
    }


def save_lora(
    model: nn.Module,
    path: str | os.PathLike,
    bias: str = "none",
    convert_to_lora: bool = False,
    adapter_name: str | None = None,
) -> None:
    """Write ``model``'s adapter to one safetensors file at ``path``.

    Layers initialised with PiSSA / OLoRA (``init_lora_weights``) were trained over a *residual* base, ``W - s B0
    A0``. By default their file entry keeps ``init_lora_weights`` and the file also holds ``B0`` / ``A0`` (keys
    ``<module>.lora_A_init`` / ``.lora_B_init``), so that :func:`load_lora` onto the original base subtracts them
    again. With ``convert_to_lora=True`` they are written instead as a plain LoRA of rank ``2r`` over the
    *original* base, ``s (B A - B0 A0) = s [B | -B0] [A ; A0]`` (PEFT's
    ``path_initial_model_for_weight_conversion``; alpha doubled, or times sqrt(2) with rsLoRA, so the scaling is
    unchanged), with ``converted_from`` in their entry.

    Atomic (a temporary file renamed over ``path``; stale temporaries of killed writers are removed), reproducible
    (equal tensors and settings give equal bytes), written through a symlink to its target, and refused with a
    ``PermissionError`` over a read-only file. With several adapters (:mod:`lora.adapters`) ``adapter_name`` picks
    the one saved (default: ``"default"``, the layers' ``lora_A`` / ``lora_B``); the file is the same as that
    adapter alone would give, so it loads as the default or under any name. On a sharded (FSDP2) model every rank must call it:
    the LoRA parameters are gathered whole, and rank 0 writes the file.
    """
    with adapter_view(model, adapter_name):
        _save(model, path, bias, convert_to_lora)


def _save(model: nn.Module, path: str | os.PathLike, bias: str, convert_to_lora: bool) -> None:
    modules = adapted_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA layer with r > 0: nothing to save")
    state = lora_state_dict(model, bias=bias)
    infos = {n: m.describe() for n, m in modules.items()}
    for n, m in modules.items():
        if not is_mutating_init(m.init_lora_weights):
            continue
        key = f"{n}." if n else ""
        if convert_to_lora:
            state[key + "lora_A"], state[key + "lora_B"] = m.converted_factors()
            infos[n] = _convert_entry(infos[n], m)
        else:
            state[key + "lora_A_init"], state[key + "lora_B_init"] = m.lora_A_init, m.lora_B_init
    leaves = {leaf(n) for n in modules}
    counts = Counter(leaf(n) for n, _ in model.named_modules() if leaf(n) in leaves)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bias": bias,
        "modules": json.dumps(infos, sort_keys=True),
        "target_counts": json.dumps(dict(sorted(counts.items()))),
    }
    if is_sharded(model) and not is_writer():
        return
    atomic_write(path, lambda tmp: write_safetensors(tmp, state, metadata))


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating


def read_safetensors(path: Path, what: str = "adapter file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, or a clear error."""
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type (and OSError) for bad headers and short files
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return tensors, metadata


# Types of the fields every entry has; each kind adds its own (lora_fields, base_fields).
_COMMON_FIELDS: dict[str, tuple[type, ...]] = {
    "kind": (str,),
    "r": (int,),
    "lora_alpha": (int, float),
    "use_rslora": (bool,),
    "use_dora": (bool,),
    "init_lora_weights": (str,),
    "converted_from": (str,),
    "lora_dropout": (int, float),
    "lora_dtype": (str,),
    "base_shape": (list,),
    "fan_in_fan_out": (bool,),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_info(where: str, name: str, info: Any) -> None:
    """Raise a ``ValueError`` naming the first field of one module's metadata entry that is missing or malformed."""
    at = f"{where}: metadata modules[{name!r}]"
    if not isinstance(info, dict):
        raise ValueError(f"{at} must be an object, got {type(info).__name__}")
    if info.get("kind") not in KINDS:
        raise ValueError(f"{at}.kind={info.get('kind')!r} is not one of {sorted(KINDS)}")
    kind = KINDS[info["kind"]]
    for field in ["r", "lora_alpha", "base_shape", *kind.lora_fields]:
        if field not in info:
            raise ValueError(f"{at} lacks the field {field!r}")
    types = {**_COMMON_FIELDS, **kind.lora_fields, **kind.base_fields}
    for field, value in info.items():
        ok = types.get(field)
        if ok and (not isinstance(value, ok) or (isinstance(value, bool) and bool not in ok)):
            raise ValueError(
                f"{at}.{field}={value!r} has type {type(value).__name__}, expected {'/'.join(t.__name__ for t in ok)}"
            )
    if not all(_is_int(v) and v > 0 for v in info["base_shape"]) or len(info["base_shape"]) != kind.base_ndim:
        raise ValueError(
            f"{at}.base_shape={info['base_shape']!r} must be {kind.base_ndim} positive ints for a {info['kind']}"
        )
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
    for field in ("init_lora_weights", "converted_from"):
        if field in info:
            try:
                check_init(info[field])
            except ValueError as e:
                raise ValueError(f"{at}.{e}") from None
    problem = kind.check_fields(info)
    if problem:
        raise ValueError(f"{at}: {problem}")


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[dict[str, dict[str, Any]], dict[str, int], str]:
    where = f"adapter {str(path)!r}"
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{where} is not a lora adapter file (metadata format={metadata.get('format')!r}, "
            f"expected {FORMAT!r}); for a PEFT adapter directory use lora.import_peft"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format_version={metadata.get('format_version')!r}; this library reads {FORMAT_VERSION!r}"
        )
    try:
        modules = json.loads(metadata["modules"])
        counts = json.loads(metadata.get("target_counts", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{where}: metadata 'modules'/'target_counts' is not valid JSON ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(modules, dict) or not isinstance(counts, dict):
        raise ValueError(f"{where}: metadata 'modules' and 'target_counts' must be JSON objects")
    if not modules:
        raise ValueError(f"{where}: metadata 'modules' is empty; the file adapts nothing")
    for name, info in modules.items():
        _check_info(where, name, info)
    for leaf_name, n in counts.items():
        if not _is_int(n) or n < 0:
            raise ValueError(f"{where}: metadata target_counts[{leaf_name!r}]={n!r} must be a non-negative int")
    bias = metadata.get("bias", "none")
    if bias not in BIAS_MODES:
        raise ValueError(f"{where}: metadata bias={bias!r} is not one of {BIAS_MODES}")
    return modules, counts, bias


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Read and check an adapter file; return its tensors and its per-module metadata. Touches no model."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    modules, _, _ = _parse_metadata(path, metadata)
    return tensors, modules


def swap_in(model: nn.Module, plan: dict[str, tuple[type[LoRABase], dict[str, Any]]]) -> None:
    """Replace each module named (exactly) in ``plan`` by ``kind.from_module(module, **kwargs)``: all or nothing.

    Not :func:`lora.inject`, which matches dotted-path *suffixes*: a file that names ``fc`` must not also adapt
    ``block.fc``, and one that names both must not be refused as ambiguous.
    """
    built = {name: kind.from_module(model.get_submodule(name), **kwargs) for name, (kind, kwargs) in plan.items()}
    for name, layer in built.items():  # every layer built (and its arguments checked) before the first swap
        model.set_submodule(name, layer)


def _check_module(name: str, info: dict[str, Any], module: nn.Module, problems: list[str]) -> None:
    """Append to ``problems`` every way ``module`` differs from what the adapter was trained on."""
    weight = getattr(module, "weight", None)
    found_shape = list(weight.shape) if isinstance(weight, (torch.Tensor, Weight4bit)) else None
    if found_shape != info["base_shape"]:
        problems.append(
            f"{name}: base weight shape expected {tuple(info['base_shape'])}, found "
            f"{tuple(found_shape) if found_shape else type(module).__name__ + ' without a weight'}"
        )
        return
    kind = KINDS[info["kind"]]
    if is_lora_layer(module):
        if type(module) is not kind:
            problems.append(f"{name}: expected a {info['kind']}, found a {type(module).__name__}")
            return
        if module.merged:
            problems.append(f"{name}: is merged; unmerge_lora(model) before loading an adapter into it")

        problems.extend(f"{name}: {p}" for p in module.mismatches(info))
        return
    if not name:
        problems.append(
            f"(root): the model itself is a plain {type(module).__name__}; LoRA can only be loaded "
            f"into it if it already is a LoRA layer (a module cannot replace itself)"
        )
        return
    if getattr(module, "plain_type", type(module)) is not kind.adapts:
        problems.append(f"{name}: expected an {kind.adapts.__name__} to adapt, found a {type(module).__name__}")
        return
    if info.get("fan_in_fan_out"):
        problems.append(f"{name}: a fan_in_fan_out adapter needs a lora.Linear(fan_in_fan_out=True) already in place")
    for f in kind.base_fields:
        found = getattr(module, f)
        found = list(found) if isinstance(found, tuple) else found
        if f in info and found != info[f]:
            problems.append(f"{name}: {f} expected {info[f]!r}, found {found!r}")


def load_lora(
    model: nn.Module,
    path: str | os.PathLike,
    strict: bool = True,
    allow_nonfinite: bool = False,
    adapter_name: str | None = None,
) -> list[str]:
    """Load an adapter file onto ``model``; return the names of the adapted modules.

    ``adapter_name`` (other than ``"default"``) loads the file as a named adapter next to the layers' own
    (:mod:`lora.adapters`): any rank and alpha, biases refused (every adapter shares them), plain modules injected
    as LoRA layers without a default adapter first, and (with ``strict``) layers holding an adapter of that name
    that the file does not cover refused. Loading into a name that exists with the same shapes copies the values in
    place (the modules and Parameters stay the same objects).

    Modules that are still plain torch layers are injected first from the file's metadata (rank, alpha, slices).
    Everything is checked before anything changes: a module the file names that ``model`` lacks, a base weight of
    another shape, another rank or slice layout, another number of layers, a tensor of the wrong shape, of another
    dtype than the metadata's ``lora_dtype`` or (unless ``allow_nonfinite``) with inf/nan values, and (with
    ``strict``) LoRA layers in ``model`` that the file does not cover all go into one ``ValueError`` that lists
    every mismatch, and ``model`` is left untouched. LoRA hyper-parameters (alpha, rsLoRA) are taken from the file;
    into LoRA layers already in place the tensors are copied in those layers' dtype. Modules are matched by exact
    name (never by suffix, unlike :func:`lora.inject`). Into a sharded (FSDP2) model each rank copies its own part
    of every tensor (every rank reads the file; no communication).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tensors, metadata = read_safetensors(path)
    modules, counts, bias = _parse_metadata(path, metadata)
    named = adapter_name is not None and check_name(adapter_name) != DEFAULT
    problems: list[str] = []
    present = dict(model.named_modules())
    for name, info in modules.items():
        if name not in present:
            problems.append(
                f"{name}: missing from {type(model).__name__} (expected a {info['kind']} over a base "
                f"weight of shape {tuple(info['base_shape'])}, found no such module)"
            )
        elif named:
            _check_module_named(name, info, present[name], problems)
        else:
            _check_module(name, info, present[name], problems)
    if named and (bias != "none" or any(k == "bias" or k.endswith(".bias") for k in tensors)):
        problems.append(
            f"the file holds biases (saved with bias={bias!r}); every adapter shares the base's biases, "
            f"so only a default adapter (adapter_name=None) may carry them"
        )
    for leaf_name, n in counts.items():
        have = sum(1 for m in present if leaf(m) == leaf_name)
        if have != n:
            problems.append(
                f"*.{leaf_name}: the adapter's base had {n} such modules, {type(model).__name__} has {have}"
            )
    if strict:
        for name, m in present.items():
            if (adapter_name in slots(m) if named else has_adapter(m)) and name not in modules:
                which = f"adapter {adapter_name!r}" if named else "LoRA"
                problems.append(f"{name}: has {which} in the model but not in the adapter file (strict=True)")
    if not problems:
        _check_tensors(tensors, modules, present, problems, allow_nonfinite)
    if problems:
        raise ValueError(
            f"adapter {str(path)!r} does not fit {type(model).__name__} ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}); nothing was changed:\n  " + "\n  ".join(problems)
        )

    if named:  # plain modules become LoRA layers without a default adapter (r=0), then get the named one
        swap_in(
            model,
            {
                n: (KINDS[info["kind"]], {**KINDS[info["kind"]].rebuild_kwargs(info), "r": 0})
                for n, info in modules.items()
                if not is_lora_layer(present[n])
            },
        )
        for n, info in modules.items():
            layer = model.get_submodule(n)
            put_slot(
                layer,
                adapter_name,
                info["r"],
                info["lora_alpha"],
                info.get("use_rslora", False),
                {p: tensors[f"{n}.{p}" if n else p] for p in ("lora_A", "lora_B")},
            )
        return list(modules)
    swap_in(
        model,
        {
            n: (KINDS[info["kind"]], KINDS[info["kind"]].rebuild_kwargs(info))
            for n, info in modules.items()
            if not is_lora_layer(present[n])
        },
    )
    _assign(model, modules, tensors)
    return list(modules)


def _check_module_named(name: str, info: dict[str, Any], module: nn.Module, problems: list[str]) -> None:
    """As :func:`_check_module`, for a named adapter: any rank; the layer kind must serve named adapters."""
    kind = KINDS[info["kind"]]
    if not supports_named(kind):
        problems.append(f"{name}: named adapters run on Linear / MergedLinear layers, this one is a {info['kind']}")
        return
    if info.get("use_dora") or is_mutating_init(info.get("init_lora_weights", "default")):
        problems.append(
            f"{name}: named adapters are plain LoRA; this file holds DoRA or a PiSSA / OLoRA adapter "
            f"(save it with convert_to_lora=True, or load it as the default adapter)"
        )
        return
    if is_lora_layer(module) and not supports_named(module):
        problems.append(f"{name}: its default adapter is DoRA or PiSSA / OLoRA; named adapters need plain LoRA layers")
        return
    if not is_lora_layer(module):
        _check_module(name, info, module, problems)
        return
    if type(module) is not kind:
        problems.append(f"{name}: expected a {info['kind']}, found a {type(module).__name__}")
        return
    if module.merged:
        problems.append(f"{name}: is merged; unmerge_lora(model) before loading an adapter into it")
    if list(module.weight.shape) != info["base_shape"]:
        problems.append(
            f"{name}: base weight shape expected {tuple(info['base_shape'])}, found {tuple(module.weight.shape)}"
        )
    if bool(module.fan_in_fan_out) != bool(info.get("fan_in_fan_out", False)):
        problems.append(
            f"{name}: fan_in_fan_out expected {info.get('fan_in_fan_out', False)}, found {module.fan_in_fan_out}"
        )
    problems.extend(f"{name}: {p}" for p in module.mismatches({**info, "r": module.r}))  # slices, not the rank


def _check_tensors(
    tensors: dict[str, torch.Tensor],
    modules: dict[str, dict[str, Any]],
    present: dict[str, nn.Module],
    problems: list[str],
    allow_nonfinite: bool,
) -> None:
    expected: dict[str, tuple[tuple[int, ...], str | None]] = {}  # key -> (shape, dtype name from the metadata)
    for name, info in modules.items():
        kind = KINDS[info["kind"]]
        shapes = kind.adapter_shapes(
            info["base_shape"],
            info["r"],
            fan_in_fan_out=info.get("fan_in_fan_out", False),
            use_dora=info.get("use_dora", False),
            **{f: info[f] for f in kind.lora_fields},
        )
        if is_mutating_init(info.get("init_lora_weights", "default")):  # the initial adapter, to subtract again
            shapes.update({"lora_A_init": shapes["lora_A"], "lora_B_init": shapes["lora_B"]})
        for p, shape in shapes.items():
            expected[f"{name}.{p}" if name else p] = (shape, info.get("lora_dtype"))
    for key, (shape, dtype) in expected.items():
        t = tensors.get(key)
        if t is None:
            problems.append(f"{key}: tensor missing from the file")
        elif tuple(t.shape) != shape:
            problems.append(f"{key}: shape expected {shape}, found {tuple(t.shape)} in the file")
        elif not t.is_floating_point():
            problems.append(f"{key}: dtype {t.dtype} is not floating point")
        elif dtype is not None and str(t.dtype).removeprefix("torch.") != dtype:
            problems.append(
                f"{key}: dtype {str(t.dtype).removeprefix('torch.')} differs from the metadata's lora_dtype={dtype!r}"
            )
        elif not allow_nonfinite and not torch.isfinite(t).all():
            problems.append(
                f"{key}: holds {int((~torch.isfinite(t)).sum())} inf/nan values "
                f"(load_lora(..., allow_nonfinite=True) to load it anyway)"
            )
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
        elif not allow_nonfinite and not torch.isfinite(tensors[key]).all():
            problems.append(f"{key}: holds inf/nan values (load_lora(..., allow_nonfinite=True) to load it anyway)")


def _assign(model: nn.Module, modules: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the (checked) tensors into the model's parameters, cast to their dtype; set alpha/rsLoRA/scaling; put
    PiSSA / OLoRA layers on the residual base their adapter was trained on."""
    # A PiSSA / OLoRA layer already in place: back to its original base first, unless it already stands on the
    # file's residual (the same initial adapter and scaling, as when a run resumes with the same seed): then it is
    # left alone, bit for bit.
    kept = set()
    for name, info in modules.items():
        layer, key = model.get_submodule(name), f"{name}." if name else ""
        init = info.get("init_lora_weights", "default")
        if (
            is_mutating_init(init)
            and getattr(layer, "lora_A_init", None) is not None
            and layer.init_lora_weights == init
            and torch.equal(layer.lora_A_init, tensors[key + "lora_A_init"])
            and torch.equal(layer.lora_B_init, tensors[key + "lora_B_init"])
            and layer.scaling == lora_scaling(layer.r, info["lora_alpha"], info.get("use_rslora", False))
        ):
            kept.add(name)
        else:
            layer.restore_original_base()
    with torch.no_grad():
        for key, t in tensors.items():
            mod, _, p = key.rpartition(".")
            if p not in ("lora_A_init", "lora_B_init"):
                copy_full_into(model.get_submodule(mod)._parameters[p], t)  # a DTensor shard keeps its part
    for name, info in modules.items():
        layer = model.get_submodule(name)
        layer.set_scaling(info["lora_alpha"], info.get("use_rslora", False))
        init = info.get("init_lora_weights", "default")
        if is_mutating_init(init) and name not in kept:  # back to the residual base the adapter was trained on
            key = f"{name}." if name else ""
            layer.adopt_initial(init, tensors[key + "lora_A_init"], tensors[key + "lora_B_init"])
