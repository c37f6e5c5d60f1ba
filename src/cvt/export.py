"""Export a CvT (classifier or backbone) to ONNX or TorchScript, with a numerical check against PyTorch.

Both formats take any batch size and any input height and width the convolutions allow: CvT has no position
embedding, and the token grids (H, W) that the depth-wise projections fold tokens back into are read from tensor
shapes, which both exporters keep symbolic. BatchNorm is folded into the depth-wise convolutions first
(`cvt.optimize.fold_batchnorm`), so the exported graph has no BatchNormalization nodes.

ONNX goes through the dynamo exporter (`torch.onnx.export(..., dynamo=True)` with named dynamic dimensions). The
legacy TorchScript-based exporter (`dynamo=False` with `dynamic_axes`) was tried and rejected: it bakes the example's
token grid into the tokens -> map reshapes and its batch into the class-token concatenation, so onnxruntime fails on
any other size (torch 2.13). TorchScript goes through `torch.jit.trace`, which keeps those sizes as `aten::size`
calls.

Every export is checked before anything is written: the exported program is run (onnxruntime, or the reloaded
TorchScript module) on random inputs of several shapes and compared with the original, unfolded PyTorch model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._optional import require
from .eval_mode import eval_mode
from .fileio import atomic_write
from .model import model_metadata, stage_grid
from .optimize import fold_batchnorm
from .outputs import check_output

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 18
# The example traced has batch 2: torch.export specialises a dimension of size 1 to the constant 1. For the same
# reason every stage's token grid of the example must be 2 or more; its size limits nothing else (the graph takes
# any size), so the largest is only a bound on the memory tracing takes.
_EXAMPLE_BATCH = 2
MAX_EXAMPLE_SIZE = 1024


@dataclasses.dataclass
class ExportResult:
    """What an export wrote and how closely it reproduces PyTorch.

    Attributes:
        path: the written file.
        format: "onnx" or "torchscript".
        checks: (input shape (B, C, H, W), max abs difference to PyTorch over all outputs) per checked input;
            empty when the check was skipped.
    """

    path: Path
    format: str
    checks: list[tuple[tuple[int, ...], float]] = dataclasses.field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """Largest difference over all checked inputs (0.0 if nothing was checked)."""
        return max((diff for _, diff in self.checks), default=0.0)


def check_example_size(size: int) -> int:
    """`size` if it can be a side of the example traced (1 to `MAX_EXAMPLE_SIZE` pixels), else ValueError."""
    if not 1 <= size <= MAX_EXAMPLE_SIZE:
        raise ValueError(f"input size {size} is outside 1-{MAX_EXAMPLE_SIZE} pixels: it is the example traced, and "
                         "the exported graph takes any size")  # fmt: skip
    return size


def supported_opsets() -> tuple[int, int]:
    """(lowest, highest) ONNX opset that the installed exporter writes itself: from the version of torch's operator
    library (below it torch only tries converting the finished graph, and keeps its own version when that fails,
    without an error) to the highest torch.onnx declares, capped by the installed onnx's."""
    onnx = require("onnx", package="onnx", extra="export", purpose="ONNX export")
    try:  # private modules: the only place torch states them
        from torch.onnx import _constants  # noqa: PLC0415
        from torch.onnx._internal.exporter import _constants as exporter_constants  # noqa: PLC0415

        low, high = exporter_constants.TORCHLIB_OPSET, _constants.ONNX_MAX_OPSET
    except (ImportError, AttributeError):
        logger.warning("torch %s does not state its ONNX opsets where cvt looks: only %d", torch.__version__,
                       DEFAULT_OPSET)  # fmt: skip
        low = high = DEFAULT_OPSET
    return low, min(high, onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    """`opset` if the installed exporter writes it (`supported_opsets`), else ValueError naming the range."""
    low, high = supported_opsets()
    if not low <= opset <= high:
        raise ValueError(f"opset {opset} is outside the opsets the installed exporter writes, {low}-{high} (torch "
                         f"{torch.__version__})")  # fmt: skip
    return opset


def _input_size(model: nn.Module, input_size: int | Sequence[int] | None) -> tuple[int, int]:
    """The example's (H, W), checked: within `check_example_size`, every stage's token grid 2 or more."""
    if input_size is None:
        size = tuple(model.data_config.input_size)
    elif isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = (int(input_size[0]), int(input_size[0])) if len(input_size) == 1 else tuple(map(int, input_size[-2:]))
    for side in size:
        check_example_size(side)
    cfg = model.cfg
    last = cfg.num_stages - 1
    if min(stage_grid(cfg, last, size)) < 2:
        smallest = next(n for n in range(1, MAX_EXAMPLE_SIZE + 1) if min(stage_grid(cfg, last, (n, n))) >= 2)
        raise ValueError(
            f"input size {size[0]}x{size[1]} leaves a token grid of {stage_grid(cfg, last, size)} in the last stage, "
            f"which the exporter would fix as a constant: use {smallest} or more (the graph takes any size)"
        )
    return size


def default_check_shapes(in_chans: int, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    # batch 1 at the export size, then batch 3 at an odd, non-square size (its k/v grids round up) a quarter
    # the area, so that the check costs little more than one forward pass
    h, w = size
    return [(1, in_chans, h, w), (3, in_chans, h // 2 + 1, w // 2 + 17)]


def _output_names(model: nn.Module) -> list[str]:
    if hasattr(model, "out_indices"):  # a CvTFeatures backbone: one map per selected stage
        return [f"stage{i}" for i in model.out_indices]
    return ["logits"]


def _as_list(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _metadata(model: nn.Module) -> dict[str, str]:
    """Model facts recorded in the exported file (JSON strings under "cvt.*" keys), so that it can be used without
    this package; entries the model does not have are left out."""
    meta = model_metadata(model)
    out = {"cvt.format_version": "1"}
    if meta["model_name"]:
        out["cvt.model_name"] = str(meta["model_name"])
    out["cvt.config"] = json.dumps(meta["model_config"])
    out["cvt.data_config"] = json.dumps(meta["data_config"])
    if meta["class_names"] is not None:
        out["cvt.class_names"] = json.dumps(meta["class_names"])
    return out


def prepare_for_export(model: nn.Module) -> nn.Module:
    """An eval-mode float32 CPU copy of `model` with every projection BatchNorm folded into its convolution."""
    folded = fold_batchnorm(model).float().cpu()  # fold_batchnorm deep-copies and puts the copy in eval mode
    folded.requires_grad_(False)
    return folded


def compare_with_pytorch(
    run: Any,
    model: nn.Module,
    shapes: Sequence[Sequence[int]],
    atol: float,
    what: str,
) -> list[tuple[tuple[int, ...], float]]:
    """Run `run(x) -> list of arrays/tensors` and `model(x)` on random inputs of `shapes`; raise if they differ."""
    generator = torch.Generator().manual_seed(0)
    param = next(model.parameters())
    checks = []
    with eval_mode(model), torch.no_grad():
        for shape in shapes:
            x = torch.randn(*shape, generator=generator)
            expected = [t.cpu() for t in _as_list(model(x.to(param.device, param.dtype)))]
            got = [torch.as_tensor(out) for out in run(x)]
            if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in expected]:
                raise RuntimeError(
                    f"{what} output shapes {[tuple(t.shape) for t in got]} differ from PyTorch's "
                    f"{[tuple(t.shape) for t in expected]} for input {tuple(shape)}"
                )
            diff = max((g.float() - e.float()).abs().max().item() for g, e in zip(got, expected, strict=True))
            checks.append((tuple(shape), diff))
            logger.debug("%s vs PyTorch, input %s: max abs diff %.3g", what, tuple(shape), diff)  # callers show it
            if not diff <= atol:  # also catches NaN
                raise RuntimeError(
                    f"{what} export does not reproduce PyTorch: max abs diff {diff:.3g} > {atol:g} for input "
                    f"{tuple(shape)}; nothing was written"
                )
    return checks


def onnx_session(model_or_path: str | os.PathLike | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for an ONNX file (or its serialised bytes), all graph optimisations on.

    `threads`: the session's intra-op threads (onnxruntime's default, one per core, when None); operators run one
    after another (no inter-op pool), as torch runs them.
    """
    ort = require("onnxruntime", package="onnxruntime", extra="export", purpose="running an ONNX file")

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model_or_path if isinstance(model_or_path, bytes) else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _quiet_torch_onnx() -> contextlib.ExitStack:
    """Silence the exporter's notices (torchvision not installed, internal FutureWarnings) unless debugging."""
    stack = contextlib.ExitStack()
    if not logger.isEnabledFor(logging.DEBUG):
        for name in ("torch.onnx", "onnx_ir", "onnxscript"):
            noisy = logging.getLogger(name)
            stack.callback(noisy.setLevel, noisy.level)
            noisy.setLevel(logging.ERROR)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", FutureWarning)
    return stack


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: int | Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    check_shapes: Sequence[Sequence[int]] | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Write `model` as an ONNX graph with dynamic batch, height and width, BatchNorm folded.

    The input is named "images" (B, C, H, W); the output "logits" (B, classes) for a classifier, or "stage{i}"
    (B, C_i, H_i, W_i) per selected stage for a `CvTFeatures` backbone. The file's metadata records the model
    name, its `CvTConfig`, its `DataConfig` (preprocessing) and class names, as JSON under "cvt.*" keys.

    Args:
        model: a `CvT` or `CvTFeatures` (not modified).
        path: the .onnx file to write (atomically, only once the check passed).
        input_size: (H, W) or N of the example traced; default the model's `data_config.input_size`.
        opset: ONNX opset version, within `supported_opsets()`.
        check: run the graph in onnxruntime and compare with PyTorch before writing.
        check_shapes: input shapes (B, C, H, W) to check; default batch 1 at `input_size` and batch 3 at
            (H / 2 + 1, W / 2 + 17).
        atol: largest max-abs difference to PyTorch accepted.

    Returns:
        The path and the differences measured.

    Raises:
        RuntimeError: the exported graph's outputs differ from PyTorch's by more than `atol`.
        ValueError: an opset the installed exporter does not write (`supported_opsets`), or an example size it
            cannot trace from; OutputError (a ValueError) for a folder where the file goes.
        MissingExtraError: onnx, onnxscript (the exporter) or onnxruntime (the check) is not installed.
    """
    path = check_output(path, folder=False, suggest="model.onnx")  # before the export's minutes
    data, checks = onnx_bytes(
        model, input_size=input_size, opset=opset, check=check, check_shapes=check_shapes, atol=atol
    )
    with atomic_write(path) as f:
        f.write(data)
    logger.info("wrote %s (%.1f MB)", path, len(data) / 1e6)
    return ExportResult(path, "onnx", checks)


def onnx_bytes(
    model: nn.Module,
    *,
    input_size: int | Sequence[int] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    check_shapes: Sequence[Sequence[int]] | None = None,
    atol: float = 1e-4,
) -> tuple[bytes, list[tuple[tuple[int, ...], float]]]:
    """`export_onnx`'s graph, serialised, and its checks, without writing a file (arguments as `export_onnx`)."""
    onnx = require("onnx", package="onnx", extra="export", purpose="ONNX export")
    require("onnxscript", package="onnxscript", extra="export", purpose="ONNX export")  # torch's dynamo exporter
    if check:
        require("onnxruntime", package="onnxruntime", extra="export", purpose="checking an ONNX export")
    check_opset(opset)
    size = _input_size(model, input_size)
    folded = prepare_for_export(model)
    in_chans = folded.cfg.in_chans
    example = torch.randn(_EXAMPLE_BATCH, in_chans, *size, generator=torch.Generator().manual_seed(0))
    logger.info("exporting to ONNX (opset %d), example input %s", opset, tuple(example.shape))
    with _quiet_torch_onnx():
        program = torch.onnx.export(
            folded,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=_output_names(folded),
            dynamic_shapes=({0: "batch", 2: "height", 3: "width"},),
            opset_version=opset,
            verbose=False,
        )
    proto = program.model_proto
    written = {entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise RuntimeError(f"the exporter wrote opset {sorted(written)} where {opset} was asked; nothing was written")
    for key, value in _metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()

    checks = []
    if check:
        session = onnx_session(data)
        input_name = session.get_inputs()[0].name
        shapes = check_shapes or default_check_shapes(in_chans, size)
        checks = compare_with_pytorch(lambda x: session.run(None, {input_name: x.numpy()}), model, shapes, atol, "ONNX")
    return data, checks


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: int | Sequence[int] | None = None,
    check: bool = True,
    check_shapes: Sequence[Sequence[int]] | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Write `model` as a traced TorchScript module (any batch, height and width), BatchNorm folded.

    The file loads with `torch.jit.load` alone. Its extra files "cvt.config.json", "cvt.data_config.json",
    "cvt.class_names.json" and "cvt.model_name.txt" record what `export_onnx` puts in the ONNX metadata.

    Args:
        model: a `CvT` or `CvTFeatures` (not modified).
        path: the .pt file to write (atomically, only once the check passed).
        input_size: (H, W) or N of the example traced; default the model's `data_config.input_size`.
        check: reload the saved module and compare it with PyTorch before writing.
        check_shapes: input shapes (B, C, H, W) to check; default as `export_onnx`.
        atol: largest max-abs difference accepted.

    Returns:
        The path and the differences measured.

    Raises:
        RuntimeError: the traced module's outputs differ from PyTorch's by more than `atol`.
        ValueError: an example size it cannot trace from; OutputError (a ValueError) for a folder where the file
            goes.
    """
    path = check_output(path, folder=False, suggest="model.pt")
    size = _input_size(model, input_size)
    folded = prepare_for_export(model)
    in_chans = folded.cfg.in_chans
    example = torch.randn(_EXAMPLE_BATCH, in_chans, *size, generator=torch.Generator().manual_seed(0))
    logger.info("tracing to TorchScript, example input %s", tuple(example.shape))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(folded, (example,), check_trace=False)
    extra = {}
    for key, value in _metadata(model).items():
        extra[f"{key}.txt" if key == "cvt.model_name" else f"{key}.json"] = value
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in favour of torch.export
        torch.jit.save(traced, buffer, _extra_files=extra)
    data = buffer.getvalue()

    checks = []
    if check:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            reloaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        shapes = check_shapes or default_check_shapes(in_chans, size)
        checks = compare_with_pytorch(lambda x: _as_list(reloaded(x)), model, shapes, atol, "TorchScript")
    with atomic_write(path) as f:
        f.write(data)
    logger.info("wrote %s (%.1f MB)", path, len(data) / 1e6)
    return ExportResult(path, "torchscript", checks)


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx", **kwargs: Any) -> ExportResult:
    """`export_onnx` or `export_torchscript` by `format` name."""
    if format == "onnx":
        return export_onnx(model, path, **kwargs)
    if format == "torchscript":
        kwargs.pop("opset", None)
        return export_torchscript(model, path, **kwargs)
    raise ValueError(f"unknown export format {format!r}; choose one of {FORMATS}")


__all__ = [
    "FORMATS",
    "MAX_EXAMPLE_SIZE",
    "ExportResult",
    "check_example_size",
    "check_opset",
    "export",
    "export_onnx",
    "export_torchscript",
    "compare_with_pytorch",
    "default_check_shapes",
    "onnx_bytes",
    "onnx_session",
    "prepare_for_export",
    "supported_opsets",
]
