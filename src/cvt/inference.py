"""`optimize_for_inference`: one fast inference callable for a CvT, whatever runs underneath.

Backends (each takes a batch of images as a torch tensor and returns float32 logits as a torch tensor):

- "torch": `cvt.optimize.rewrite_for_inference`, the model rewritten in PyTorch (BatchNorm folded, biases moved,
  QuickGELU folded, one residual write per block; float32 or bfloat16; optionally `torch.compile`d).
- "onnxruntime": that rewritten float32 model exported to ONNX (`cvt.export.onnx_bytes`, checked against PyTorch)
  and run by an onnxruntime `InferenceSession` with as many threads as torch uses.
- "openvino": that rewritten float32 model converted to OpenVINO IR (`cvt.openvino_backend`, checked against
  PyTorch), compiled for the CPU with torch's thread count, the LATENCY hint for batches under
  `THROUGHPUT_MIN_BATCH` images and THROUGHPUT (a batch split over parallel streams) from it on, in float32,
  bfloat16 or int8 (NNCF post-training quantization calibrated on `calibration`).

Conversions (20-60 s for the ONNX export of CvT-13 on 2 cores, ~5-15 s for OpenVINO) are kept in the export cache
(`cvt.export_cache`: keyed by weights, architecture, settings and source, verified, bounded, least recently used
evicted; an unusable cache means running uncached after one warning).

"auto" decides from measurements made on the machine it runs on (`cvt.backend_trials`):
1. not on the CPU, or `compile=True`: "torch"; int8: "openvino" (the one backend that has it).
2. the candidates: "torch", "openvino" when installed (float32 and bfloat16), "onnxruntime" when installed
   (float32 only); a missing one is logged once.
3. the work at hand pays for conversions: with `images` (the number of images the caller will run) a backend not
   yet in the cache is a candidate only when the torch backend would take longer on those images than the
   conversion takes (both measured on the machine once known: before, the conversion is assumed to take
   `DEFAULT_CONVERSION_S` and torch is timed on one image), so `cvt predict a.jpg b.jpg` runs on torch at once
   and a folder or a server (`images=None`) pays for the export.
4. the first time a (machine, threads, architecture, dtype, batch size) is seen, every candidate is built and timed
   on a batch of that size (one untimed call, best of two), and the record kept in the cache; later calls take
   the fastest recorded. Without `batch_size` the choice is made for batch 1 and batch `LARGE_BATCH`, and when
   they differ a `BatchRouter` sends each call to its own (up to `ROUTER_MAX_BATCH` images to the first).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import export as export_module
from . import model as model_module
from . import openvino_backend
from . import optimize as optimize_module
from ._optional import require
from .backend_trials import DEFAULT_CONVERSION_S, load_trials, save_trial, seconds_per_image, trial_key
from .export_cache import ENTRY_FILE, export_cache_dir, export_key, load_entry, store_entry
from .model import CvT
from .openvino_backend import ConvertedModel, OpenVinoModel, openvino_available
from .optimize import DEFAULT_CHUNK_ELEMENTS, InferenceBlock, rewrite_for_inference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
DTYPES = (torch.float32, torch.bfloat16, "int8")
THROUGHPUT_MIN_BATCH = 8  # "openvino": the THROUGHPUT hint from this batch size on
LARGE_BATCH = 32  # "auto" without batch_size: the large batch it also decides for
ROUTER_MAX_BATCH = 8  # ... and the largest batch sent to the batch-1 choice
_ONNX_SETTINGS = {"opset": export_module.DEFAULT_OPSET, "graph": "rewrite_for_inference float32"}
_ONNX_MODULES = (model_module, optimize_module, export_module)
_OPENVINO_MODULES = (model_module, optimize_module, openvino_backend)


def onnxruntime_available() -> bool:
    """Whether the "onnxruntime" backend can run here: `onnx`, `onnxscript` (the exporter) and `onnxruntime`."""
    try:
        import onnx  # noqa: F401, PLC0415
        import onnxruntime  # noqa: F401, PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class OnnxRuntimeModel(ConvertedModel):
    """An onnxruntime session behind the interface of the `CvT` it was exported from: images in, logits out.

    Args:
        session: an `onnxruntime.InferenceSession` of a graph `cvt.export.export_onnx` wrote.
        model: the model it was exported from (only its metadata is kept).
        path: the ONNX file, for `repr`.
    """

    def __init__(self, session: Any, model: CvT, path: str | os.PathLike | None = None) -> None:
        super().__init__(model, path)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def _run(self, x: torch.Tensor) -> Any:
        (logits,) = self.session.run([self.output_name], {self.input_name: x.numpy()})
        return logits

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.session.get_session_options().intra_op_num_threads}"


class BatchRouter(nn.Module):
    """Each call to the faster backend for its batch size: `small` up to `max_batch` images, `large` above.

    Carries the metadata of the models it routes to (`num_classes`, `data_config`, ...), like `OnnxRuntimeModel`.
    """

    def __init__(self, small: nn.Module, large: nn.Module, max_batch: int = ROUTER_MAX_BATCH) -> None:
        super().__init__()
        self.small, self.large, self.max_batch = small, large, max_batch
        for name in ("cfg", "model_name", "data_config", "class_names", "pretrained_cfg", "num_classes"):
            setattr(self, name, getattr(small, name))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(x) if x.shape[0] <= self.max_batch else self.large(x)

    def extra_repr(self) -> str:
        return f"max_batch={self.max_batch}"


def _entry_name(model: CvT) -> str:
    return (model.model_name or "cvt").replace("/", "_")


def _conversion_key(model: CvT) -> str:
    return trial_key(model.cfg.to_dict(), "conversion", "-")


def _through_cache(
    kind: str,
    model: CvT,
    key: str,
    cache_dir: str | os.PathLike | None,
    convert: Callable[[], Any],
    write: Callable[[Any, Path], None],
    load: Callable[[Any, Path | None], nn.Module],
) -> nn.Module:
    """`load(folder, folder)` of the verified cache entry, else `convert()`, cached by `write(artifact, folder)`
    and loaded from the entry, or from memory (`load(artifact, None)`) when the cache cannot take it."""
    root, name = Path(cache_dir or export_cache_dir()), _entry_name(model)
    folder = load_entry(root, kind, name, key)
    if folder is not None:
        try:
            loaded = load(folder, folder)
            logger.info("%s: cached conversion %s", kind, folder)
            return loaded
        except Exception as err:  # loaders raise their own exception types: convert again
            logger.warning("cannot load the cached conversion %s (%s): converting again", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
    logger.info("%s: converting %s (once; later calls load it from %s)", kind, name, root)
    start = time.perf_counter()
    artifact = convert()
    save_trial(root, _conversion_key(model), {kind: time.perf_counter() - start})
    folder = store_entry(root, kind, name, key, lambda f: write(artifact, f))
    return load(folder, folder) if folder is not None else load(artifact, None)


def _onnx_key(model: CvT) -> str:
    return export_key(model, _ONNX_SETTINGS, _ONNX_MODULES)


def _onnxruntime_model(model: CvT, cache_dir: str | os.PathLike | None) -> OnnxRuntimeModel:
    """The rewritten float32 model exported to ONNX (or its cached export) in an onnxruntime session."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, package=module, extra="export", purpose="the onnxruntime backend")
    threads = torch.get_num_threads()

    def convert() -> bytes:
        return export_module.onnx_bytes(rewrite_for_inference(model), opset=_ONNX_SETTINGS["opset"])[0]

    def write(data: bytes, folder: Path) -> None:
        (folder / "model.onnx").write_bytes(data)

    def load(source: Any, folder: Path | None) -> OnnxRuntimeModel:
        path = folder / "model.onnx" if folder is not None else None
        session = export_module.onnx_session(path or source, threads=threads)
        return OnnxRuntimeModel(session, model, path)

    return _through_cache("onnx", model, _onnx_key(model), cache_dir, convert, write, load)


