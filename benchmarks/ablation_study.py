"""Small-scale accuracy study of the paper's ablations: each variant of a narrow CvT-13, same budget, several seeds.

    .venv/bin/python benchmarks/ablation_study.py --out runs/ablation_study/shapes                    # 33 runs
    .venv/bin/python benchmarks/ablation_study.py --dataset digits --out runs/ablation_study/digits   # 33 runs

Every variant in `cvt.ablations` (the rows of the paper's Tables 5-8; all eleven by default, `--variants` picks some)
is applied to a narrow, shallow CvT-13 (widths 32/64/128, depths 1/1/2) and trained from scratch with
`cvt.train.train`, with the same recipe, epochs and data for every variant and seed, on one of two datasets:

    shapes   the generated dataset (`cvt.data.make_dataset`, version `cvt.data.synthetic.VERSION`): 4 classes,
             400 train / 100 val images per class, 48x48
    digits   scikit-learn's 1,797 real 8x8 handwritten digits (`cvt.data.make_digits`): 10 classes, a fixed
             stratified 80/20 split (1,442 / 355), upscaled bilinearly to 32x32; scikit-learn's SVC and logistic
             regression, fit on the raw 8x8 pixels of the same split, are the peers' row

The script writes, under --out:

    data/                       the dataset (made once, reused)
    runs/<variant>/seed<k>/     each training run (config.json, metrics.csv, summary.json, ...)
    results.json                the command, the dataset's manifest (with its version), one record per run (final and
                                best val top-1, params, GMACs, wall time), the peers' accuracy
    ablations_table.md          mean, spread and cost per variant beside the paper's ImageNet figures, the command
    ablations.png               the same as a plot

Finished runs (summary.json present) are not trained again, so a killed study continues where it stopped; a run
directory trained with other settings is an error, not silently reused. The result is what it is: a tiny model, a
few minutes of CPU and a small 4- or 10-class task are far from 300 ImageNet epochs, so differences of a point or two
are within the seed spread; see docs/ablations.md.
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

import studies  # this directory is on sys.path when run as a script
import torch
from studies import dataset_label, finished_summary, peers, run_one

from cvt.ablations import BASELINE, ablation_config, get_ablation, list_ablations
from cvt.config import CvTConfig
from cvt.data import make_dataset, make_digits
from cvt.fileio import atomic_write, write_json
from cvt.flops import model_cost
from cvt.train import TrainConfig

logger = logging.getLogger("ablation_study")

DATASETS = ("shapes", "digits")
DEFAULT_IMAGE_SIZE = {"shapes": 48, "digits": 32}
SHAPES_DEFAULTS = {"num_classes": 4, "train_per_class": 400, "val_per_class": 100, "data_seed": 0}


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
    """The training run of one (variant, seed): a light recipe sized for a minute or two of CPU.

    The paper's recipe (RandAugment, Mixup/CutMix, random erasing, label smoothing, 5 warm-up epochs, cosine to 1e-5)
    is made for 300 epochs; in 400 steps it leaves every variant near chance, so this uses flips only (none on the
    digits: a mirrored digit is another shape), no label smoothing, half an epoch of warm-up and a cosine that ends at
    a fifth of the peak. The same for every variant.
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
        scale=(1.0, 1.0),  # no crop: augmentation slows learning more than it helps at this budget
        ratio=(1.0, 1.0),
        hflip=0.0 if args.dataset == "digits" else 0.5,
        auto_augment=None,
        color_jitter=0.0,
        re_prob=0.0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        label_smoothing=0.0,
        batch_size=args.batch_size,
        num_workers=args.workers,
        num_threads=args.threads,
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


