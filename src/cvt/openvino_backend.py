"""OpenVINO: a CvT as an OpenVINO model (IR), compiled for the CPU in float32, bfloat16 or int8.

The graph converted is `cvt.optimize.rewrite_for_inference`'s float32 model (BatchNorm folded, biases moved,
QuickGELU folded, the class-token-only last block), traced by `ov.convert_model` (its TorchScript path) with the
batch, height and width left dynamic. Tracing takes ~5 s of CPU for CvT-13, against ~35 s for our ONNX export
followed by `ov.convert_model` on the file (same graph speed within noise), so the IR is made from PyTorch directly.
Every conversion is run and compared with the PyTorch model before it is used or cached (`cvt.export.compare`).

The precision is chosen when the IR is compiled (`INFERENCE_PRECISION_HINT`): one float32 IR serves float32 and
bfloat16. int8 is another IR: NNCF's post-training quantization of the float32 one (`quantize_int8`), calibrated on
images passed through the model's own evaluation transform.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._optional import require
from .data import create_eval_transform, is_image_file, load_image
from .export import compare_with_pytorch, default_check_shapes
from .model import CvT
from .optimize import rewrite_for_inference

logger = logging.getLogger(__name__)

PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", "int8": "f32"}  # int8: the quantized ops stay int8
IR_FILE = "model.xml"
# The example traced has batch 2: a batch of 1 could be specialised to the constant 1.
_EXAMPLE_BATCH = 2


def _ov() -> Any:
    return require("openvino", package="openvino", extra="openvino", purpose="the openvino backend")


def openvino_available() -> bool:
    """Whether the "openvino" backend can run here."""
    try:
        import openvino  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class ConvertedModel(nn.Module):
    """A converted graph behind the interface of the `CvT` it came from: images in, float32 logits out.

    Carries the model's metadata (`cfg`, `model_name`, `data_config`, `class_names`, `num_classes`, ...) so that it
    stands in for the model in evaluation and prediction. Subclasses run `_run(float32 CPU tensor) -> array`.
    """

    def __init__(self, model: CvT, path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.path = path
        self.cfg, self.model_name, self.data_config = model.cfg, model.model_name, model.data_config
        self.class_names, self.pretrained_cfg = model.class_names, model.pretrained_cfg
        self.num_classes, self.num_features = model.num_classes, model.num_features
        self.eval()

    def _run(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._run(x.detach().to("cpu", torch.float32).contiguous())  # no copy when x already is one
        return torch.as_tensor(logits).to(x.device)


class OpenVinoModel(ConvertedModel):
    """A compiled OpenVINO model of a CvT (`compile_openvino`).

    Under the THROUGHPUT hint a batch is split over the compiled model's streams, which run in parallel, each on
    its share of the threads; under LATENCY one request runs the whole batch on all of them.

    Args:
        compiled: an `openvino.CompiledModel`.
        model: the model it was converted from (only its metadata is kept).
        path: the IR file, for `repr`.
    """

    def __init__(self, compiled: Any, model: CvT, path: str | os.PathLike | None = None) -> None:
        super().__init__(model, path)
        self.compiled = compiled
        self.streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.request = compiled.create_infer_request()
        self.queue = _ov().AsyncInferQueue(compiled, self.streams) if self.streams > 1 else None

    def _run(self, x: torch.Tensor) -> Any:
        array = x.numpy()
        if self.queue is None or len(array) < 2 * self.streams:
            return self.request.infer({0: array})[0].copy()  # the request reuses its output buffer
        bounds = [len(array) * i // self.streams for i in range(self.streams + 1)]
        parts = [array[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)]
        outputs: list[Any] = [None] * len(parts)

        def done(request: Any, index: int) -> None:
            outputs[index] = request.get_output_tensor(0).data.copy()

        self.queue.set_callback(done)
        for index, part in enumerate(parts):
            self.queue.start_async({0: part}, index)
        self.queue.wait_all()
        return torch.cat([torch.from_numpy(o) for o in outputs])

    def extra_repr(self) -> str:
        precision = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        hint = self.compiled.get_property("PERFORMANCE_HINT")
        return f"path={str(self.path)!r}, precision={precision}, hint={hint}, streams={self.streams}"


def convert_openvino(model: CvT, *, check: bool = True, atol: float = 1e-4) -> Any:
    """`model`'s float32 inference graph as an `openvino.Model` with dynamic batch, height and width.

    Args:
        model: a `CvT` (not modified).
        check: compile the result in float32 and compare it with `model` on random inputs of two shapes.
        atol: largest max-abs difference to PyTorch accepted.

    Raises:
        RuntimeError: the converted graph's outputs differ from PyTorch's by more than `atol`.
        MissingExtraError: openvino is not installed.
    """
    ov = _ov()
    fast = rewrite_for_inference(model)
    size = tuple(model.data_config.input_size)
    example = torch.randn(_EXAMPLE_BATCH, model.cfg.in_chans, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ov.convert_model traces with torch.jit.trace
        shape = ov.PartialShape([-1, model.cfg.in_chans, -1, -1])  # batch, height and width dynamic
        converted = ov.convert_model(fast, example_input=example, input=[shape])
    converted.inputs[0].get_tensor().set_names({"images"})
    converted.outputs[0].get_tensor().set_names({"logits"})
    if check:
        compiled = compile_openvino(converted, torch.float32, threads=torch.get_num_threads())
        run = OpenVinoModel(compiled, model)
        shapes = default_check_shapes(model.cfg.in_chans, size)
        compare_with_pytorch(lambda x: [run(x)], model, shapes, atol, "OpenVINO")
    return converted


def compile_openvino(
    ir: Any, precision: torch.dtype | str = torch.float32, *, threads: int, throughput: bool = False
) -> Any:
    """Compile an IR (an `openvino.Model` or a path to its .xml) for the CPU.

    Args:
        ir: the IR.
        precision: torch.float32 or torch.bfloat16 (matmuls and convolutions in bfloat16 where the CPU has native
            bfloat16), or "int8" for a quantized IR (its other operations in float32).
        threads: the threads OpenVINO uses in all.
        throughput: the THROUGHPUT hint (several streams, for large batches) instead of LATENCY.
    """
    ov = _ov()
    config = {
        "PERFORMANCE_HINT": "THROUGHPUT" if throughput else "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
    }
    return ov.Core().compile_model(ir if not isinstance(ir, (str, os.PathLike)) else str(ir), "CPU", config)


def calibration_batches(
    model: CvT, calibration: str | os.PathLike | Iterable[Any], batch_size: int = 8, limit: int = 300
) -> list[torch.Tensor]:
    """Calibration inputs for `quantize_int8` as float32 batches (B, C, H, W).

    Args:
        model: the model (its evaluation transform prepares image files).
        calibration: a folder of images (searched recursively), image files, or tensors: batches (B, C, H, W) or
            single images (C, H, W), already transformed.
        batch_size: images per batch made from files.
        limit: the most images used (NNCF's default subset is 300), evenly spaced over all of them.

    Raises:
        ValueError: no images.
    """
    if isinstance(calibration, (str, os.PathLike)):
        folder = Path(calibration)
        if not folder.is_dir():
            raise ValueError(f"calibration: {folder} is not a folder of images")
        calibration = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    items = list(calibration)
    items = items[:: max(1, len(items) // limit)][:limit]  # spread over the whole list (a sorted folder: every class)
    if not items:
        raise ValueError("calibration: no images given (pass a folder of images, image files, or tensors)")
    if isinstance(items[0], torch.Tensor):
        batches = [t if t.ndim == 4 else t.unsqueeze(0) for t in items]
    else:
        transform = create_eval_transform(model.data_config)
        images = [transform(load_image(p)) for p in items]
        batches = [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return [b.float().cpu() for b in batches]


def batches_digest(batches: Sequence[torch.Tensor]) -> str:
    """A hash of calibration batches, for the cache key of an int8 IR."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(str(tuple(batch.shape)).encode())
        digest.update(batch.contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def quantize_int8(ir: Any, batches: Sequence[torch.Tensor]) -> Any:
    """NNCF post-training quantization of a float32 IR: int8 weights (per channel) and activations, calibrated on
    `batches`; NNCF's transformer scheme keeps softmax, LayerNorm and the other sensitive operations in float.

    Raises:
        MissingExtraError: nncf is not installed.
    """
    nncf = require("nncf", package="nncf", extra="openvino", purpose="int8 quantization")
    from nncf.quantization.advanced_parameters import (  # noqa: PLC0415
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        QuantizationParameters,
    )

    dataset = nncf.Dataset(list(batches), lambda batch: batch.numpy())
    # One scale per activation tensor: NNCF would otherwise give some activations (B, N, C) one scale per token
    # position, fixing the IR to the calibration's token count (any other input size then fails to run).
    # SmoothQuant off: on the trained shapes and digits models it cost agreement with float32 (98.2% -> 99.0% and
    # 99.4% -> 100% without it; README, Performance).
    advanced = AdvancedQuantizationParameters(
        activations_quantization_params=QuantizationParameters(per_channel=False),
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1),
    )
    return nncf.quantize(
        ir, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches), advanced_parameters=advanced
    )


