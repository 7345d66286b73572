"""Writing files: atomically, reproducibly, and without debris.

* :func:`atomic_write` writes a temporary file next to the target and renames it over the target. A process killed
  mid-write leaves its temporary file behind (nothing can prevent that), named ``.{target}.{pid}.{random}.tmp``;
  the next write of the same target, or :func:`remove_stale_temporaries`, removes those whose process is gone.
* A symlink is written *through* (its target is replaced, the link stays a link); a read-only target is refused.
* :func:`write_safetensors` writes the safetensors format itself, with tensors and metadata in sorted order, so
  the same tensors and metadata always give the same bytes (safetensors' own writer orders metadata by a hash map
  seeded per process).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import struct
from pathlib import Path
from collections.abc import Callable, Mapping

import torch

__all__ = ["atomic_write", "remove_stale_temporaries", "write_safetensors"]

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writes of ``path`` by processes no longer running left behind; return them."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+\.tmp")
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:  # no directory (yet), or not readable: nothing of ours there
        return removed
    for p in candidates:
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _resolve_target(path: Path) -> Path:
    """The file to replace: a symlink's target (written through), refused if read-only."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory; give a file path")
    if target.exists() and not target.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{str(path)!r} is read-only; refusing to replace it (make it writable or delete it)")
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in the target's directory, then rename it over the target.

    A failure before the rename leaves any previous file intact and removes the temporary file; the rename itself
    is atomic on POSIX. The result keeps the permissions of the file it replaces, or gets those of a file created
    the ordinary way (umask): ``tempfile.mkstemp`` and safetensors' ``save_file`` create 0600 files, which would
    hide the file from a server running as another user.
    """
    target = _resolve_target(Path(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = str(target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    open(tmp, "xb").close()
    try:
        # the replaced file's mode, else 0o666 & ~umask (read without touching the process-wide umask)
        mode = (target.stat().st_mode if target.exists() else os.stat(tmp).st_mode) & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX); not possible on Windows
        fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    """Write ``tensors`` (any device; copied to the CPU one at a time) as a safetensors file at ``path``.

    Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
    ``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`` padded with spaces to a multiple of 8, then the
    tensors' bytes back to back. Names and metadata keys are sorted and the JSON is compact, so equal input gives
    equal bytes.
    """
    names = sorted(tensors)
    header: dict[str, object] = {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which this writer does not store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)
