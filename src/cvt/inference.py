"""`optimize_for_inference`: one fast inference callable for a CvT, whatever runs underneath.

Backends (each takes a batch of images as a torch tensor and returns float32 logits as a torch tensor):

- "torch": `cvt.optimize.rewrite_for_inference`, the model rewritten in PyTorch (BatchNorm folded, biases moved,
  QuickGELU folded, one residual write per block; float32 or bfloat16; optionally `torch.compile`d).
- "onnxruntime": that rewritten float32 model exported to ONNX (`cvt.export.export_onnx`, which checks the graph
  against PyTorch before it is written) and run by an onnxruntime `InferenceSession` with as many threads as torch
  uses (`torch.get_num_threads()` when the session is made). Exporting takes 20-60 s for CvT-13 on 2 cores, so the
  file is cached (`export_cache_dir()`), named by a hash of the weights, the architecture, the exporter's settings
  and the source of the code that builds the graph: a second call with the same model loads it in a second.
- "auto": the fastest of the available backends for the device, dtype and batch size, by this rule (measured
  side by side, `benchmarks/bench_models.py` and the notes in the README's Performance section):
  1. not on CPU, a dtype other than float32, or `compile=True`: "torch" (onnxruntime's CPU kernels have no
     bfloat16 matmul, while torch uses AVX512-BF16/AMX where the CPU has them);
  2. float32 on CPU without `onnx`, `onnxscript` and `onnxruntime` (the `export` extra): "torch", logged;
  3. float32 on CPU: onnxruntime for batches up to `ONNXRUNTIME_MAX_BATCH` images, where per-operator overhead
     dominates and onnxruntime's fused graph was 1.1-1.5x the "torch" backend (batch 1-8, AMD EPYC with
     AVX-512, 1 thread), and "torch" above it, where the GEMMs dominate and torch's (oneDNN/MKL) are at least as
     fast (onnxruntime read 0.79x at batch 16 and 0.61-1.06x at 32 in runs on a loaded machine; 1.07x at 32 on
     an AVX2 EPYC). `ONNXRUNTIME_MAX_BATCH` is that threshold: `bench_models.py` times both paths. With
     `batch_size` (the largest batch the caller will pass) the one backend that fits is returned; without it, a
     `BatchRouter` holding both sends each call to the one its batch size picks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import export as export_module
from . import model as model_module
from . import optimize as optimize_module
from ._optional import require
from .model import CvT
from .optimize import DEFAULT_CHUNK_ELEMENTS, InferenceBlock, rewrite_for_inference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
ONNXRUNTIME_MAX_BATCH = 8  # "auto": onnxruntime up to this batch size, torch above (see the module docstring)
CACHE_ENV = "CVT_CACHE_DIR"
_CACHE_FORMAT = 1  # bump when the cached file's meaning changes


def onnxruntime_available() -> bool:
    """Whether the "onnxruntime" backend can run here: `onnx`, `onnxscript` (the exporter) and `onnxruntime`."""
    try:
        import onnx  # noqa: F401, PLC0415
        import onnxruntime  # noqa: F401, PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def choose_backend(
    device: str | torch.device, dtype: torch.dtype = torch.float32, compile: bool = False, batch_size: int = 1
) -> str:
    """The backend "auto" runs for a batch of `batch_size` on `device` in `dtype` (the rule in the module docstring)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32 or compile:
        return "torch"
    if not onnxruntime_available():
        logger.info("onnxruntime is not installed (pip install 'cvt-pytorch[export]'): running the PyTorch backend")
        return "torch"
    return "onnxruntime" if batch_size <= ONNXRUNTIME_MAX_BATCH else "torch"


