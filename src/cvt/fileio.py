"""Atomic file writes: a crash or kill never leaves a half-written file under the final name.

A written file gets the mode a plain `open(path, "w")` would give it: 0o666 less the umask for a new file (0o644
under umask 022), the existing file's mode for a rewrite; `mkstemp` alone would leave every file 0o600.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

# a full disk, an exhausted quota, no permission, a read-only file system, a folder in the way: said with the
# file's own name
NAMED_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR)


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux 4.7+): setting it to read it,
    the only portable way, leaves a moment in which another thread's new file would get mode 0o666."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)  # a rewrite keeps the user's chmod
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success flush, fsync and rename it over `path`.

    If the body raises, the temporary file is removed and `path` keeps its previous content. The file ends with
    the existing file's mode, or 0o666 less the umask when it is new.

    Raises:
        IsADirectoryError: `path` is a folder (checked first, so nothing is written).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {path}: it is a folder; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _final_mode(path))
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in NAMED_ERRORS and str(path) not in str(err):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err  # the file, not the temp
        raise


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write `data` as indented JSON with a final newline, atomically; returns `path`."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path
