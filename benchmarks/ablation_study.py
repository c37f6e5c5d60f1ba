"""Small-scale accuracy study of the paper's ablations: each variant of a narrow CvT-13, same budget, several seeds.

    .venv/bin/python benchmarks/ablation_study.py --out runs/ablation_study     # ~25-40 min on 2 busy CPU cores

Every variant in `cvt.ablations` (the rows of the paper's Tables 5-8) is applied to a narrow, shallow CvT-13
(widths 32/64/128, depths 1/1/4) and trained from scratch with `cvt.train.train` on the generated "shapes" dataset
(`cvt.data.make_dataset`, 64x64 images), with the same recipe, epochs and data for every variant and seed. The
script writes, under --out:

    data/                       the generated dataset (made once, reused)
    runs/<variant>/seed<k>/     each training run (config.json, metrics.csv, summary.json, ...)
    results.json                one record per run: final/best val top-1, params, GMACs, wall time
    ablations_table.md          mean, spread and cost per variant, beside the paper's ImageNet figures
    ablations.png               the same as a plot

Finished runs (summary.json present) are not trained again, so a killed study continues where it stopped.
The result is what it is: a tiny model, a few minutes of CPU and a synthetic 10-class task are far from 300
ImageNet epochs, so differences of a point or two are within the seed spread; see docs/ablations.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cvt.ablations import BASELINE, ablation_config, get_ablation, list_ablations
from cvt.config import CvTConfig
from cvt.data import make_dataset
from cvt.fileio import atomic_write
from cvt.flops import model_cost
from cvt.train import TrainConfig, train

logger = logging.getLogger("ablation_study")

DEFAULT_VARIANTS = (
    BASELINE,
    "pos_embed",
    "patch_embed",
    "kv_stride_1",
    "linear_proj",
)


def study_base(dims: list[int], depths: list[int], heads: list[int]) -> CvTConfig:
    """The narrow CvT-13 every variant changes: CvT-13's layout (embedding, projection, class token) at other sizes.

    Stochastic depth is off: it is a regulariser for 300 epochs, not for a few minutes.
    """
    return dataclasses.replace(
        CvTConfig(), dims=tuple(dims), depths=tuple(depths), heads=tuple(heads), drop_path_rate=(0.0, 0.0, 0.0)
    )


def model_kwargs(cfg: CvTConfig) -> dict[str, Any]:
    """The `CvTConfig` fields of `cfg` that differ from CvT-13's, as `TrainConfig.model_kwargs`."""
    base = CvTConfig().to_dict()
    return {k: v for k, v in cfg.to_dict().items() if v != base[k] and k != "num_classes"}


def train_config(args: argparse.Namespace, variant: str, seed: int, data: Path) -> TrainConfig:
    """The training run of one (variant, seed): a light recipe sized for two minutes of CPU.

    The paper's recipe (RandAugment, Mixup/CutMix, random erasing, label smoothing, 5 warm-up epochs, cosine to 1e-5)
    is made for 300 epochs; in 400 steps it leaves every variant near chance, so this uses flips only, no label
    smoothing, half an epoch of warm-up and a cosine that ends at a fifth of the peak. The same for every variant.
    """
    size = args.image_size
    cfg = ablation_config(variant, study_base(args.dims, args.depths, args.heads), input_size=(size, size))
    return TrainConfig(
        model="cvt_13",
        model_kwargs=model_kwargs(cfg),
        data=str(data),
        input_size=size,
        crop_mode="squash",  # the images are already `size` pixels: evaluate them whole
        crop_pct=1.0,
        scale=(1.0, 1.0),  # no crop: only flips; augmentation slows learning more than it helps at this budget
        ratio=(1.0, 1.0),
        auto_augment=None,
        color_jitter=0.0,
        re_prob=0.0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        label_smoothing=0.0,
        batch_size=args.batch_size,
        num_workers=args.workers,
        lr=args.lr,
        weight_decay=0.05,
        epochs=args.epochs,
        warmup_epochs=0.5,
        sched_unit="step",  # with a few epochs, a per-epoch schedule would spend the whole first one at warmup_lr
        min_lr=args.lr / 5,  # a short run: the cosine ends at a fifth of the peak, not near zero
        amp="none",
        device=args.device,
        seed=seed,
        output=str(args.out / "runs" / variant / f"seed{seed}"),
        progress=False,
    )


