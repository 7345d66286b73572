"""Writing files: atomically, reproducibly, and without debris.

* :func:`atomic_write` writes a temporary file next to the target and renames it over the target. A process killed
  mid-write leaves its temporary file behind (nothing can prevent that), named ``.{target}.{pid}.{random}.tmp``;
  the next write of the same target, or :func:`remove_stale_temporaries`, removes those whose process is gone.
* A symlink is written *through* (its target is replaced, the link stays a link); a read-only target is refused.
* :func:`write_safetensors` writes the safetensors format itself, with tensors and metadata in sorted order, so
  the same tensors and metadata always give the same bytes (safetensors' own writer orders metadata by a hash map
  seeded per process).
* :class:`SafetensorsReader` reads a safetensors file tensor by tensor with plain reads into memory each tensor
  owns, without a memory mapping: what was read and dropped is gone from the process (a mapping keeps every page
  it touched resident for as long as any tensor from the file lives).
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

__all__ = ["SafetensorsReader", "atomic_write", "remove_stale_temporaries", "write_safetensors"]

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
_ST_TORCH = {name: dtype for dtype, name in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


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


class SafetensorsReader:
    """One safetensors file, read a tensor at a time into memory the tensor owns (no memory mapping).

    ``with SafetensorsReader(path) as f: f.keys(); f.shape(key); f.read(key)``. The header is checked when the file
    is opened: a ``ValueError`` names the file (and key) for a truncated file, a malformed header, an unknown dtype,
    or data offsets that disagree with the shape or run past the end of the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._entries = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise ValueError(f"{self.path}: not a safetensors file ({size} bytes, too short for a header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{self.path}: header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{self.path}: malformed safetensors header ({err})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: malformed safetensors header (not a JSON object)")
        self._data_start = 8 + length
        entries = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = _ST_TORCH[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: malformed header entry for {key!r}: {info!r}") from None
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if min(shape, default=0) < 0 or start < 0 or end - start != nbytes or self._data_start + end > size:
                raise ValueError(
                    f"{self.path}: {key!r} ({info['dtype']}, shape {list(shape)}) has data offsets "
                    f"[{start}, {end}], which do not match its {nbytes} bytes within the file's {size}"
                )
            entries[key] = (dtype, shape, start, end)
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key``, in memory of its own (CPU)."""
        dtype, shape, start, end = self._entries[key]
        buf = torch.empty(end - start, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        self._file.seek(self._data_start + start)
        done = 0
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise ValueError(f"{self.path}: the file ended inside {key!r}")
            done += n
        if not buf.numel():
            return torch.empty(shape, dtype=dtype)
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
