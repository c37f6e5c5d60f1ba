"""The export cache: converted graphs (ONNX files, OpenVINO IR) kept between runs, keyed, verified and bounded.

Converting a model costs seconds to a minute; loading the result a second. `cvt.optimize_for_inference` keeps each
conversion in a folder of the cache (`export_cache_dir()`):

    CACHE/KIND/NAME-KEY/    the converted files (model.onnx, or model.xml + model.bin) and entry.json

- KEY is `export_key`: a hash of the weights, the architecture, the conversion's settings and the source of the
  modules that build the graph, so a changed model or rewrite makes a new entry, never a stale one.
- entry.json carries the key and a SHA-256 of every file. An entry is used only when both match: a damaged file,
  or another graph placed under the name, is removed and converted again (with a warning), never used silently.
- An entry is written in a temporary folder beside the others and renamed into place once complete, so a crash
  leaves no half entry under the final name.
- A cache that cannot be written (read-only, full, not a directory) is not an error: the caller runs the graph it
  just converted from memory, uncached, after one warning per cache folder and reason.
- Size bound: after each new entry, the least recently used entries (by the time entry.json was last read) are
  removed until the cache holds at most `cache_max_bytes()`: $CVT_CACHE_MAX_BYTES (a number of bytes, or with a
  K, M or G suffix: "500M"), 2 GiB by default; 0 turns the cache off. The newest entry is always kept.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .fileio import write_json

logger = logging.getLogger(__name__)

CACHE_ENV = "CVT_CACHE_DIR"
MAX_BYTES_ENV = "CVT_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
ENTRY_FILE = "entry.json"
_CACHE_FORMAT = 2  # bump when an entry's meaning changes
_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def export_cache_dir() -> Path:
    """Where converted graphs are cached: $CVT_CACHE_DIR, else $XDG_CACHE_HOME/cvt, else ~/.cache/cvt."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cvt"


def cache_max_bytes() -> int:
    """The cache's size bound: $CVT_CACHE_MAX_BYTES ("2000000000", "500M", "2G"), else 2 GiB; 0 = no cache.

    Raises:
        ValueError: the variable is set to something else, named with its value.
    """
    text = os.environ.get(MAX_BYTES_ENV, "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return DEFAULT_MAX_BYTES
    number, suffix = (text[:-1], text[-1]) if text[-1] in _SUFFIXES else (text, "")
    try:
        value = float(number) * _SUFFIXES[suffix]
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(
            f"{MAX_BYTES_ENV}={os.environ[MAX_BYTES_ENV]!r} is not a size: give bytes, or a number with K, M or G"
        )
    return int(value)


@functools.cache
def _source_digest(modules: tuple[ModuleType, ...]) -> bytes:
    """A hash of the source files of `modules`, read once per process."""
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in modules)).digest()


def export_key(model: nn.Module, settings: dict[str, Any], modules: Iterable[ModuleType] = ()) -> str:
    """A hash of everything a converted graph depends on: weights and buffers, architecture, `settings` and the
    source of `modules` (the code that builds the graph: a changed rewrite makes a new entry, never a stale one)."""
    digest = hashlib.sha256()
    header = {"format": _CACHE_FORMAT, "torch": torch.__version__, "config": model.cfg.to_dict(), **settings}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(_source_digest(tuple(modules)))
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the raw bytes
    return digest.hexdigest()[:24]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def _warn_uncached(root: str, reason: str) -> None:
    """One warning per cache folder and reason (functools.cache remembers it was said)."""
    logger.warning("cannot use the export cache %s (%s): running uncached (set %s to another folder)", root, reason,
                   CACHE_ENV)  # fmt: skip


def _remove(entry: Path) -> None:
    if entry.is_dir():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _entry_problem(folder: Path, key: str) -> str | None:
    """What is wrong with the entry in `folder` for `key`, or None when it is complete and its own."""
    try:
        record = json.loads((folder / ENTRY_FILE).read_text())
        if record.get("key") != key:
            return f"it was written for key {record.get('key')!r}, not {key!r}"
        files = record["files"]
        present = {p.name for p in folder.iterdir()} - {ENTRY_FILE}
        if set(files) != present:
            return f"it holds {sorted(present)}, its record lists {sorted(files)}"
        for name, expected in files.items():
            if _file_digest(folder / name) != expected:
                return f"{name} does not match its recorded SHA-256"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its record cannot be read: {err}"
    return None


