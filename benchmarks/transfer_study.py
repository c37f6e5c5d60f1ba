"""Transfer at small scale: pre-train the demo's CvT on generated shapes, fine-tune it on real handwritten digits,
and compare with training from scratch for the same number of steps, over several seeds and two training-set sizes.

    .venv/bin/python benchmarks/transfer_study.py --out runs/transfer_study                      # the defaults
    .venv/bin/python benchmarks/transfer_study.py --out runs/transfer_study --steps 250         # docs/transfer.md

The protocol, every step through the commands a user runs (each run's exact `cvt train` command is recorded):

1. Pre-train: `cvt train --config demo --data <shapes> --set input_size=32 --set epochs=E`: the demo's narrow
   CvT-13 (widths 32/64/128, depths 1/1/2, 0.6M parameters) and recipe on the generated shapes
   (`cvt.data.make_dataset`: 10 classes x 600 train / 50 val, drawn at 32 px to match the digits, seed 0). One
   pre-training run (seed 0): the seeds below vary the downstream runs, not the pre-training.
2. Downstream: scikit-learn's digits (`cvt.data.make_digits`, 32 px, the fixed 1,442 / 355 split) at each
   --fractions of the training split. A fraction below 1 is a fixed stratified subset: within each class, in
   `load_digits` order, the images at the positions i where floor((i + 1) f) > floor(i f) (for 0.1 the 10th, 20th,
   ...), written as `train.csv` / `val.csv` lists beside the tree with `subset.json`; validation is always the whole
   val split.
3. Arms, for every fraction and seed, all with the same optimiser steps, batch, augmentation (RandomResizedCrop
   0.5-1, no flips: a mirrored digit is another shape), label smoothing 0.1, warm-up (5%) and per-step cosine, and
   the validation images evaluated in one batch after every epoch:

       finetune        `cvt train --model <pre-trained best.pt> --data <digits>`: the fine-tuning defaults
                       (`cvt.train.finetune_config`: head re-initialised, for a start that is not released weights
                       AdamW at 4e-3 per 256 images, weight decay 0.05 (SGD at 0.005 per 256 before; see
                       docs/transfer.md), BiT's length rule: 500 steps); only flips (off), the evaluation batch
                       and --steps are set
       finetune_adamw  the same start with the scratch arm's optimiser (AdamW, --scratch-lr, weight decay 0.05): the
                       initial weights are the only difference from `scratch` (checked: the script fails otherwise)
       finetune_ld     finetune_adamw with layer-wise learning-rate decay (`--set layer_decay=0.75`: the head at
                       the full rate, each layer below at 0.75 times the one above)
       scratch         `cvt train --config demo --data <digits> --set ...`: the demo's model and AdamW recipe from a
                       random initialisation, with the fine-tuning runs' batch, epochs, warm-up and augmentation

   scikit-learn's SVC and logistic regression, fit on the raw 8x8 pixels of the same training images, are the
   peers' rows.

The script writes, under --out:

    data/shapes/, data/digits/, data/digits_<pct>pct/    the datasets (made once, reused)
    pretrain/                                          the pre-training run (best.pt is what is fine-tuned)
    runs/<pct>pct/<arm>/seed<k>/                       each downstream run (config.json, metrics.csv, summary.json)
    results.json       the command, the datasets' manifests, each run's `cvt train` command, final and best val
                       top-1, steps, wall time and validation curve, the peers, how each arm's config differs
    transfer_table.md  mean, spread and wall time per fraction and arm, the peers, the commands
    transfer.png       final top-1 per arm and the validation curves

Finished runs are read back, not trained again, so a killed study continues where it stopped; a run directory trained
with other settings is an error. What it measures is small: a 0.6M-parameter model pre-trained for minutes on a
synthetic task, against the paper's ImageNet-22k pre-training of CvT-13 at 384 px; see docs/transfer.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import studies  # this directory is on sys.path when run as a script
import torch
from studies import dataset_label, finished_summary, peers, run_one

from cvt.allocator import keep_freed_memory
from cvt.cli import build_parser
from cvt.cli.train import build_config
from cvt.data import make_dataset, make_digits
from cvt.data.digits import digits_split, load_digits_arrays
from cvt.fileio import atomic_write, write_json
from cvt.train import TrainConfig
from cvt.train.finetune import default_batch_size

logger = logging.getLogger("transfer_study")

ARMS = ("finetune", "finetune_adamw", "finetune_ld", "scratch")
BASELINE = "scratch"
EVAL_BATCH = 512  # the digits' 355 validation images in one batch
NO_FLIP = "hflip=0.0"  # every arm: a mirrored digit is another shape
# what may differ between finetune_adamw and scratch: the start, and fields a set `lr` makes unused
SAME_BUT_INIT = {"init", "model_kwargs", "lr_per_256", "output"}


def subset_indices(labels: np.ndarray, fraction: float) -> np.ndarray:
    """The fixed stratified subset of the digits' training split: `load_digits` indices, ascending.

    Within each class, in `load_digits` order, the training images at positions i (0-based) with
    floor((i + 1) * fraction) > floor(i * fraction): evenly spread, floor(n * fraction) of a class of n.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"a fraction of the training split must be in (0, 1], got {fraction}")
    train_idx, _ = digits_split(labels)
    keep = []
    for label in np.unique(labels):
        members = train_idx[labels[train_idx] == label]
        keep.extend(m for i, m in enumerate(members) if math.floor((i + 1) * fraction) > math.floor(i * fraction))
    return np.sort(np.asarray(keep, dtype=np.int64))