def _openvino_settings(batches: list[torch.Tensor] | None) -> dict[str, Any]:
    ov = require("openvino", package="openvino", extra="openvino", purpose="the openvino backend")
    int8 = None if batches is None else openvino_backend.batches_digest(batches)
    return {"openvino": ov.__version__, "graph": "rewrite_for_inference float32", "int8": int8}


def _openvino_model(
    model: CvT,
    precision: torch.dtype | str,
    batch_size: int | None,
    cache_dir: str | os.PathLike | None,
    calibration: Any = None,
) -> OpenVinoModel:
    """The rewritten model as OpenVINO IR (or its cached IR), quantized for int8, compiled for `precision`."""
    batches = None
    if precision == "int8":
        if calibration is None:
            raise ValueError("dtype='int8' needs calibration= images (a folder, files, or tensors)")
        batches = openvino_backend.calibration_batches(model, calibration)
    key = export_key(model, _openvino_settings(batches), _OPENVINO_MODULES)
    threads = torch.get_num_threads()
    throughput = batch_size is not None and batch_size >= THROUGHPUT_MIN_BATCH

    def convert() -> Any:
        ir = openvino_backend.convert_openvino(model)
        return ir if batches is None else openvino_backend.quantize_int8(ir, batches)

    def write(ir: Any, folder: Path) -> None:
        openvino_backend.save_ir(ir, folder / openvino_backend.IR_FILE)

    def load(source: Any, folder: Path | None) -> OpenVinoModel:
        path = folder / openvino_backend.IR_FILE if folder is not None else None
        compiled = openvino_backend.compile_openvino(path or source, precision, threads=threads, throughput=throughput)
        return OpenVinoModel(compiled, model, path)

    kind = "openvino-int8" if batches is not None else "openvino"
    return _through_cache(kind, model, key, cache_dir, convert, write, load)


