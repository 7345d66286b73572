"""LoRA on a model sharded with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), whose parameters are
``DTensor`` shards.

* :func:`lora.lora_state_dict`, :func:`lora.save_lora` and :func:`lora.export_peft` work on a sharded model: they
  gather every LoRA parameter to its full tensor (a collective: **every rank must call them**, in the same order),
  and the two writers write once, on rank 0. :func:`lora.merge_lora` and :func:`lora.merge_and_unload` refuse a
  sharded model with a ``ValueError`` saying what to do instead.
* :func:`shard` applies ``fully_shard`` to each block, then the root (FSDP2's recipe); :func:`load_into_shards`
  fills the local shards from safetensors files, reading only this rank's rows of each tensor from the memory-mapped
  file (no rank ever holds the whole model); :func:`init_lora` initialises the LoRA parameters of a model built on
  the meta device with the same values (same RNG draws, same order) as :func:`lora.inject` on a real model.

``docs/distributed.md`` has the recipe (``examples/finetune_phi3.py --fsdp``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from safetensors import safe_open

from .base import LoRABase, has_adapter

__all__ = [
    "is_sharded",
    "is_writer",
    "full_tensor",
    "gathered_lora",
    "refuse_sharded",
    "shard",
    "load_into_shards",
    "init_lora",
    "copy_full_into",
]


def _is_dtensor(t: object) -> bool:
    # A DTensor exists only once torch.distributed.tensor was imported (by FSDP2, or whoever made it): look it up
    # there rather than import it here, which would add a second to every ``import lora``.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (sharded by FSDP2 or another ``torch.distributed`` API)."""
    return any(_is_dtensor(p) for p in model.parameters())


def is_writer() -> bool:
    """Rank 0 of the default process group, or the only process: the one that writes files."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, gathered to its full value if it is a ``DTensor`` (a collective: every rank must call)."""
    t = t.detach()
    return t.full_tensor() if _is_dtensor(t) else t


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRABase]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRABase) and has_adapter(m):
            yield name, m


@contextlib.contextmanager
def gathered_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRA layer's ``lora_A``/``lora_B`` is a plain ``Parameter`` holding the full tensor
    (gathered from the shards; a collective: every rank enters it). Read-only: the sharded parameters are put back
    on exit, and writes to the gathered ones are lost. Outside FSDP2's forward and backward only."""
    swapped: list[tuple[LoRABase, str, nn.Parameter]] = []
    try:
        for _, m in _lora_layers(model):
            for name in m.lora_param_names():
                p = m._parameters[name]
                if _is_dtensor(p):
                    swapped.append((m, name, p))
                    m._parameters[name] = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
        yield model
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def refuse_sharded(model: nn.Module, what: str) -> None:
    """``ValueError`` if ``model`` is sharded: ``what`` (an in-place weight change) needs the full weights."""
    if is_sharded(model):
        raise ValueError(
            f"{what} needs full weights, but {type(model).__name__}'s parameters are sharded (DTensor, FSDP2): save "
            "the adapter with lora.save_lora(model, path) (every rank calls it; rank 0 writes), then on one process "
            f"load the base model unsharded, lora.load_lora(base, path) and {what}(base)"
        )


def shard(model: nn.Module, blocks: Iterable[nn.Module], **fsdp_kwargs) -> nn.Module:
    """FSDP2's recipe: ``fully_shard`` each of ``blocks`` (e.g. the decoder layers: one all-gather per block), then
    the root (the rest: embeddings, final norm, head). Works on a model on the meta device. Returns ``model``."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def _local_rows(p: torch.Tensor) -> tuple[int, int] | None:
    """``(start, stop)`` of the dim-0 rows of the full tensor that this rank's shard of ``p`` holds, for a
    ``Shard(0)`` placement on a 1-D mesh (FSDP2's), following ``torch.chunk`` as ``Shard`` does; else ``None``."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or p.placements != (Shard(0),):
        return None
    n, parts, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-n // parts)  # ceil
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


@torch.no_grad()
def load_into_shards(model: nn.Module, files: Sequence[str | os.PathLike], skip: Iterable[str] = ()) -> list[str]:
    """Copy each tensor of the safetensors ``files`` into the parameter or buffer of ``model`` with its name.

    A sharded (``DTensor``) parameter gets only this rank's rows, read from the memory-mapped file (other
    placements: the tensor is read whole and ``distribute_tensor`` keeps the local part); values are cast to the
    parameter's dtype. Keys in ``skip`` are ignored (e.g. a tied ``lm_head.weight``). A key ``model`` lacks, a shape
    that differs, or a parameter no file holds is a ``ValueError`` naming it. Returns the names loaded. Call it after
    ``model.to_empty(device=...)``.
    """
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    skip = set(skip)
    loaded = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in skip:
                    continue
                if key not in targets:
                    raise ValueError(f"{file}: tensor {key!r} is not a parameter or buffer of {type(model).__name__}")
                p, sliced = targets[key], f.get_slice(key)
                if tuple(sliced.get_shape()) != tuple(p.shape):
                    raise ValueError(
                        f"{file}: {key!r} has shape {tuple(sliced.get_shape())}, the model's is {tuple(p.shape)}"
                    )
                if _is_dtensor(p):
                    local, rows = p.to_local(), _local_rows(p)
                    if rows is not None:
                        part = sliced[rows[0] : rows[1]]
                    else:
                        from torch.distributed.tensor import distribute_tensor

                        part = distribute_tensor(
                            f.get_tensor(key), p.device_mesh, p.placements, src_data_rank=None
                        ).to_local()
                    if part.shape != local.shape:
                        raise RuntimeError(
                            f"{key}: the rows read {tuple(part.shape)} differ from the local shard "
                            f"{tuple(local.shape)}; this torch version shards differently"
                        )
                    local.copy_(part)
                else:
                    p.copy_(f.get_tensor(key))
                loaded.append(key)
    missing = sorted(
        n for n in dict(model.named_parameters()) if n not in loaded and n not in skip and not _is_lora_param(model, n)
    )
    if missing:
        raise ValueError(f"no file holds {len(missing)} parameter(s) of {type(model).__name__}: {', '.join(missing)}")
    return loaded


def _is_lora_param(model: nn.Module, name: str) -> bool:
    mod, _, p = name.rpartition(".")
    m = model.get_submodule(mod)
    return isinstance(m, LoRABase) and p in m.lora_param_names()


@torch.no_grad()
def init_lora(model: nn.Module) -> list[str]:
    """Initialise every LoRA layer's parameters (``reset_lora_parameters``), layer by layer in module order, each
    computed whole on the CPU and then cut to this rank's shard: the same values, from the same draws of the global
    RNG, as :func:`lora.inject` gives a model on the CPU. For a model built on the meta device and sharded, after
    ``to_empty``. Every rank must use the same seed. Returns the names of the layers initialised."""
    done = []
    for name, m in _lora_layers(model):
        sharded = {n: m._parameters[n] for n in m.lora_param_names()}
        for n, p in sharded.items():  # a full CPU stand-in for reset_lora_parameters to fill
            m._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        try:
            m.reset_lora_parameters()
            full = {n: m._parameters[n].detach() for n in sharded}
        finally:
            m._parameters.update(sharded)
        for n, p in sharded.items():
            copy_full_into(p, full[n])
        done.append(name)
    return done


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)``, where ``param`` may be a ``DTensor`` shard: it then keeps its own part of ``full``
    (the full value, identical on every rank; no communication)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        local = param.to_local()
        part = distribute_tensor(
            full.to(local.device, local.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        local.copy_(part.to_local())
    else:
        param.copy_(full)
