"""Writing files atomically: a temporary file in the target's directory, renamed over the target."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s directory, then rename it over ``path``.

    A crash before the rename leaves any previous ``path`` intact and removes the temporary file; the rename itself
    is atomic on POSIX. The result gets the permissions of a file created the ordinary way (umask): both
    ``tempfile.mkstemp`` and safetensors' ``save_file`` create 0600 files, which would hide the adapter from a
    server running as another user.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    open(tmp, "xb").close()
    try:
        mode = os.stat(tmp).st_mode & 0o777  # 0o666 & ~umask, read without touching the process-wide umask
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX); not possible on Windows
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