def prepare_data(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Make (or find) the study's dataset under `args.out / "data"`; return its root and its manifest."""
    root = args.out / "data"
    if args.dataset == "digits":
        make_digits(root, image_size=args.image_size)
    else:
        make_dataset(
            root,
            num_classes=args.num_classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            image_size=args.image_size,
            seed=args.data_seed,
        )
    return root, json.loads((root / "dataset.json").read_text("utf-8"))


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


def markdown_table(rows: list[dict[str, Any]], image_size: int, peer_rows: list[dict[str, Any]] = ()) -> str:
    """The study's result as a markdown table, with the paper's ImageNet top-1 beside it and the peers below."""
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
    for p in peer_rows:
        delta = "-" if base is None else f"{p['val_top1'] - base['mean']:+.1f}"
        lines.append(
            f"| peer: {p['name']}, raw 8x8 pixels | {p['val_top1']:.1f} (deterministic) | - | {delta} | - | - | - "
            f"| {p['fit_s']:.1f} s | - |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str, peer_rows: list[dict[str, Any]] = ()) -> None:
    """Final val top-1 per variant (mean, std, each seed) and against GMACs, the peers as lines, as a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(rows))
    for x, r in zip(xs, rows, strict=True):
        color = "tab:blue" if r["variant"] == BASELINE else "tab:gray"
        ax1.errorbar(x, r["mean"], yerr=r["std"], fmt="s", color=color, markersize=7, capsize=5, zorder=2)
        ax1.scatter([x] * len(r["final_top1"]), r["final_top1"], color="black", s=10, zorder=3)
    base = next((r for r in rows if r["variant"] == BASELINE), None)
    if base is not None:
        ax1.axhline(base["mean"], color="tab:blue", lw=0.8, ls="--")
    for p, color in zip(peer_rows, ("tab:green", "tab:orange"), strict=False):
        for ax in (ax1, ax2):
            ax.axhline(p["val_top1"], color=color, lw=0.8, ls=":", label=f"{p['name'].split(' (')[0]}")
    if peer_rows:
        ax1.legend(fontsize=7, loc="lower right")
    ax1.margins(x=0.04)
    ax1.set_xticks(list(xs), [r["variant"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("final val top-1 (%)")
    ax1.set_title("per variant: mean ± std, dots = seeds", fontsize=9)
    markers = "osD^vP*Xph<>"
    for i, r in enumerate(rows):  # a legend, not labels: several variants cost the same and would overlap
        ax2.errorbar(r["gmacs"] * 1e3, r["mean"], yerr=r["std"], fmt=markers[i % len(markers)], capsize=3,
                     label=r["variant"])  # fmt: skip
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: inside it hid points
    ax2.set_xlabel("MMACs per image")
    ax2.set_ylabel("final val top-1 (%)")
    ax2.set_title("accuracy vs cost", fontsize=9)
    studies.save_figure(fig, path, title)


def command_line(argv: list[str]) -> str:
    """The command that reruns this study, as typed in the repository root."""
    return studies.command_line("benchmarks/ablation_study.py", argv)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = list_ablations()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/ablation_study/<dataset>)")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="shapes",
        help="shapes: the generated dataset; digits: scikit-learn's handwritten digits (needs scikit-learn)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["all"],
        choices=["all", *names],
        metavar="NAME",
        help=f"ablations to train (default: all, i.e. {' '.join(names)})",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (model init, data order)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per run")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the generated dataset (shapes; 4)")
    p.add_argument("--train-per-class", type=int, default=None, help="training images per class (shapes; 400)")
    p.add_argument("--val-per-class", type=int, default=None, help="validation images per class (shapes; 100)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side, the model trains at this size (default: shapes 48, digits 32)",
    )
    p.add_argument("--data-seed", type=int, default=None, help="seed of the generated dataset (shapes; 0)")
    p.add_argument("--dims", type=int, nargs=3, default=[32, 64, 128], help="stage widths")
    p.add_argument("--depths", type=int, nargs=3, default=[1, 1, 2], help="blocks per stage")
    p.add_argument("--heads", type=int, nargs=3, default=[1, 2, 4], help="attention heads per stage")
    p.add_argument("--batch-size", type=int, default=32, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    studies.add_compute_options(p)
    args = p.parse_args(argv)  # fmt: skip
    shapes_only = [f"--{k.replace('_', '-')}" for k in SHAPES_DEFAULTS if getattr(args, k) is not None]
    if args.dataset == "digits" and shapes_only:
        p.error(f"{', '.join(shapes_only)} only apply to --dataset shapes (the digits have a fixed split)")
    for key, default in SHAPES_DEFAULTS.items():  # left None for the digits: results.json records no unused value
        if args.dataset == "shapes" and getattr(args, key) is None:
            setattr(args, key, default)
    args.variants = names if "all" in args.variants else list(dict.fromkeys(args.variants))
    args.image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.dataset]
    args.out = args.out or Path("runs/ablation_study") / args.dataset
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    command = command_line(argv)
    data, manifest = prepare_data(args)
    num_classes = len(manifest["classes"])
    peer_rows = peers() if args.dataset == "digits" else []
    record = {
        "command": command,
        "dataset": manifest,
        "dataset_label": dataset_label(manifest),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "peers": peer_rows,
        "runs": [],
    }
    size = (args.image_size, args.image_size)
    trained = 0
    for variant in args.variants:
        arch = ablation_config(
            variant, study_base(args.dims, args.depths, args.heads), input_size=size, num_classes=num_classes
        )
        params, macs = model_cost(arch, size)
        for seed in args.seeds:
            cfg = train_config(args, variant, seed, data)
            trained += finished_summary(Path(cfg.output)) is None
            summary = run_one(cfg)
            record["runs"].append(
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
            record["train_wall_s"] = sum(r["wall_time_s"] for r in record["runs"])
            write_json(record, args.out / "results.json")
    rows = summarise(record["runs"], args.variants)
    table = markdown_table(rows, args.image_size, peer_rows)
    budget = (
        f"{args.epochs} epochs at batch {args.batch_size}, seeds {', '.join(map(str, args.seeds))}; CvT-13 layout "
        f"at widths {'/'.join(map(str, args.dims))}, depths {'/'.join(map(str, args.depths))}"
    )
    wall = (
        f"training wall time {record['train_wall_s'] / 60:.1f} min over {len(record['runs'])} runs "
        f"({args.threads} thread(s)); this invocation {(time.perf_counter() - started) / 60:.1f} min, "
        f"{trained} run(s) trained, {len(record['runs']) - trained} read back"
    )
    with atomic_write(args.out / "ablations_table.md", "w") as f:
        f.write(f"{table}\n\ndataset: {record['dataset_label']}\n\nbudget: {budget}\n\n{wall}\n\n")
        f.write(f"command: `{command}`\n")
    title = f"CvT ablations, small scale: {record['dataset_label']}\n{budget}"
    plot(rows, args.out / "ablations.png", title, peer_rows)
    print(table)
    print(f"\ndataset: {record['dataset_label']}\nbudget: {budget}\n{wall}\ncommand: {command}")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'ablations_table.md'} and {args.out / 'ablations.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