def _build(
    backend: str, model: CvT, dtype: Any, compile: bool, chunk_elements: int, batch_size: int | None,
    cache_dir: str | os.PathLike | None, calibration: Any,
) -> nn.Module:  # fmt: skip
    """One backend's model (settings already checked)."""
    if backend == "torch":
        return rewrite_for_inference(model, dtype, compile, chunk_elements)
    if backend == "onnxruntime":
        return _onnxruntime_model(model, cache_dir)
    return _openvino_model(model, dtype, batch_size, cache_dir, calibration)


def _candidates(device: torch.device, dtype: Any, compile: bool) -> list[str]:
    """The backends "auto" may run (rules 1-2 of the module docstring)."""
    if dtype == "int8":
        return ["openvino"]
    if device.type != "cpu" or compile:
        return ["torch"]
    found = ["torch"]
    if openvino_available():
        found.append("openvino")
    else:
        logger.info("openvino is not installed (pip install 'cvt-pytorch[openvino]'): not trying it")
    if dtype == torch.float32:
        if onnxruntime_available():
            found.append("onnxruntime")
        else:
            logger.info("onnxruntime is not installed (pip install 'cvt-pytorch[export]'): not trying it")
    return found


def _is_cached(backend: str, model: CvT, root: Path) -> bool:
    if backend == "onnxruntime":
        return (root / "onnx" / f"{_entry_name(model)}-{_onnx_key(model)}" / ENTRY_FILE).is_file()
    key = export_key(model, _openvino_settings(None), _OPENVINO_MODULES)
    return (root / "openvino" / f"{_entry_name(model)}-{key}" / ENTRY_FILE).is_file()


def _trial_input(model: CvT, batch: int) -> torch.Tensor:
    size = tuple(model.data_config.input_size)
    return torch.randn(batch, model.cfg.in_chans, *size, generator=torch.Generator().manual_seed(0))


def _affordable(
    names: list[str], model: CvT, dtype: Any, images: int | None, root: Path, build: Callable[[str], nn.Module]
) -> list[str]:
    """The candidates whose conversion the work at hand pays for (rule 3 of the module docstring)."""
    if images is None or len(names) == 1:
        return names
    torch_key = trial_key(model.cfg.to_dict(), str(dtype), 1)
    torch_s = load_trials(root).get(torch_key, {}).get("torch")
    if torch_s is None:  # one image through torch, measured once per machine and architecture
        torch_s = seconds_per_image(build("torch"), _trial_input(model, 1))
        save_trial(root, torch_key, {"torch": torch_s})
    conversions = load_trials(root).get(_conversion_key(model), {})
    kinds = {"onnxruntime": "onnx", "openvino": "openvino"}
    return [
        name
        for name in names
        if name == "torch"
        or _is_cached(name, model, root)
        or images * torch_s > conversions.get(kinds[name], DEFAULT_CONVERSION_S[name])
    ]


def _auto(
    model: CvT, dtype: Any, compile: bool, chunk_elements: int, batch: int, images: int | None,
    cache_dir: str | os.PathLike | None, calibration: Any, hint_batch: int | None,
) -> tuple[str, dict[str, nn.Module]]:  # fmt: skip
    """The backend "auto" runs for batches of `batch` (rules 3-4 of the module docstring), and the backends' models
    it built on the way."""
    root = Path(cache_dir or export_cache_dir())
    built: dict[str, nn.Module] = {}

    def build(name: str) -> nn.Module:
        if name not in built:
            built[name] = _build(name, model, dtype, compile, chunk_elements, hint_batch, cache_dir, calibration)
        return built[name]

    names = _candidates(next(model.parameters()).device, dtype, compile)
    names = _affordable(names, model, dtype, images, root, build)
    if len(names) == 1:
        return names[0], built
    key = trial_key(model.cfg.to_dict(), str(dtype), batch)
    record = load_trials(root).get(key, {})
    if not all(name in record for name in names):
        x = _trial_input(model, batch)
        record = {name: seconds_per_image(build(name), x) for name in names}
        save_trial(root, key, record)
        logger.info(
            "auto: timed %s at batch %d: %s", dtype, batch, {n: f"{1 / s:.1f} img/s" for n, s in record.items()}
        )
    return min(names, key=record.__getitem__), built


