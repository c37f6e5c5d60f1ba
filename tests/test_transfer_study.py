"""benchmarks/transfer_study.py: the digits' fixed subset, the controls between arms, and the study end to end."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transfer_study as study  # benchmarks/ is on pytest's pythonpath
from sklearn.datasets import load_digits  # the reference (scikit-learn is in the dev extra)
from sklearn.svm import SVC

from cvt.data import make_digits, open_dataset
from cvt.train import TrainConfig

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "transfer_study.py"


def _tenth_of_each_class():
    """Every tenth training digit of each class (the 10th, 20th, ...), the split being every fifth image to val."""
    labels = load_digits().target
    train = [i for c in range(10) for k, i in enumerate(np.flatnonzero(labels == c)) if (k + 1) % 5]
    return sorted(i for c in range(10) for i in [j for j in train if labels[j] == c][9::10]), labels


def test_subset_is_every_tenth_training_image_of_each_class():
    expected, labels = _tenth_of_each_class()
    chosen = study.subset_indices(labels, 0.1)
    assert chosen.tolist() == expected
    assert np.bincount(labels[chosen]).tolist() == [14] * 10  # 142-147 training images per class
    assert len(study.subset_indices(labels, 1.0)) == 1442
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        study.subset_indices(labels, 0.0)


def test_subset_lists_open_as_a_dataset_with_the_trees_classes(tmp_path):
    digits = make_digits(tmp_path / "digits", image_size=8)
    manifest = study.write_subset(digits, tmp_path / "digits_10pct", 0.1)
    assert manifest["images"] == {"train": 140, "val": 355} and manifest["source_manifest"]["version"] == 1
    train = open_dataset(tmp_path / "digits_10pct", split="train")
    val = open_dataset(tmp_path / "digits_10pct", split="val")
    tree = open_dataset(digits, split="val")
    assert train.classes == tree.classes == [str(c) for c in range(10)]
    expected, labels = _tenth_of_each_class()
    assert [(Path(p).name, y) for p, y in train.samples] == [(f"{i:05d}.png", labels[i]) for i in expected]
    assert all(Path(p).is_file() and Path(p).parent.name == str(y) for p, y in train.samples)
    assert sorted(Path(p).resolve() for p, _ in val.samples) == sorted(Path(p).resolve() for p, _ in tree.samples)


def test_controls_refuse_arms_that_differ_in_more_than_their_start():
    scratch = TrainConfig(model_kwargs={"dims": [32, 96, 192]}, optimizer="adamw", lr=1e-3, output="a")
    adamw = TrainConfig(init="pre/best.pt", optimizer="adamw", lr=1e-3, lr_per_256=2.5e-5, output="b")
    sgd = TrainConfig(init="pre/best.pt", optimizer="sgd", lr_per_256=0.005, weight_decay=0.0, output="c")
    diffs = study.check_controls({"finetune": sgd, "finetune_adamw": adamw, "scratch": scratch})
    assert set(diffs["finetune_adamw"]) == {"init", "model_kwargs", "lr_per_256", "output"}
    assert diffs["finetune"]["optimizer"] == ["sgd", "adamw"] and diffs["finetune"]["lr"] == [None, 1e-3]
    adamw.hflip = 0.5
    scratch.hflip = 0.0
    with pytest.raises(SystemExit, match=r"differ in more than their start: \{'hflip': \[0.5, 0.0\]\}"):
        study.check_controls({"finetune_adamw": adamw, "scratch": scratch})


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_study_end_to_end(tmp_path):
    """The script as a user runs it, on a tiny budget; its outputs checked against the runs' own files."""
    argv = ["--out", str(tmp_path), "--pretrain-classes", "3", "--pretrain-per-class", "22"]
    argv += ["--pretrain-val-per-class", "4", "--pretrain-epochs", "1", "--steps", "2", "--fractions", "0.1", "1"]
    argv += ["--seeds", "0", "1", "--image-size", "16"]
    run = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["command"] == "python benchmarks/transfer_study.py " + shlex.join(argv)
    assert record["datasets"]["shapes"]["manifest"]["version"] == 3
    assert record["datasets"]["digits"]["manifest"]["images"] == {"train": 1442, "val": 355}
    keys = [("10pct", s, a) for s in (0, 1) for a in study.ARMS]
    keys += [("100pct", s, a) for s in (0, 1) for a in study.ARMS]
    assert [(r["regime"], r["seed"], r["arm"]) for r in record["runs"]] == keys

    # every run's figures are its own run directory's, and the arms of a regime share the budget
    for r in record["runs"]:
        run_dir = tmp_path / "runs" / r["regime"] / r["arm"] / f"seed{r['seed']}"
        summary, cfg = _summary(run_dir), json.loads((run_dir / "config.json").read_text())
        assert (r["final_top1"], r["best_top1"], r["steps"]) == (
            summary["final_top1"], summary["best_top1"], summary["global_step"])  # fmt: skip
        assert r["curve"][-1] == [summary["global_step"], summary["final_top1"]]
        assert (cfg["seed"], cfg["hflip"], cfg["input_size"]) == (r["seed"], 0.0, 16)
        if r["arm"] == "scratch":
            assert (cfg["init"], cfg["optimizer"], cfg["lr"], cfg["model_kwargs"]["dims"]) == (None, "adamw", 1e-3,
                                                                                             [32, 64, 128])  # fmt: skip
        else:
            assert cfg["init"] == str(tmp_path / "pretrain" / "best.pt")
        if r["arm"] == "finetune":  # the fine-tuning defaults, untouched: SGD at 0.005 per 256 images, no decay
            assert (cfg["optimizer"], cfg["lr"], cfg["lr_per_256"], cfg["weight_decay"]) == ("sgd", None, 0.005, 0.0)
        assert cfg["layer_decay"] == (0.75 if r["arm"] == "finetune_ld" else None)
    for regime, images, batch in (("10pct", 140, 32), ("100pct", 1442, 64)):
        group = [r for r in record["runs"] if r["regime"] == regime]
        assert {(r["train_images"], r["batch"], r["steps"]) for r in group} == {(images, batch, images // batch)}
    assert record["train_wall_s"] == pytest.approx(
        _summary(tmp_path / "pretrain")["wall_time_s"] + sum(r["wall_time_s"] for r in record["runs"]))  # fmt: skip

    # the fine-tuning runs say once each that the shapes' head was replaced by one for the digits
    reinit = re.findall(r"fine-tuning \S+ from (\S+): \d+ of \d+ tensor\(s\) loaded; re-initialised head.weight, "
                        r"head.bias: the checkpoint's classes 3 \(disk, ring, square\) differ from the data's "
                        r"classes 10 \(0, 1, 2, 3, 4, \.\.\.\)", run.stderr)  # fmt: skip
    assert reinit == [str(tmp_path / "pretrain" / "best.pt")] * 12  # 3 fine-tuning arms x 2 seeds x 2 regimes

    # the peers on the 10% subset: scikit-learn's SVC fit here on every tenth training digit of each class
    expected, labels = _tenth_of_each_class()
    images = load_digits().images.reshape(len(labels), -1)
    val = [i for c in range(10) for i in np.flatnonzero(labels == c)[4::5]]
    predicted = SVC().fit(images[expected], labels[expected]).predict(images[val])
    assert record["peers"]["10pct"][0]["val_top1"] == pytest.approx(100 * np.mean(predicted == labels[val]))

    table = (tmp_path / "transfer_table.md").read_text()
    assert f"command: `{record['command']}`" in table and "| 140 (10pct) | finetune |" in table
    assert "| 1442 (100pct) | peer: scikit-learn SVC" in table and "cvt train --model" in table
    assert (tmp_path / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stamp = (tmp_path / "runs" / "10pct" / "scratch" / "seed0" / "summary.json").stat().st_mtime_ns
    assert study.main(argv) == 0  # finished runs are read back, not trained again
    assert (tmp_path / "runs" / "10pct" / "scratch" / "seed0" / "summary.json").stat().st_mtime_ns == stamp
    assert "0 downstream run(s) trained, 16 read back" in (tmp_path / "transfer_table.md").read_text()
