"""Measurements behind `backend="auto"`: timed trials of each backend, and conversion times, kept per machine.

They live in one JSON file of the export cache (`CACHE/backend-trials.json`), under a key naming the machine (CPU
model, instruction-set flags, thread count, library versions), the architecture (not the weights: the same
architecture runs at the same speed), the dtype and the batch size. A cache that cannot be written only means the
next process measures again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .fileio import write_json

logger = logging.getLogger(__name__)

TRIALS_FILE = "backend-trials.json"
# Conversion seconds assumed before one was measured on the machine (CvT-13 on 2 busy cores: ~5 s of CPU to trace
# for OpenVINO, ~35 s for the dynamo ONNX export and its check; both taken high so that a few images never pay).
DEFAULT_CONVERSION_S = {"openvino": 15.0, "onnxruntime": 60.0}


@functools.cache
def machine_id() -> str:
    """The CPU (model name and flags), thread count and library versions, hashed: what a timing holds for."""
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        fields = dict(line.split(":", 1) for line in info if ":" in line and line.split(":")[0].strip() in
                      ("model name", "flags"))  # fmt: skip
        cpu = json.dumps(sorted((k.strip(), v.strip()) for k, v in fields.items()))
    versions = []
    for dist in ("torch", "openvino", "onnxruntime"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=none")
    text = f"{cpu}|{platform.machine()}|{os.cpu_count()}|{'|'.join(versions)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trial_key(config: dict[str, Any], dtype: str, batch_size: int | str) -> str:
    """The record key of a (machine, threads, architecture, dtype, batch size)."""
    arch = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"{machine_id()}|threads={torch.get_num_threads()}|{arch}|{dtype}|{batch_size}"


def load_trials(root: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Every record of the cache at `root` ({} when there is none or it cannot be read)."""
    try:
        data = json.loads((Path(root) / TRIALS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_trial(root: str | os.PathLike, key: str, values: dict[str, float]) -> None:
    """Merge `values` into the record `key` (best effort: an unwritable cache is logged at debug level)."""
    data = load_trials(root)
    data[key] = {**data.get(key, {}), **values}
    try:
        write_json(data, Path(root) / TRIALS_FILE)
    except OSError as err:
        logger.debug("cannot record the backend trial in %s: %s", root, err)


def seconds_per_image(run: Callable[[torch.Tensor], Any], x: torch.Tensor, reps: int = 2) -> float:
    """Best of `reps` timed calls of `run(x)` after one untimed, per image."""
    with torch.inference_mode():
        run(x)
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            run(x)
            best = min(best, time.perf_counter() - start)
    return best / len(x)


__all__ = [
    "DEFAULT_CONVERSION_S",
    "TRIALS_FILE",
    "load_trials",
    "machine_id",
    "save_trial",
    "seconds_per_image",
    "trial_key",
]