def load_entry(root: str | os.PathLike, kind: str, name: str, key: str) -> Path | None:
    """The folder of the cached entry `name` under `key`, verified, or None when there is none to use.

    A damaged or foreign entry is removed (where the cache allows) after a warning. A used entry's record is
    touched, which makes it the most recently used for eviction.
    """
    folder = Path(root) / kind / f"{name}-{key}"
    if not (folder / ENTRY_FILE).is_file():
        return None
    problem = _entry_problem(folder, key)
    if problem:
        logger.warning("not using the cache entry %s: %s; converting again", folder, problem)
        _remove(folder)
        return None
    with contextlib.suppress(OSError):  # a read-only cache: its entries are still used, in any order
        os.utime(folder / ENTRY_FILE)
    return folder


def store_entry(root: str | os.PathLike, kind: str, name: str, key: str, write: Callable[[Path], None]) -> Path | None:
    """Add an entry: `write(folder)` writes its files into a fresh folder, which is then recorded and renamed into
    place. Returns the entry's folder, or None when the cache cannot take it (one warning; nothing is left behind).
    """
    root = Path(root)
    if cache_max_bytes() == 0:
        return None
    parent, final = root / kind, root / kind / f"{name}-{key}"
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".tmp", dir=parent))
        write(tmp)
        files = {p.name: _file_digest(p) for p in sorted(tmp.iterdir())}
        write_json({"format": _CACHE_FORMAT, "key": key, "files": files}, tmp / ENTRY_FILE)
        _remove(final)  # a damaged entry load_entry could not remove, or one another process just wrote
        os.rename(tmp, final)
    except Exception as err:  # a read-only or full disk, or a path that is a file: the writers raise their own types
        if tmp is not None:
            _remove(tmp)
        _warn_uncached(str(root), getattr(err, "strerror", None) or str(err).splitlines()[0])
        return None
    evict(root, keep=final)
    return final


def entries(root: str | os.PathLike) -> list[tuple[float, int, Path]]:
    """(last use, bytes, folder) of every entry in the cache, least recently used first; the single .onnx files of
    earlier versions (CACHE/onnx/NAME-KEY.onnx, never read now) count as entries, so that eviction removes them."""
    found = []
    for record in Path(root).glob(f"*/*/{ENTRY_FILE}"):
        with contextlib.suppress(OSError):  # removed by another process meanwhile
            size = sum(p.stat().st_size for p in record.parent.iterdir())
            found.append((record.stat().st_mtime, size, record.parent))
    for legacy in Path(root).glob("onnx/*.onnx"):
        with contextlib.suppress(OSError):
            found.append((legacy.stat().st_mtime, legacy.stat().st_size, legacy))
    return sorted(found)


def evict(root: str | os.PathLike, keep: Path | None = None, max_bytes: int | None = None) -> list[Path]:
    """Remove least recently used entries until the cache holds at most `max_bytes` (default `cache_max_bytes()`);
    `keep` is never removed. Returns the removed folders."""
    limit = cache_max_bytes() if max_bytes is None else max_bytes
    found = entries(root)
    total = sum(size for _, size, _ in found)
    removed = []
    for _, size, folder in found:
        if total <= limit:
            break
        if folder != keep:
            _remove(folder)
            removed.append(folder)
            total -= size
    if removed:
        logger.info("export cache over %d bytes: removed %d least recently used entries", limit, len(removed))
    return removed


__all__ = [
    "CACHE_ENV",
    "DEFAULT_MAX_BYTES",
    "MAX_BYTES_ENV",
    "cache_max_bytes",
    "entries",
    "evict",
    "export_cache_dir",
    "export_key",
    "load_entry",
    "store_entry",
]
