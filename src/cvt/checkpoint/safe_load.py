"""Reading a weights file safely: the format (torch zip/pickle or safetensors) from its first bytes, and a
`torch.load(weights_only=True)` that refuses, before any of it runs, a pickle that carries code."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .formats import CheckpointError


def _numpy_safe_globals() -> list[Any]:
    """numpy arrays/scalars of plain numeric dtypes (e.g. RNG states): data, not code, so allowed in weights_only."""
    core = getattr(np, "_core", None) or np.core
    kinds = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
    kinds += (np.float16, np.float32, np.float64)
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype] + [
        type(np.dtype(k)) for k in kinds
    ]


def _sniff(path: Path) -> str:
    """'torch' (zip or legacy pickle) or 'safetensors', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < size and head[8:9] == b"{":
        return "safetensors"
    if size == 0:
        raise CheckpointError(f"{path} is not a checkpoint: the file is empty (0 bytes)")
    raise CheckpointError(
        f"{path} is not a checkpoint: not a PyTorch or safetensors file ({size} bytes, starting {head[:8]!r}); "
        "it may be truncated, or another kind of file"
    )


def _describe(obj: Any) -> str:
    """What a file held, in a few words, for a message."""
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, list | tuple):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    return f"a {type(obj).__name__}"


def _refusal(path: Path, detail: str) -> CheckpointError | None:
    """The safety refusal for torch's weights_only error `detail`, or None when it is not one.

    torch 2.4-2.13 word it "Unsupported global: GLOBAL mod.name was not an allowed global" or, for a module it
    blocks outright (os, subprocess, ...), "unsupported GLOBAL posix.system whose module posix is blocked".
    """
    found = re.search(r"GLOBAL ([\w.]+)", detail)
    if found:
        return CheckpointError(
            f"refusing to load {path}: refused for safety, it names the Python global {found.group(1)}, which is "
            "code, not weights: unpickling it could run arbitrary code, so nothing of it was run. If you trust the "
            "file, re-save only its tensors (a state dict) with torch.save or safetensors."
        )
    found = re.search(r"Can only build [^\n]*", detail)
    if found:
        return CheckpointError(
            f"refusing to load {path}: refused for safety, it holds pickled Python objects that are not weights "
            f"({found.group(0)}); unpickling them could run arbitrary code, so nothing of it was run"
        )
    found = re.search(r"Unsupported operand [^\n]*", detail)
    if found:
        return CheckpointError(
            f"refusing to load {path}: refused for safety, it is a plain Python pickle, not a torch.save or "
            f"safetensors file ({found.group(0)}); unpickling it could run arbitrary code, so nothing of it was run"
        )
    return None


def _is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (`torch.jit.save`): a zip like `torch.save`'s, with the program's code
    and constants, which torch's safe loader does not read."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("/constants.pkl") or "/code/__torch__/" in name for name in names)


def _first_line(detail: str, default: str) -> str:
    """The first line of a torch error, without its advice to load with `weights_only=False` (which would run the
    file's code): never shown."""
    line = (detail.splitlines() or [default])[0]
    return "torch cannot read it as weights" if "weights_only" in line else line


def read_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in a `torch.save` or safetensors file, read without running any code from it.

    Raises:
        CheckpointError: the file carries Python objects other than tensors and plain containers (refused for
            safety, nothing of it runs), is truncated or corrupt, or holds no dict (not a checkpoint).
    """
    path = Path(path)
    if _sniff(path) == "safetensors":
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types
            raise CheckpointError(f"cannot read {path}: {err}; the file is truncated or corrupt") from None
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript program (written by torch.jit.save, e.g. `cvt export --format torchscript`), "
            "not a checkpoint: run it with torch.jit.load, or give the checkpoint it was exported from"
        )
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: refused below
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err)
        refusal = _refusal(path, detail)
        if refusal is not None:
            raise refusal from None
        found = re.search(r"WeightsUnpickler error: *([^\n]+)", detail)
        reason = found.group(1) if found else _first_line(detail, type(err).__name__)
        raise CheckpointError(f"cannot read {path}: {reason}; the file is truncated or corrupt") from None
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, zip errors, ...
        reason = _first_line(str(err), type(err).__name__)
        raise CheckpointError(f"cannot read {path}: {reason}; the file is truncated or corrupt") from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint: it holds {_describe(obj)}, where a checkpoint holds a dict "
            "(a state dict of tensors, or one wrapped with other entries)"
        )
    return obj