def run_one(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run, or read its summary if it finished before; resume it if it was interrupted."""
    run_dir = Path(cfg.output)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("completed"):
            logger.info("%s: done before, final top-1 %.2f", run_dir, summary["final_top1"])
            return summary
    if (run_dir / "last.pt").is_file():
        cfg = dataclasses.replace(cfg, resume="auto")
    start = time.perf_counter()
    summary = train(cfg)
    logger.info("%s: final top-1 %.2f in %.0f s", run_dir, summary["final_top1"], time.perf_counter() - start)
    return summary


def summarise(results: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """One row per variant: mean/std/min/max of final val top-1 over seeds, best top-1 mean, cost, wall time."""
    rows = []
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant]
        final = [r["final_top1"] for r in runs]
        rows.append(
            {
                "variant": variant,
                "seeds": len(runs),
                "final_top1": final,
                "mean": statistics.fmean(final),
                "std": statistics.stdev(final) if len(final) > 1 else 0.0,
                "min": min(final),
                "max": max(final),
                "best_mean": statistics.fmean(r["best_top1"] for r in runs),
                "params": runs[0]["params"],
                "gmacs": runs[0]["gmacs"],
                "wall_s": statistics.fmean(r["wall_time_s"] for r in runs),
            }
        )
    return rows


def _paper(variant: str) -> str:
    rows = get_ablation(variant).paper
    return ", ".join(f"{r.table[6:]}{r.row}: {r.top1}" for r in rows) if rows else "-"


def markdown_table(rows: list[dict[str, Any]], image_size: int) -> str:
    """The study's result as a markdown table, with the paper's ImageNet top-1 beside it."""
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    head = (
        "| variant | val top-1 (mean ± std) | min-max | Δ vs cvt_13 | best-epoch top-1 | params | "
        f"MMACs @{image_size} | wall time / run | paper (table+row: ImageNet top-1) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        delta = "-" if base is None or r is base else f"{r['mean'] - base['mean']:+.1f}"
        lines.append(
            f"| {r['variant']} | {r['mean']:.1f} ± {r['std']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {delta} "
            f"| {r['best_mean']:.1f} | {r['params']:,} | {r['gmacs'] * 1e3:.1f} | {r['wall_s']:.0f} s "
            f"| {_paper(r['variant'])} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Final val top-1 per variant (mean, std, each seed) and against GMACs, as a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(rows))
    for x, r in zip(xs, rows, strict=True):
        color = "tab:blue" if r["variant"] == BASELINE else "tab:gray"
        ax1.errorbar(x, r["mean"], yerr=r["std"], fmt="s", color=color, markersize=7, capsize=5, zorder=2)
        ax1.scatter([x] * len(r["final_top1"]), r["final_top1"], color="black", s=10, zorder=3)
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    if base is not None:
        ax1.axhline(base["mean"], color="tab:blue", lw=0.8, ls="--")
    ax1.margins(x=0.08)
    ax1.set_xticks(list(xs), [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("final val top-1 (%)")
    ax1.set_title("per variant: mean ± std, dots = seeds", fontsize=9)
    for r in rows:
        ax2.errorbar(r["gmacs"], r["mean"], yerr=r["std"], fmt="o", capsize=3)
        ax2.annotate(r["variant"], (r["gmacs"], r["mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax2.set_xlabel("GMACs per image")
    ax2.set_ylabel("final val top-1 (%)")
    ax2.set_title("accuracy vs cost", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/ablation_study"), help="output directory")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=list_ablations(),
        metavar="NAME",
        help=f"ablations to train (default: {' '.join(DEFAULT_VARIANTS)}; all: {' '.join(list_ablations())})",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (model init, data order)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per run")
    p.add_argument("--num-classes", type=int, default=4, help="classes of the generated dataset")
    p.add_argument("--train-per-class", type=int, default=400, help="training images per class")
    p.add_argument("--val-per-class", type=int, default=100, help="validation images per class")
    p.add_argument("--image-size", type=int, default=48, help="image side (the model trains at this size)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated dataset (the same for all runs)")
    p.add_argument("--dims", type=int, nargs=3, default=[32, 64, 128], help="stage widths")
    p.add_argument("--depths", type=int, nargs=3, default=[1, 1, 2], help="blocks per stage")
    p.add_argument("--heads", type=int, nargs=3, default=[1, 2, 4], help="attention heads per stage")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared machine more threads than free cores is far slower)",
    )
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    data = make_dataset(
        args.out / "data",
        num_classes=args.num_classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        image_size=args.image_size,
        seed=args.data_seed,
    )
    size = (args.image_size, args.image_size)
    results = []
    for variant in args.variants:
        arch = ablation_config(
            variant, study_base(args.dims, args.depths, args.heads), input_size=size, num_classes=args.num_classes
        )
        params, macs = model_cost(arch, size)
        for seed in args.seeds:
            summary = run_one(train_config(args, variant, seed, data))
            results.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "final_top1": summary["final_top1"],
                    "best_top1": summary["best_top1"],
                    "wall_time_s": summary["wall_time_s"],
                    "params": params,
                    "gmacs": macs / 1e9,
                }
            )
            with atomic_write(args.out / "results.json", "w") as f:
                json.dump({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results}, f, indent=1)
    rows = summarise(results, args.variants)
    table = markdown_table(rows, args.image_size)
    budget = (
        f"{args.num_classes} classes x {args.train_per_class} train / {args.val_per_class} val images at "
        f"{args.image_size}px, {args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}; "
        f"CvT-13 layout at widths {'/'.join(map(str, args.dims))}, depths {'/'.join(map(str, args.depths))}"
    )
    with atomic_write(args.out / "ablations_table.md", "w") as f:
        f.write(f"{table}\n\n{budget}\n")
    plot(rows, args.out / "ablations.png", f"CvT ablations, small scale: {budget}")
    print(table)
    print(f"\n{budget}\nwrote {args.out / 'ablations_table.md'} and {args.out / 'ablations.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
