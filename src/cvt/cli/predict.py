"""`cvt predict`: top-k labels and probabilities for image files."""

from __future__ import annotations

import argparse
import sys

from cvt.cli.options import (
    add_backend_option,
    add_batch_size_option,
    batch_memory_hint,
    emit_json,
    positive_int,
    print_stdout,
)
from cvt.cli.usage import DeviceAction, add_json_option
from cvt.factory import resolve_model
from cvt.predict import list_images, predict_images


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify images with a model; unreadable files are listed on stderr and the exit code is 1 if any",
    )
    p.add_argument("--model", required=True, help="checkpoint path (any format) or registered name[.tag]")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders (searched recursively)")
    p.add_argument("--topk", type=positive_int, default=5, help="labels per image (default 5)")
    add_json_option(p, "the predictions")
    add_batch_size_option(p, 32)
    p.add_argument("--device", action=DeviceAction, default="cpu", help="cpu or cuda")
    p.add_argument("--no-optimize", action="store_true", help="run the model as built, not optimize_for_inference's")
    add_backend_option(p)
    p.set_defaults(func=run)


def format_predictions(results: list[dict]) -> str:
    """One line per readable image: path, then label (probability) pairs, best first."""
    return "\n".join(
        f"{r['path']}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r["predictions"])
        for r in results
        if "predictions" in r
    )


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    with batch_memory_hint(args.batch_size):
        results = predict_images(
            model,
            list_images(args.images),
            topk=args.topk,
            batch_size=args.batch_size,
            device=args.device,
            optimize=not args.no_optimize,
            backend=args.backend,
        )
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"cvt predict: unreadable: {r['path']}: {r['error']}", file=sys.stderr)
    if failed:
        print(f"cvt predict: {len(failed)} of {len(results)} image(s) could not be read", file=sys.stderr)
    if not emit_json(results, args.json):
        lines = [format_predictions(results)] if len(failed) < len(results) else []
        lines += [f"JSON: {args.json}"] if args.json else []
        if lines:
            print_stdout("\n".join(lines))
    return 1 if failed else 0
