"""`cvt eval`: top-1/top-5/loss, per-class accuracy and a confusion matrix of a model on a dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cvt.cli.usage import add_json_option
from cvt.factory import resolve_model
from cvt.fileio import write_json
from cvt.inference import BACKENDS
from cvt.predict import evaluate_model, plot_confusion


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on a dataset with its evaluation protocol")
    p.add_argument("--model", required=True, help="checkpoint path (any format) or registered name[.tag]")
    p.add_argument("--data", required=True, help="dataset: class folders, a folder with a val/ split, CSV or tar")
    p.add_argument("--split", default=None, help="split to evaluate (default: val/ when the folder has one)")
    add_json_option(p, "the results")
    p.add_argument("--output", default="runs/eval", help="folder for eval.json and confusion.png (default runs/eval)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-optimize", action="store_true", help="run the model as built, not optimize_for_inference's")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="what runs the optimized model: torch, onnxruntime, openvino (converted once, cached) or auto "
                        "(default: the fastest measured on this machine, README: Performance)")  # fmt: skip
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.set_defaults(func=run)


def format_report(res: dict, model: str, data: str) -> str:
    """The results as a plain-text table."""
    lines = [
        f"model   {model}",
        f"data    {data} ({res['count']} images, {len(res['classes'])} classes)",
        f"loss    {res['loss']:.4f}",
        f"top-1   {res['top1']:.2f}",
        f"top-5   {res['top5']:.2f}",
        "",
    ]
    width = max(12, *(len(name) for name in res["per_class"]))
    lines.append(f"{'class':<{width}}  images  top-1")
    for name, row in res["per_class"].items():
        acc = "-" if row["top1"] is None else f"{row['top1']:.1f}"
        lines.append(f"{name:<{width}}  {row['count']:>6}  {acc:>5}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    kwargs = {"ema": True} if args.ema else {}
    model = resolve_model(args.model, **kwargs)
    res = evaluate_model(
        model,
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        optimize=not args.no_optimize,
        backend=args.backend,
    )
    res = {"model": str(args.model), "data": str(args.data), **res}
    out = Path(args.output)
    write_json(res, out / "eval.json")
    png = plot_confusion(res["confusion"], res["classes"], out / "confusion.png")
    if args.json == "-":
        json.dump(res, sys.stdout, indent=2)
        print()
        return 0
    print(format_report(res, args.model, args.data))
    if args.json:
        write_json(res, args.json)
        print(f"\nJSON: {args.json}")
    print(f"results: {out / 'eval.json'}\nconfusion matrix: {png}")
    return 0
