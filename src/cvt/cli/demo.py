"""`cvt demo`: the main job end to end on a generated dataset.

Generate the shapes dataset (data/demo, once), train the small CvT of the shipped `demo` config, evaluate its best
checkpoint with the evaluation protocol it recorded, classify a few validation images, and say where the run
directory and its plots are.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from cvt.data import make_dataset
from cvt.evaluate import evaluate_model, plot_confusion
from cvt.factory import load_model
from cvt.fileio import write_json
from cvt.predict import predict_images
from cvt.train import load_config, load_config_module, train

TARGET_TOP1 = 90.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the main job: generate data, train a small CvT, evaluate, predict")
    p.add_argument("--config", default="demo", help="config file or the name of a shipped one (default: demo)")
    p.add_argument("--data", default=None, help="dataset folder (default: the config's, data/demo); made if absent")
    p.add_argument("--output", default=None, help="run directory (default: runs/demo-<date>-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set epochs=5")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    module = load_config_module(args.config)
    cfg = load_config(args.config, args.overrides)
    data = Path(args.data or cfg.data)
    output = Path(args.output or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = dataclasses.replace(cfg, data=str(data), output=str(output))

    dataset_args = module.get_dataset() if hasattr(module, "get_dataset") else {}
    print(f"[1/4] dataset: {data} ({dataset_args or 'existing'})")
    if dataset_args:
        make_dataset(data, **dataset_args)  # returns at once when data/ already holds this dataset

    print(f"[2/4] training {cfg.model} {cfg.model_kwargs} for {cfg.epochs} epochs -> {output}")
    summary = train(cfg)

    print("[3/4] evaluating best.pt with its own evaluation protocol")
    model = load_model(output / "best.pt")
    res = evaluate_model(model, data, split=cfg.val_split, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size)
    write_json(res, output / "eval.json")
    confusion = plot_confusion(res["confusion"], res["classes"], output / "confusion.png")

    print("[4/4] predicting a few validation images")
    val = data / (cfg.val_split or "")
    images = [sorted(folder.iterdir())[0] for folder in sorted(val.iterdir())[:4] if folder.is_dir()]
    for item in predict_images(model, images, topk=3):
        guesses = ", ".join(f"{p['label']} {p['probability']:.2f}" for p in item["predictions"])
        print(f"  {Path(item['path']).parent.name}/{Path(item['path']).name}: {guesses}")

    total = time.perf_counter() - started
    reached = res["top1"] >= TARGET_TOP1
    print(f"\nval top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}  "
          f"({res['count']} images; best epoch {summary['best_epoch']} of {cfg.epochs})")  # fmt: skip
    print(f"training {summary['wall_time_s'] / 60:.1f} min, whole demo {total / 60:.1f} min")
    print(f"target >= {TARGET_TOP1:.0f}% top-1: {'reached' if reached else 'NOT reached'}")
    print(f"\nrun directory: {output}")
    for name in ("curves.png", "metrics.csv", "summary.json", "config.json", "best.pt", "last.pt", "eval.json"):
        print(f"  {output / name}")
    print(f"  {confusion}")
    print(f"\nagain: cvt eval --model {output / 'best.pt'} --data {data}")
    print(f"       cvt predict --model {output / 'best.pt'} {images[0]}")
    return 0 if reached else 1