def save_ir(ir: Any, path: str | os.PathLike) -> None:
    """Write an IR as `path` (.xml) and its weights beside it (.bin), weights kept in their own precision."""
    _ov().save_model(ir, str(path), compress_to_fp16=False)


def export_openvino(
    model: CvT,
    repository: str | os.PathLike,
    *,
    name: str | None = None,
    calibration: str | os.PathLike | Iterable[Any] | None = None,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write `model` as OpenVINO IR laid out for OpenVINO Model Server: REPOSITORY/NAME/1/model.xml and model.bin.

    Args:
        model: a `CvT` on the CPU (not modified).
        repository: the model repository folder (created when missing).
        name: the model's folder name; default the model's name ("/" replaced), else "cvt".
        calibration: images to calibrate on (see `calibration_batches`) for an int8 IR; None writes float32.
        check: compare the float32 IR with PyTorch before anything is written.
        atol: largest max-abs difference to PyTorch accepted.

    Returns:
        The written model.xml.

    Raises:
        FileExistsError: REPOSITORY/NAME/1 exists (a version is never replaced).
    """
    name = name or (model.model_name or "cvt").replace("/", "_")
    version = Path(repository) / name / "1"
    if version.exists():
        raise FileExistsError(f"{version} exists: remove it or pass another --output (a version is never replaced)")
    ir = convert_openvino(model, check=check, atol=atol)
    if calibration is not None:
        ir = quantize_int8(ir, calibration_batches(model, calibration))
    version.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".1-", suffix=".tmp", dir=version.parent))
    try:
        save_ir(ir, tmp / IR_FILE)
        os.rename(tmp, version)  # the version appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s", version)
    return version / IR_FILE


__all__ = [
    "IR_FILE",
    "ConvertedModel",
    "OpenVinoModel",
    "batches_digest",
    "calibration_batches",
    "compile_openvino",
    "convert_openvino",
    "export_openvino",
    "openvino_available",
    "quantize_int8",
    "save_ir",
]