def export_cache_dir() -> Path:
    """Where exported graphs are cached: $CVT_CACHE_DIR, else $XDG_CACHE_HOME/cvt, else ~/.cache/cvt."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cvt"


@functools.cache
def _source_digest() -> bytes:
    """A hash of the modules that build the exported graph, read once per process."""
    sources = (model_module, optimize_module, export_module)
    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in sources)).digest()


def export_key(model: CvT, settings: dict[str, Any]) -> str:
    """A hash of everything the exported graph depends on: weights, architecture, settings and the source of the
    modules that build it (a changed rewrite makes a new file, never a stale one)."""
    digest = hashlib.sha256()
    header = {"format": _CACHE_FORMAT, "torch": torch.__version__, "config": model.cfg.to_dict(), **settings}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(_source_digest())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the raw bytes
    return digest.hexdigest()[:24]


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session behind the interface of the `CvT` it was exported from: images in, logits out.

    It carries the model's metadata (`cfg`, `model_name`, `data_config`, `class_names`, `num_classes`) so that it
    stands in for the model in evaluation and prediction. Inputs are taken as float32 on the CPU (a copy only when
    they are not already) and the logits come back on the input's device.

    Args:
        session: an `onnxruntime.InferenceSession` of a graph `cvt.export.export_onnx` wrote.
        model: the model it was exported from (only its metadata is kept).
        path: the ONNX file, for `repr`.
    """

    def __init__(self, session: Any, model: CvT, path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.session, self.path = session, path
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        self.cfg, self.model_name, self.data_config = model.cfg, model.model_name, model.data_config
        self.class_names, self.pretrained_cfg = model.class_names, model.pretrained_cfg
        self.num_classes, self.num_features = model.num_classes, model.num_features
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()  # a view when x already is one
        (logits,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(logits).to(x.device)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.session.get_session_options().intra_op_num_threads}"


class BatchRouter(nn.Module):
    """Each call to the faster backend for its batch size: `small` up to `max_batch` images, `large` above.

    Carries the metadata of the models it routes to (`num_classes`, `data_config`, ...), like `OnnxRuntimeModel`.
    """

    def __init__(self, small: nn.Module, large: nn.Module, max_batch: int = ONNXRUNTIME_MAX_BATCH) -> None:
        super().__init__()
        self.small, self.large, self.max_batch = small, large, max_batch
        for name in ("cfg", "model_name", "data_config", "class_names", "pretrained_cfg", "num_classes"):
            setattr(self, name, getattr(small, name))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(x) if x.shape[0] <= self.max_batch else self.large(x)

    def extra_repr(self) -> str:
        return f"max_batch={self.max_batch}"


def _onnxruntime_model(model: CvT, cache_dir: str | os.PathLike | None) -> OnnxRuntimeModel:
    """Export the rewritten float32 model (or load the cached export) and open a session on it."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, package=module, extra="export", purpose="the onnxruntime backend")
    threads = torch.get_num_threads()
    settings = {"opset": export_module.DEFAULT_OPSET, "graph": "rewrite_for_inference float32"}
    name = (model.model_name or "cvt").replace("/", "_")
    path = Path(cache_dir or export_cache_dir()) / "onnx" / f"{name}-{export_key(model, settings)}.onnx"
    if path.is_file():
        try:
            session = export_module.onnx_session(path, threads=threads)
            logger.info("onnxruntime: cached export %s", path)
            return OnnxRuntimeModel(session, model, path)
        except Exception as err:  # a damaged cache entry (onnxruntime raises its own exception types): export again
            logger.warning("cannot load the cached export %s (%s): exporting again", path, err)
    logger.info("onnxruntime: exporting %s to %s (once; later calls load it)", name, path)
    export_module.export_onnx(rewrite_for_inference(model), path, opset=settings["opset"])
    return OnnxRuntimeModel(export_module.onnx_session(path, threads=threads), model, path)


def optimize_for_inference(
    model: CvT,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    *,
    backend: str = "torch",
    batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """A fast inference copy of `model`: images (B, C, H, W) -> float32 logits (B, classes); `model` is unchanged.

    Every backend reproduces the eval-mode model: in float32 within 1e-5 relative ("torch") and 1e-4 relative
    ("onnxruntime"; ~1e-6 measured), in bfloat16 within bfloat16 rounding (see `cvt.optimize`).

    Args:
        model: a `CvT` (any configuration).
        dtype: float32, or bfloat16 ("torch" backend) to run matmuls, convolutions and attention in bfloat16.
        compile: wrap the "torch" backend's model in `torch.compile`.
        chunk_elements: hidden activations per MLP row chunk of the "torch" backend; 0 runs each MLP in one piece.
        backend: "torch", "onnxruntime" or "auto" (see the module docstring for the rule "auto" follows).
        batch_size: for "auto", the largest batch the caller will pass; None routes each call by its own size.
        cache_dir: where "onnxruntime" caches its exports (default `export_cache_dir()`).

    Returns:
        The "torch" backend's rewritten `CvT` (an `OptimizedModule` around it with `compile`), an
        `OnnxRuntimeModel`, or for "auto" without `batch_size` possibly a `BatchRouter` between the two.

    Raises:
        ValueError: an unknown backend, or a setting the chosen backend does not have.
        ImportError: backend "onnxruntime" without onnxruntime installed ("auto" falls back to "torch").
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    device = next(model.parameters()).device
    if backend == "auto":
        # only onnxruntime depends on the batch size: without one, a router holds both and picks per call
        backend = choose_backend(device, dtype, compile, batch_size or 1)
        if backend == "onnxruntime" and batch_size is None:
            large = rewrite_for_inference(model, dtype, compile, chunk_elements)
            return BatchRouter(_onnxruntime_model(model, cache_dir), large)
    if backend == "torch":
        return rewrite_for_inference(model, dtype, compile, chunk_elements)
    if device.type != "cpu":
        raise ValueError(f"the onnxruntime backend runs on the CPU, and the model is on {device}")
    if dtype != torch.float32 or compile:
        raise ValueError(
            "the onnxruntime backend runs float32 without torch.compile; use backend='torch' for "
            f"dtype={dtype} or compile=True"
        )
    return _onnxruntime_model(model, cache_dir)


def is_optimized(model: nn.Module) -> bool:
    """Whether `model` already is what `optimize_for_inference` returns (of any backend)."""
    kinds = (OnnxRuntimeModel, BatchRouter, InferenceBlock)
    return any(isinstance(m, kinds) for m in model.modules())


__all__ = [
    "BACKENDS",
    "ONNXRUNTIME_MAX_BATCH",
    "BatchRouter",
    "OnnxRuntimeModel",
    "choose_backend",
    "export_cache_dir",
    "export_key",
    "is_optimized",
    "onnxruntime_available",
    "optimize_for_inference",
]
