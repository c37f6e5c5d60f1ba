"""The generated shapes dataset: layout, real JPEG/PNG files, determinism, re-runs, and colour carrying no class."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvt.data import make_dataset, open_dataset
from cvt.data.synthetic import CLASS_TABLE, MAX_CLASSES, render, shape_classes

DEMO_CLASSES = [
    "crescent", "cross", "disk", "disk-checker", "frame", "ring", "square", "square-stripes", "star", "triangle",
]  # fmt: skip


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layout_formats_and_manifest(tmp_path):
    root = make_dataset(tmp_path / "d", num_classes=10, train_per_class=8, val_per_class=3, image_size=40)
    train, val = open_dataset(root, split="train"), open_dataset(root, split="val")
    assert train.classes == DEMO_CLASSES and val.classes == DEMO_CLASSES
    assert len(train) == 80 and len(val) == 30
    assert np.bincount(train.targets).tolist() == [8] * 10
    files = [p for p, _ in train.samples + val.samples]
    heads = {Path(p).read_bytes()[:4] for p in files}
    assert heads == {b"\xff\xd8\xff\xe0", b"\x89PNG"}  # both real JPEG and real PNG files
    assert all(p.endswith((".jpg", ".png")) for p in files)
    assert {Image.open(p).size for p in files} == {(40, 40)}
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["complete"] and manifest["images"] == 110 and manifest["classes"] == DEMO_CLASSES


def test_deterministic_by_seed_and_independent_of_workers(tmp_path):
    kwargs = {"num_classes": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 32}
    a = make_dataset(tmp_path / "a", seed=7, **kwargs)
    b = make_dataset(tmp_path / "b", seed=7, num_workers=2, **kwargs)
    c = make_dataset(tmp_path / "c", seed=8, **kwargs)
    assert _files(a) == _files(b)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in _files(a))
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in _files(a) if (c / f).exists())


def test_rerun_is_free_other_args_need_overwrite(tmp_path):
    kwargs = {"num_classes": 2, "train_per_class": 2, "val_per_class": 1, "image_size": 16}
    root = make_dataset(tmp_path / "d", **kwargs)
    stamp = (root / "train/disk/00000.jpg").stat().st_mtime_ns
    make_dataset(root, **kwargs)
    assert (root / "train/disk/00000.jpg").stat().st_mtime_ns == stamp  # nothing rewritten
    with pytest.raises(ValueError, match="pass overwrite=True"):
        make_dataset(root, **{**kwargs, "train_per_class": 3})
    make_dataset(root, **{**kwargs, "train_per_class": 3}, overwrite=True)
    assert len(open_dataset(root, split="train")) == 6


def test_incomplete_run_is_redone(tmp_path):
    root = make_dataset(tmp_path / "d", num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    manifest = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**manifest, "complete": False}))  # as if killed mid-way
    (root / "train/disk/00000.jpg").unlink()
    make_dataset(root, num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    assert (root / "train/disk/00000.jpg").exists()


def test_refuses_foreign_directories_and_bad_arguments(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and is not a generated dataset"):
        make_dataset(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.dataset\.json is not a readable dataset manifest .*; delete it"):
        make_dataset(tmp_path / "bad")
    with pytest.raises(ValueError, match=f"num_classes must be between 2 and {MAX_CLASSES}"):
        make_dataset(tmp_path / "x", num_classes=1)
    with pytest.raises(ValueError, match="image_size must be at least 16"):
        make_dataset(tmp_path / "x", image_size=8)


def test_class_table():
    assert len(set(CLASS_TABLE)) == MAX_CLASSES == 33
    assert shape_classes(10)[8] == ("square", "stripes") and shape_classes(10)[2] == ("square", "solid")


def _features(image: Image.Image) -> np.ndarray:
    """Colour statistics only: per-channel mean and std, and a 2x2x2 colour histogram."""
    arr = np.asarray(image, dtype=np.float32)
    hist = np.histogramdd(arr.reshape(-1, 3), bins=2, range=[(0, 256)] * 3)[0].ravel() / arr[..., 0].size
    return np.concatenate([arr.mean((0, 1)) / 255, arr.std((0, 1)) / 255, hist])


def test_colour_alone_does_not_predict_the_class():
    # a least-squares linear classifier on colour statistics, 35 training images per class, scored on 15 others:
    # near chance (10%) because every colour is drawn independently of the class
    pairs = shape_classes(10)
    feats, labels = [], []
    for label, (outline, fill) in enumerate(pairs):
        for i in range(50):
            feats.append(_features(render(outline, fill, 32, np.random.default_rng([label, i]))))
            labels.append(label)
    x, y = np.array(feats), np.array(labels)
    x = np.hstack([x, np.ones((len(x), 1))])
    train = np.arange(len(y)) % 50 < 35
    w = np.linalg.lstsq(x[train], np.eye(10)[y[train]], rcond=None)[0]
    accuracy = (np.argmax(x[~train] @ w, 1) == y[~train]).mean()
    assert accuracy < 0.25, accuracy


def test_generation_speed(tmp_path):
    import time

    start = time.perf_counter()
    make_dataset(tmp_path / "d", num_classes=10, train_per_class=20, val_per_class=5, image_size=64)
    per_image = (time.perf_counter() - start) / 250
    # about 3 ms each on an idle core (the demo's 3,500 images in ~10 s); the margin absorbs a shared machine
    assert per_image < 0.04


def test_older_drawing_version_is_redrawn(tmp_path):
    kwargs = {"num_classes": 2, "train_per_class": 1, "val_per_class": 0, "image_size": 16}
    root = make_dataset(tmp_path / "d", **kwargs)
    manifest = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**manifest, "version": 0}))
    stale = next((root / "train/disk").iterdir())
    stale.write_bytes(b"stale")
    make_dataset(root, **kwargs)
    assert json.loads((root / "dataset.json").read_text())["version"] == manifest["version"]
    assert open_dataset(root, split="train", strict=True)[0][0].size == (16, 16)
