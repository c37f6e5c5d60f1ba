"""`cvt export`: a model as ONNX or TorchScript with dynamic batch and image size, checked against PyTorch."""

from __future__ import annotations

import argparse

from cvt.checkpoint import checkpoint_files
from cvt.cli.usage import DeviceAction, UsageError, add_input_size_option, checked_int
from cvt.export import DEFAULT_OPSET, FORMATS, MAX_EXAMPLE_SIZE, check_example_size, check_opset, export
from cvt.factory import resolve_model
from cvt.outputs import check_output

SUFFIXES = {"onnx": "onnx", "torchscript": "pt"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX or TorchScript (dynamic batch/height/width, BatchNorm folded, checked)",
    )
    p.add_argument("--model", required=True, help="checkpoint path or registered name[.tag] (released weights)")
    p.add_argument("--format", choices=(*FORMATS, "openvino"), default="onnx", help="output format (default: onnx)")
    p.add_argument("--output", required=True, help="file to write (openvino: the model repository, NAME/1/ inside)")
    p.add_argument("--int8", action="store_true", help="openvino: int8 (NNCF post-training quantization)")
    p.add_argument("--calibration", help="openvino --int8: folder of images to calibrate on (a few hundred)")
    add_input_size_option(
        p,
        f"size of the example traced, up to {MAX_EXAMPLE_SIZE} (default: the model's; the graph takes any size)",
        type=checked_int(check_example_size),
    )
    p.add_argument("--opset", type=checked_int(check_opset), default=DEFAULT_OPSET,
                   help=f"ONNX opset, one the installed exporter writes (default: {DEFAULT_OPSET})")  # fmt: skip
    p.add_argument("--atol", type=float, default=1e-4, help="largest max-abs difference to PyTorch accepted")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch")
    p.add_argument(
        "--device",
        action=DeviceAction,
        default="cpu",
        help="device the model is loaded on and its PyTorch reference computed (the file is device-free)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.int8 != bool(args.calibration) or (args.int8 and args.format != "openvino"):
        raise UsageError("--int8 goes with --format openvino and --calibration DIR, and --calibration with --int8")
    folder = args.format == "openvino"
    suffix = None if folder else f"model.{SUFFIXES[args.format]}"
    check_output(args.output, [*checkpoint_files(args.model), args.calibration], folder=folder, suggest=suffix)
    model = resolve_model(args.model).to(args.device)
    if args.format == "openvino":
        from cvt.openvino_backend import export_openvino  # noqa: PLC0415 - only this format needs openvino

        path = export_openvino(model, args.output, calibration=args.calibration, check=not args.no_check)
        print(
            f"wrote {path} ({'int8' if args.int8 else 'float32'} OpenVINO IR, model {model.model_name or args.model})"
        )
        return 0
    result = export(
        model,
        args.output,
        args.format,
        input_size=args.input_size,
        opset=args.opset,
        check=not args.no_check,
        atol=args.atol,
    )
    print(f"wrote {result.path} ({args.format}, model {model.model_name or args.model})")
    for shape, diff in result.checks:
        print(f"  input {'x'.join(map(str, shape))}: max abs diff to PyTorch {diff:.3g}")
    if result.checks:
        print(f"max abs diff {result.max_abs_diff:.3g} <= {args.atol:g}")
    return 0
