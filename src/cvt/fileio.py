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
# what to do about each; the one wording of a failed write, for every writer (`write_error`)
WRITE_HINTS = {
    errno.ENOSPC: "the disk is full: free space (old runs, checkpoints) or choose another output",
    errno.EDQUOT: "the disk quota is exhausted: free space or choose another output",
    errno.EACCES: "no permission to write there: fix the directory's permissions or choose another output",
    errno.EPERM: "no permission to write there: fix the directory's permissions or choose another output",
    errno.EROFS: "the file system is read-only: choose another output",
    errno.ENOTDIR: "a file stands where a directory is needed: choose another output",
    errno.EEXIST: "a file stands where a directory is needed: choose another output",
    errno.EISDIR: "a folder stands where a file is needed: choose another output",
}


def write_error(target: str | os.PathLike, err: OSError, kept: str = "") -> OSError:
    """`err` said once for every writer: "cannot write TARGET: <cause> (<what to do>)[; KEPT]", of the same type
    and errno; an error already said so is returned as it is."""
    if str(err.strerror or "").startswith("cannot write "):
        return err
    hint = WRITE_HINTS.get(err.errno, "check the disk and the directory")
    return type(err)(err.errno, f"cannot write {target}: {err.strerror} ({hint})" + (f"; {kept}" if kept else ""))


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
            raise write_error(path, err) from err  # the file, not the temporary one
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