def regime_name(fraction: float) -> str:
    return f"{fraction * 100:g}pct"


def write_subset(digits: Path, root: Path, fraction: float) -> dict[str, Any]:
    """Write `root/train.csv` (the subset of `digits`' training split) and `root/val.csv` (all of its val split).

    The lists point into the `digits` tree by relative paths; `root/subset.json` records the rule and the counts.
    """
    _, labels = load_digits_arrays()
    chosen = subset_indices(labels, fraction)
    _, val_idx = digits_split(labels)
    relative = Path("..") / digits.name
    for split, indices in (("train", chosen), ("val", val_idx)):
        with atomic_write(root / f"{split}.csv", "w") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", "label"])
            writer.writerows((f"{relative}/{split}/{labels[i]}/{i:05d}.png", labels[i]) for i in indices)
    manifest = {
        "source": str(relative),
        "source_manifest": json.loads((digits / "dataset.json").read_text("utf-8")),
        "fraction": fraction,
        "rule": "within each class in load_digits order, positions i with floor((i+1)f) > floor(i f); all of val",
        "images": {"train": len(chosen), "val": len(val_idx)},
        "train_per_class": {str(c): int((labels[chosen] == c).sum()) for c in np.unique(labels)},
    }
    write_json(manifest, root / "subset.json")
    return manifest


def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """Make (or find) the shapes, the digits and the digits' subsets under `args.out / "data"`."""
    root = args.out / "data"
    shapes = make_dataset(
        root / "shapes",
        num_classes=args.pretrain_classes,
        train_per_class=args.pretrain_per_class,
        val_per_class=args.pretrain_val_per_class,
        image_size=args.image_size,
        seed=0,
    )
    digits = make_digits(root / "digits", image_size=args.image_size)
    data: dict[str, Any] = {
        "shapes": {"path": str(shapes), "manifest": json.loads((shapes / "dataset.json").read_text("utf-8"))},
        "digits": {"path": str(digits), "manifest": json.loads((digits / "dataset.json").read_text("utf-8"))},
        "regimes": {},
    }
    for fraction in args.fractions:
        name = regime_name(fraction)
        if fraction == 1:
            images = data["digits"]["manifest"]["images"]
            data["regimes"][name] = {"path": str(digits), "fraction": 1.0, "images": images}
        else:
            path = root / f"digits_{name}"
            data["regimes"][name] = {"path": str(path), **write_subset(digits, path, fraction)}
    return data


def cli_config(words: list[str]) -> TrainConfig:
    """The TrainConfig that `cvt train WORDS` runs: the command line's own parser and config builder."""
    return build_config(build_parser().parse_args(["train", *words]))


def common_words(args: argparse.Namespace, seed: int) -> list[str]:
    """The `--set`s every downstream run shares: no flips, the seed, the validation set in one batch (a small
    training set is evaluated after every few steps, and small evaluation batches would cost more than training),
    this machine's threads, no progress bars."""
    items = [NO_FLIP, f"seed={seed}", f"eval_batch_size={EVAL_BATCH}", f"num_threads={args.threads}",
             f"num_workers={args.workers}", f"device={args.device}", "progress=False"]  # fmt: skip
    return [w for item in items for w in ("--set", item)]


