"""What the accuracy studies (ablation_study.py, transfer_study.py) share: running one training run resumably, the
dataset in one line from its manifest, scikit-learn's classifiers on the digits as peers, the command line.

Imported by the scripts of this directory (on `sys.path` when one runs as a script, and in pytest's `pythonpath`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np

from cvt.data.digits import digits_split, load_digits_arrays
from cvt.train import TrainConfig, train

logger = logging.getLogger("studies")


def dataset_label(manifest: dict[str, Any]) -> str:
    """The dataset in one line, its generator's version included, from the manifest its builder wrote."""
    size = manifest["image_size"]
    if manifest["generator"] == "cvt.data.make_digits":
        images = manifest["images"]
        return (
            f"digits v{manifest['version']} (`cvt.data.make_digits`: scikit-learn {manifest['sklearn']} load_digits, "
            f"{len(manifest['classes'])} classes, {images['train']} train / {images['val']} val, fixed split, "
            f"8 -> {size} px {manifest['resample']})"
        )
    return (
        f"shapes v{manifest['version']} (`cvt.data.make_dataset`: {manifest['num_classes']} classes x "
        f"{manifest['train_per_class']} train / {manifest['val_per_class']} val at {size} px, seed {manifest['seed']})"
    )


def peers(train_indices: np.ndarray | None = None) -> list[dict[str, Any]]:
    """scikit-learn's SVC and logistic regression on the digits' split, fit on the raw 8x8 pixels (levels 0-16).

    Args:
        train_indices: `load_digits` indices to fit on (a subset of the split's training images); None for the
            whole training split. They are always scored on the whole validation split.
    """
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 (optional dependency)
    from sklearn.svm import SVC  # noqa: PLC0415

    images, labels = load_digits_arrays()
    features = images.reshape(len(images), -1)
    train_idx, val_idx = digits_split(labels)
    if train_indices is not None:
        unknown = np.setdiff1d(train_indices, train_idx)
        if len(unknown):
            raise ValueError(f"digits {unknown[:5].tolist()} are not in the training split")
        train_idx = np.asarray(train_indices)
    out = []
    for name, model in (
        ("scikit-learn SVC (RBF, C=1, gamma='scale')", SVC()),
        ("scikit-learn LogisticRegression (L2, C=1)", LogisticRegression(max_iter=10_000)),
    ):
        start = time.perf_counter()
        model.fit(features[train_idx], labels[train_idx])
        top1 = 100.0 * float((model.predict(features[val_idx]) == labels[val_idx]).mean())
        out.append({"name": name, "val_top1": top1, "fit_s": time.perf_counter() - start})
        logger.info("peer %s on %d images: val top-1 %.2f", name, len(train_idx), top1)
    return out


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a run that finished in `run_dir`, None if it did not (an interrupted run's says so)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    return summary if summary is not None and summary.get("completed") else None


def run_one(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run, or read its summary if it finished before; resume it if it was interrupted.

    Raises:
        SystemExit: the run directory holds a run with other settings (a changed budget, another dataset).
    """
    run_dir = Path(cfg.output)
    saved = run_dir / "config.json"
    if saved.is_file():
        old, new = json.loads(saved.read_text()), cfg.to_dict()
        changed = sorted(k for k in new.keys() | old.keys() if k != "resume" and old.get(k) != new.get(k))
        if changed:
            raise SystemExit(
                f"{run_dir} holds a run with other settings ({', '.join(changed)}); "
                "choose another --out or delete that run directory"
            )
    summary = finished_summary(run_dir)
    if summary is not None:
        logger.info("%s: done before, final top-1 %.2f", run_dir, summary["final_top1"])
        return summary
    if (run_dir / "last.pt").is_file():
        cfg = dataclasses.replace(cfg, resume="auto")
    start = time.perf_counter()
    summary = train(cfg)
    logger.info("%s: final top-1 %.2f in %.0f s", run_dir, summary["final_top1"], time.perf_counter() - start)
    return summary


def save_figure(fig: Any, path: Path, title: str) -> None:
    """Title a matplotlib figure, lay it out, write it as a PNG and close it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 (only the scripts that plot need it)

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def add_compute_options(p: argparse.ArgumentParser) -> None:
    """The options both studies take for where and how their runs compute."""
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared machine more threads than free cores is far slower)",
    )


def command_line(script: str, argv: list[str]) -> str:
    """The command that reruns `script` (a path from the repository root) with `argv`, as typed there."""
    return shlex.join(["python", script, *argv])
