"""Reading a weights file safely: the format (torch zip/pickle or safetensors) from its first bytes, and a
`torch.load(weights_only=True)` that refuses, before any of it runs, a pickle that carries code."""

from __future__ import annotations

import os
import pickle
import re
import warnings
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
    raise CheckpointError(
        f"{path} is not a PyTorch or safetensors file ({size} bytes, starting {head[:8]!r}); "
        "it may be truncated, or not a checkpoint"
    )


def read_weights_file(path: str | os.PathLike) -> Any:
    """The object in a `torch.save` or safetensors file, read without running any code from it.

    Raises:
        CheckpointError: the file carries Python objects other than tensors and plain containers (refused, nothing
            of it runs), or it is truncated or corrupt.
    """
    path = Path(path)
    if _sniff(path) == "safetensors":
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types
            raise CheckpointError(f"cannot read {path}: {err}; the file is truncated or corrupt") from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: refused below
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err)
        found = re.search(r"(Unsupported global: GLOBAL \S+|Can only build [^\n]*)", detail)
        if found:
            raise CheckpointError(
                f"refusing to load {path}: it contains pickled Python objects that are not weights "
                f"({found.group(1)}); unpickling them could run arbitrary code, so nothing of it was run. If you "
                "trust the file, re-save only its tensors (a state dict) with torch.save or safetensors."
            ) from None
        found = re.search(r"Unsupported operand [^\n]*", detail)
        if found:
            raise CheckpointError(
                f"refusing to load {path}: it is a plain Python pickle, not a torch.save or safetensors file "
                f"({found.group(0)}); unpickling it could run arbitrary code, so nothing of it was run"
            ) from None
        found = re.search(r"WeightsUnpickler error: *([^\n]+)", detail)
        reason = found.group(1) if found else (detail.splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"cannot read {path}: {reason}; the file is truncated or corrupt") from None
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, zip errors, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read {path}: {reason}; the file is truncated or corrupt") from None