def arm_words(args: argparse.Namespace, arm: str, seed: int, data: str, output: Path, checkpoint: Path,
              num_images: int) -> list[str]:  # fmt: skip
    """The `cvt train` arguments of one downstream run."""
    common = ["--data", data, "--output", str(output), *common_words(args, seed)]
    budget = []
    if args.steps is not None:  # fewer optimiser steps than BiT's rule: whole epochs, as finetune_config rounds
        epochs = max(1, round(args.steps / max(1, num_images // default_batch_size(num_images))))
        budget = ["--set", f"epochs={epochs}"]
    finetune = ["--model", str(checkpoint), *common, *budget]
    if arm == "finetune":
        return finetune
    adamw = ["optimizer=adamw", f"lr={args.scratch_lr}", "weight_decay=0.05"]
    if arm == "finetune_adamw":
        return [*finetune, *(w for item in adamw for w in ("--set", item))]
    if arm == "finetune_ld":
        return [*finetune, *(w for item in [*adamw, f"layer_decay={args.layer_decay}"] for w in ("--set", item))]
    if arm == "scratch":  # the demo's recipe, with the fine-tuning runs' budget and augmentation
        ref = cli_config(finetune)
        same = [f"input_size={ref.input_size}", f"batch_size={ref.batch_size}", f"epochs={ref.epochs}",
                f"warmup_epochs={ref.warmup_epochs}", f"scale={ref.scale}", f"color_jitter={ref.color_jitter}",
                f"amp={ref.amp}", *adamw]  # fmt: skip
        return ["--config", "demo", *common, *(w for item in same for w in ("--set", item))]
    raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def config_diff(a: TrainConfig, b: TrainConfig) -> dict[str, list[Any]]:
    """The fields where two configs differ: {field: [a's value, b's value]}."""
    da, db = a.to_dict(), b.to_dict()
    return {k: [da[k], db[k]] for k in da if da[k] != db[k]}


def check_controls(configs: dict[str, TrainConfig]) -> dict[str, dict[str, list[Any]]]:
    """How each arm's config differs from the scratch arm's; fails if finetune_adamw differs in more than its start.

    Raises:
        SystemExit: finetune_adamw and scratch differ in a field other than `SAME_BUT_INIT` (e.g. a default changed
            in `finetune_config` or the demo config): the comparison would not isolate the pre-training.
    """
    base = configs.get(BASELINE)
    if base is None:
        return {}
    diffs = {arm: config_diff(cfg, base) for arm, cfg in configs.items() if arm != BASELINE}
    extra = sorted(set(diffs.get("finetune_adamw", {})) - SAME_BUT_INIT)
    if extra:
        shown = {k: diffs["finetune_adamw"][k] for k in extra}
        raise SystemExit(f"finetune_adamw and scratch differ in more than their start: {shown}")
    return diffs


def read_curve(run_dir: Path) -> list[list[float]]:
    """[optimiser step, val top-1] per epoch, from the run's metrics.csv."""
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        return [[int(row["global_step"]), float(row["val_top1"])] for row in csv.DictReader(f)]


def summarise(runs: list[dict[str, Any]], regimes: list[str], arms: list[str]) -> list[dict[str, Any]]:
    """One row per (regime, arm): mean/std/min/max of final val top-1 over seeds, best-epoch mean, wall time."""
    rows = []
    for regime in regimes:
        for arm in arms:
            group = [r for r in runs if r["regime"] == regime and r["arm"] == arm]
            if not group:
                continue
            final = [r["final_top1"] for r in group]
            rows.append({
                "regime": regime, "arm": arm, "seeds": len(group), "final_top1": final,
                "mean": statistics.fmean(final), "std": statistics.stdev(final) if len(final) > 1 else 0.0,
                "min": min(final), "max": max(final), "best_mean": statistics.fmean(r["best_top1"] for r in group),
                "steps": group[0]["steps"], "batch": group[0]["batch"], "train_images": group[0]["train_images"],
                "wall_s": statistics.fmean(r["wall_time_s"] for r in group),
            })  # fmt: skip
    return rows


def markdown_table(rows: list[dict[str, Any]], peer_rows: dict[str, list[dict[str, Any]]]) -> str:
    """The result per regime and arm, the difference to the scratch arm of the same regime, the peers below each."""
    head = ("| training images | arm | steps x batch | val top-1 (mean ± std) | min-max | Δ vs scratch "
            "| best-epoch top-1 | wall time / run |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        group = [r for r in rows if r["regime"] == regime]
        base = next((r for r in group if r["arm"] == BASELINE), None)
        for r in group:
            delta = "-" if base is None or r is base else f"{r['mean'] - base['mean']:+.1f}"
            lines.append(
                f"| {r['train_images']} ({regime}) | {r['arm']} | {r['steps']} x {r['batch']} "
                f"| {r['mean']:.1f} ± {r['std']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {delta} "
                f"| {r['best_mean']:.1f} | {r['wall_s']:.0f} s |"
            )
        for p in peer_rows.get(regime, []):
            delta = "-" if base is None else f"{p['val_top1'] - base['mean']:+.1f}"
            lines.append(
                f"| {group[0]['train_images']} ({regime}) | peer: {p['name']}, raw 8x8 pixels | - "
                f"| {p['val_top1']:.1f} (deterministic) | - | {delta} | - | {p['fit_s']:.1f} s |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """Final val top-1 per regime and arm (mean ± std, dots = seeds), and the mean validation curve per arm."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    colors = dict(zip(arms, ("tab:blue", "tab:green", "tab:gray", "tab:purple", "tab:orange"), strict=False))
    fig, axes = plt.subplots(1, 1 + len(regimes), figsize=(4.5 * (1 + len(regimes)), 4.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(arms))
    for i, regime in enumerate(regimes):
        for j, arm in enumerate(arms):
            r = next((r for r in rows if r["regime"] == regime and r["arm"] == arm), None)
            if r is None:
                continue
            x = i + (j - (len(arms) - 1) / 2) * width
            ax.errorbar(x, r["mean"], yerr=r["std"], fmt="s", color=colors[arm], capsize=4,
                        label=arm if i == 0 else None)  # fmt: skip
            ax.scatter([x] * len(r["final_top1"]), r["final_top1"], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(regimes)), [f"{regime}\n({next(r['train_images'] for r in rows if r['regime'] == regime)}"
                                        " images)" for regime in regimes])  # fmt: skip
    ax.set_ylabel("final val top-1 (%)")
    ax.set_title("final top-1: mean ± std, dots = seeds", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    for ax, regime in zip(axes[0][1:], regimes, strict=True):
        for arm in arms:
            curves = [r["curve"] for r in runs if r["regime"] == regime and r["arm"] == arm]
            if not curves:
                continue
            steps = [s for s, _ in curves[0]]
            tops = np.array([[t for _, t in c] for c in curves])  # (seeds, epochs)
            ax.plot(steps, tops.mean(0), ".-", color=colors[arm], label=arm, markersize=3)
            ax.fill_between(steps, tops.min(0), tops.max(0), color=colors[arm], alpha=0.15, lw=0)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title(f"{regime}: validation curve (mean, band = min-max over seeds)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    studies.save_figure(fig, path, title)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/transfer_study"), help="output directory")
    p.add_argument("--arms", nargs="+", default=["all"], choices=["all", *ARMS], metavar="ARM",
                   help=f"downstream arms (default: all, i.e. {' '.join(ARMS)})")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="downstream seeds (head, data order)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0],
                   help="fractions of the digits' training split to train on (a fixed stratified subset)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None,
                   help="optimiser steps of each downstream run, rounded to whole epochs (default: the fine-tuning "
                   "defaults' BiT rule, 500)")  # fmt: skip
    p.add_argument("--layer-decay", type=float, default=0.75,
                   help="finetune_ld: each layer's rate is this times the one above it (BEiT's 0.75)")  # fmt: skip
    p.add_argument("--scratch-lr", type=float, default=1e-3, help="AdamW peak learning rate (the demo's)")
    p.add_argument("--pretrain-epochs", type=int, default=12, help="pre-training epochs on the shapes")
    p.add_argument("--pretrain-classes", type=int, default=10, help="classes of the generated shapes")
    p.add_argument("--pretrain-per-class", type=int, default=600, help="training shapes per class")
    p.add_argument("--pretrain-val-per-class", type=int, default=50, help="validation shapes per class")
    p.add_argument("--image-size", type=int, default=32, help="side of both datasets' images, and the model's input")
    studies.add_compute_options(p)
    args = p.parse_args(argv)  # fmt: skip
    args.arms = list(ARMS) if "all" in args.arms else list(dict.fromkeys(args.arms))
    args.fractions = sorted(dict.fromkeys(args.fractions))
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    return args


def pretrain(args: argparse.Namespace, shapes: str) -> tuple[Path, list[str], dict[str, Any]]:
    """Pre-train (or find) the demo's model on the shapes; return its best.pt, its `cvt train` words and summary."""
    output = args.out / "pretrain"
    items = [f"input_size={args.image_size}", f"epochs={args.pretrain_epochs}", f"num_threads={args.threads}",
             f"num_workers={args.workers}", f"device={args.device}", "progress=False"]  # fmt: skip
    words = ["--config", "demo", "--data", shapes, "--output", str(output), *(w for i in items for w in ("--set", i))]
    summary = run_one(cli_config(words))
    return output / "best.pt", words, summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the cvt commands do: freed activations stay mapped for the next step
    command = studies.command_line("benchmarks/transfer_study.py", argv)
    data = prepare_data(args)
    checkpoint, pre_words, pre_summary = pretrain(args, data["shapes"]["path"])
    _, labels = load_digits_arrays()
    record: dict[str, Any] = {
        "command": command,
        "datasets": data,
        "pretrain_dataset": dataset_label(data["shapes"]["manifest"]),
        "downstream_dataset": dataset_label(data["digits"]["manifest"]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "pretrain": {"command": "cvt train " + shlex.join(pre_words), "summary": pre_summary},
        "peers": {},
        "differences_from_scratch": {},
        "runs": [],
    }
    trained = 0
    for fraction in args.fractions:
        regime = regime_name(fraction)
        info = data["regimes"][regime]
        subset = None if fraction == 1 else subset_indices(labels, fraction)
        record["peers"][regime] = peers(subset)
        num_images = info["images"]["train"]
        for seed in args.seeds:
            words = {arm: arm_words(args, arm, seed, info["path"], args.out / "runs" / regime / arm / f"seed{seed}",
                                    checkpoint, num_images) for arm in args.arms}  # fmt: skip
            configs = {arm: cli_config(w) for arm, w in words.items()}
            record["differences_from_scratch"][regime] = check_controls(configs)
            for arm, cfg in configs.items():
                trained += finished_summary(Path(cfg.output)) is None
                summary = run_one(cfg)
                record["runs"].append({
                    "regime": regime, "arm": arm, "seed": seed, "command": "cvt train " + shlex.join(words[arm]),
                    "train_images": num_images, "batch": cfg.batch_size, "epochs": cfg.epochs,
                    "steps": summary["global_step"], "final_top1": summary["final_top1"],
                    "best_top1": summary["best_top1"], "wall_time_s": summary["wall_time_s"],
                    "curve": read_curve(Path(cfg.output)),
                })  # fmt: skip
                record["train_wall_s"] = pre_summary["wall_time_s"] + sum(r["wall_time_s"] for r in record["runs"])
                write_json(record, args.out / "results.json")
    rows = summarise(record["runs"], [regime_name(f) for f in args.fractions], args.arms)
    table = markdown_table(rows, record["peers"])
    wall = (
        f"training wall time {record['train_wall_s'] / 60:.1f} min: pre-training {pre_summary['wall_time_s'] / 60:.1f} "
        f"min, {len(record['runs'])} downstream runs ({args.threads} thread(s)); this invocation "
        f"{(time.perf_counter() - started) / 60:.1f} min, {trained} downstream run(s) trained, "
        f"{len(record['runs']) - trained} read back"
    )
    pre = (
        f"pre-training: {record['pretrain_dataset']}, {pre_summary['epochs']} epochs, final val top-1 "
        f"{pre_summary['final_top1']:.1f} (best {pre_summary['best_top1']:.1f}); `{record['pretrain']['command']}`"
    )
    examples = {(r["regime"], r["arm"]): r["command"] for r in record["runs"] if r["seed"] == args.seeds[0]}
    with atomic_write(args.out / "transfer_table.md", "w") as f:
        f.write(f"{table}\n\ndownstream: {record['downstream_dataset']}\n\n{pre}\n\n{wall}\n\n")
        f.write(f"command: `{command}`\n\nruns (seed {args.seeds[0]}; the others differ in seed= and the output):\n\n")
        f.writelines(f"- {regime} {arm}: `{cmd}`\n" for (regime, arm), cmd in examples.items())
        for regime, diffs in record["differences_from_scratch"].items():
            for arm, diff in diffs.items():
                shown = ", ".join(f"{k}: {a!r} (scratch {b!r})" for k, (a, b) in diff.items() if k != "output")
                f.write(f"\n{regime} {arm} differs from scratch in: {shown}\n")
    title = f"CvT transfer, small scale: shapes -> digits\n{pre.split('; `')[0]}"
    plot(rows, record["runs"], args.out / "transfer.png", title)
    print(table)
    print(f"\ndownstream: {record['downstream_dataset']}\n{pre}\n{wall}\ncommand: {command}")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'transfer_table.md'} and {args.out / 'transfer.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
