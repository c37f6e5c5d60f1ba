"""`cvt eval`: top-1/top-5/loss, per-class accuracy and a confusion matrix of a model on a dataset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvt.cli.options import add_backend_option, add_batch_size_option, batch_memory_hint, emit_json, print_stdout
from cvt.cli.usage import DeviceAction, add_json_option
from cvt.evaluate import evaluate_model, plot_confusion
from cvt.factory import resolve_model
from cvt.fileio import write_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on a dataset with its evaluation protocol")
    p.add_argument("--model", required=True, help="checkpoint path (any format) or registered name[.tag]")
    p.add_argument("--data", required=True, help="dataset: class folders, a folder with a val/ split, CSV or tar")
    p.add_argument("--split", default=None, help="split to evaluate (default: val/ when the folder has one)")
    add_json_option(p, "the results")
    p.add_argument("--output", default="runs/eval", help="folder for eval.json and confusion.png (default runs/eval)")
    add_batch_size_option(p, 64)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--device", action=DeviceAction, default="cpu", help="cpu or cuda")
    p.add_argument("--no-optimize", action="store_true", help="run the model as built, not optimize_for_inference's")
    add_backend_option(p)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.set_defaults(func=run)


def format_report(res: dict, model: str, data: str) -> str:
    """The results as a plain-text table."""
    lines = [
        f"model   {model}",
        f"data    {data} ({res['count']} images, {len(res['classes'])} classes"
        + (f"; {len(res['skipped'])} unreadable left out)" if res.get("skipped") else ")"),
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
    with batch_memory_hint(args.batch_size):
        res = evaluate_model(
            model,
            args.data,
            split=args.split,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            optimize=not args.no_optimize,
            backend=args.backend,
            progress=True,
        )
    res = {"model": str(args.model), "data": str(args.data), **res}
    out = Path(args.output)
    write_json(res, out / "eval.json")
    png = plot_confusion(res["confusion"], res["classes"], out / "confusion.png")
    if res["skipped"]:
        print(f"{len(res['skipped'])} unreadable image(s) left out of every figure:", file=sys.stderr)
        for item in res["skipped"]:
            print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
    if emit_json(res, args.json):
        return 0
    lines = [format_report(res, args.model, args.data)]
    if args.json:
        lines.append(f"\nJSON: {args.json}")
    lines.append(f"results: {out / 'eval.json'}\nconfusion matrix: {png}")
    print_stdout("\n".join(lines))
    return 0