def choose_backend(
    model: CvT,
    dtype: torch.dtype | str = torch.float32,
    compile: bool = False,
    batch_size: int = 1,
    *,
    images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """The backend "auto" runs for batches of `batch_size` (the rule in the module docstring; may time backends
    and convert the model, once per machine)."""
    return _auto(model, dtype, compile, DEFAULT_CHUNK_ELEMENTS, batch_size, images, cache_dir, None, batch_size)[0]


def _check_settings(backend: str, device: torch.device, dtype: Any, compile: bool, calibration: Any) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if not any(dtype is d or dtype == d for d in DTYPES):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or 'int8', not {dtype!r}")
    if dtype == "int8" and backend not in ("openvino", "auto"):
        raise ValueError(f"dtype='int8' runs on backend='openvino' or 'auto', not {backend!r}")
    if (dtype == "int8") != (calibration is not None):
        raise ValueError("calibration= is given with dtype='int8', and only then")
    if backend in ("onnxruntime", "openvino") or dtype == "int8":
        if device.type != "cpu":
            raise ValueError(f"the {backend} backend runs on the CPU, and the model is on {device}")
        if compile:
            raise ValueError(f"the {backend} backend does not take compile=True; use backend='torch'")
    if backend == "onnxruntime" and dtype != torch.float32:
        raise ValueError(f"the onnxruntime backend runs float32; use backend='torch' or 'openvino' for {dtype}")


def optimize_for_inference(
    model: CvT,
    dtype: torch.dtype | str = torch.float32,
    compile: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    *,
    backend: str = "torch",
    batch_size: int | None = None,
    images: int | None = None,
    calibration: str | os.PathLike | Iterable[Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """A fast inference copy of `model`: images (B, C, H, W) -> float32 logits (B, classes); `model` is unchanged.

    Every backend reproduces the eval-mode model: in float32 within 1e-5 relative ("torch") and 1e-4 relative
    ("onnxruntime", "openvino"; ~1e-6 measured), in bfloat16 within bfloat16 rounding (3e-2 relative over a
    network); int8 agrees on the top-1 class of a trained model for >= 99% of images (README: Performance).

    Args:
        model: a `CvT` (any configuration).
        dtype: torch.float32; torch.bfloat16 ("torch" and "openvino") to run matmuls, convolutions and attention
            in bfloat16; or "int8" ("openvino" and "auto") for NNCF's post-training quantization.
        compile: wrap the "torch" backend's model in `torch.compile`.
        chunk_elements: hidden activations per MLP row chunk of the "torch" backend; 0 runs each MLP in one piece.
        backend: "torch", "onnxruntime", "openvino" or "auto" (the rule "auto" follows: the module docstring).
        batch_size: the largest batch the caller will pass ("auto" decides for it, "openvino" picks its hint by
            it); None: any.
        images: for "auto", how many images the caller will run in all (a conversion is made only when the work
            pays for it); None: unbounded (a folder, a server).
        calibration: for int8, a folder of images, image files, or transformed batches (B, C, H, W) to calibrate on.
        cache_dir: where conversions are cached (default `cvt.export_cache.export_cache_dir()`).

    Returns:
        The "torch" backend's rewritten `CvT` (an `OptimizedModule` around it with `compile`), an
        `OnnxRuntimeModel`, an `OpenVinoModel`, or for "auto" without `batch_size` possibly a `BatchRouter`.

    Raises:
        ValueError: an unknown backend or dtype, or a setting the chosen backend does not have.
        ImportError: backend "onnxruntime" or "openvino" (or int8) without its package ("auto" leaves it out).
    """
    device = next(model.parameters()).device
    _check_settings(backend, device, dtype, compile, calibration)
    if backend != "auto":
        return _build(backend, model, dtype, compile, chunk_elements, batch_size, cache_dir, calibration)
    args = (model, dtype, compile, chunk_elements)
    if batch_size is not None:
        name, built = _auto(*args, batch_size, images, cache_dir, calibration, batch_size)
        return built.get(name) or _build(name, *args, batch_size, cache_dir, calibration)
    small, built = _auto(*args, 1, images, cache_dir, calibration, None)
    large, _ = _auto(*args, LARGE_BATCH, images, cache_dir, calibration, None)
    small_model = built.get(small) or _build(small, *args, None, cache_dir, calibration)
    if large == small:
        return small_model
    return BatchRouter(small_model, _build(large, *args, LARGE_BATCH, cache_dir, calibration))


def is_optimized(model: nn.Module) -> bool:
    """Whether `model` already is what `optimize_for_inference` returns (of any backend)."""
    kinds = (ConvertedModel, BatchRouter, InferenceBlock)
    return any(isinstance(m, kinds) for m in model.modules())


__all__ = [
    "BACKENDS",
    "DTYPES",
    "LARGE_BATCH",
    "ROUTER_MAX_BATCH",
    "THROUGHPUT_MIN_BATCH",
    "BatchRouter",
    "OnnxRuntimeModel",
    "OpenVinoModel",
    "choose_backend",
    "export_cache_dir",
    "export_key",
    "is_optimized",
    "onnxruntime_available",
    "openvino_available",
    "optimize_for_inference",
]
