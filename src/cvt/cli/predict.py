"""`cvt predict`: top-k labels and probabilities for image files."""

from __future__ import annotations

import argparse
import json

from cvt.cli.usage import add_json_option
from cvt.factory import resolve_model
from cvt.fileio import write_json
from cvt.inference import BACKENDS
from cvt.predict import list_images, predict_images


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify images with a model")
    p.add_argument("--model", required=True, help="checkpoint path (any format) or registered name[.tag]")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (searched recursively)")
    p.add_argument("--topk", type=int, default=5, help="labels per image (default 5)")
    add_json_option(p, "the predictions")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-optimize", action="store_true", help="run the model as built, not optimize_for_inference's")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="what runs the optimized model: torch, onnxruntime, openvino (converted once, cached) or auto "
                        "(default: the fastest measured on this machine, README: Performance)")  # fmt: skip
    p.set_defaults(func=run)


def format_predictions(results: list[dict]) -> str:
    """One line per image: path, then label (probability) pairs, best first."""
    return "\n".join(
        f"{r['path']}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r["predictions"]) for r in results
    )


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise ValueError("--topk must be at least 1")
    model = resolve_model(args.model)
    results = predict_images(
        model,
        list_images(args.images),
        topk=args.topk,
        batch_size=args.batch_size,
        device=args.device,
        optimize=not args.no_optimize,
        backend=args.backend,
    )
    if args.json == "-":
        print(json.dumps(results, indent=2))
        return 0
    print(format_predictions(results))
    if args.json:
        write_json(results, args.json)
        print(f"JSON: {args.json}")
    return 0
