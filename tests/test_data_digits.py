"""scikit-learn's digits as class folders: the fixed split, determinism, and pixels checked against load_digits."""

import hashlib
import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits  # the reference (scikit-learn: the digits extra, also in dev)

from cvt.cli import main
from cvt.data import load_image, make_dataset, make_digits, open_dataset
from cvt.data.digits import digits_split

DIGITS = load_digits()
PER_CLASS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # np.bincount(load_digits().target), as bundled


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_digits(tmp_path_factory.mktemp("digits") / "d")


def files(root):
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.png"))}


def test_split_is_every_fifth_of_each_class_in_load_digits_order(tree):
    assert np.bincount(DIGITS.target).tolist() == PER_CLASS
    # the reference: walk load_digits in order, count each class's images, send its 5th, 10th, ... to val
    seen, expected = Counter(), {}
    for index, label in enumerate(DIGITS.target):
        seen[label] += 1
        expected[f"{'val' if seen[label] % 5 == 0 else 'train'}/{label}/{index:05d}.png"] = label
    assert set(files(tree)) == set(expected)
    val = Counter(name.split("/")[1] for name in expected if name.startswith("val/"))
    assert [val[str(d)] for d in range(10)] == [n // 5 for n in PER_CLASS] == [35, 36, 35, 36, 36, 36, 36, 35, 34, 36]
    assert sum(val.values()) == 355 and len(expected) - 355 == 1442
    train_idx, val_idx = digits_split(DIGITS.target)
    assert sorted(int(n[-9:-4]) for n in expected if n.startswith("val/")) == val_idx.tolist()
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(train_idx) + len(val_idx) == 1797


def test_images_decode_to_load_digits_at_the_same_index(tree):
    # reference: load_digits' levels 0-16 scaled to 0-255, upscaled by torch's bilinear interpolation (half-pixel
    # centres, edges clamped), which PIL's bilinear filter matches up to its fixed-point rounding
    for name, path in list(files(tree).items())[::37]:
        index = int(path.stem)
        assert path.parent.name == str(DIGITS.target[index])
        decoded = np.asarray(load_image(path))  # what training reads: 8-bit RGB
        assert decoded.shape == (32, 32, 3) and (decoded == decoded[..., :1]).all(), name
        levels = torch.tensor(np.rint(DIGITS.images[index] * 255 / 16))[None, None]
        ref = F.interpolate(levels, size=(32, 32), mode="bilinear", align_corners=False)[0, 0].round().numpy()
        assert np.abs(decoded[..., 0].astype(float) - ref).max() <= 1, name


def test_nearest_keeps_the_scans_exactly(tmp_path):
    root = make_digits(tmp_path / "n", image_size=16, resample="nearest")
    for path in list(files(root).values())[::50]:
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (16, 16)
        blocks = pixels[::2, ::2].astype(np.float64)
        assert (np.repeat(np.repeat(blocks, 2, 0), 2, 1) == pixels).all()
        assert (np.rint(blocks * 16 / 255) == DIGITS.images[int(path.stem)]).all()  # levels 0-16 back exactly


def test_same_files_every_time_and_no_work_when_done(tree, tmp_path):
    digest = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in files(tree).items()}
    again = make_digits(tmp_path / "again")
    assert {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in files(again).items()} == digest
    stamps = {name: p.stat().st_mtime_ns for name, p in files(again).items()}
    make_digits(again)
    assert {name: p.stat().st_mtime_ns for name, p in files(again).items()} == stamps
    manifest = json.loads((again / "dataset.json").read_text())
    assert manifest["complete"] and manifest["version"] == 1 and manifest["images"] == {"train": 1442, "val": 355}
    assert manifest["resample"] == "bilinear" and manifest["classes"] == [str(d) for d in range(10)]


def test_reads_as_a_folder_dataset(tree):
    train, val = open_dataset(tree, split="train"), open_dataset(tree, split="val")
    assert train.classes == val.classes == [str(d) for d in range(10)]
    assert (len(train), len(val)) == (1442, 355)


def test_bad_arguments_and_foreign_directories(tree, tmp_path):
    with pytest.raises(ValueError, match="unknown resample filter 'box'; choose one of nearest, bilinear, bicubic"):
        make_digits(tmp_path / "x", resample="box")
    with pytest.raises(ValueError, match="at least 8 pixels"):
        make_digits(tmp_path / "x", image_size=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and is not a digits tree"):
        make_digits(tmp_path / "full")
    with pytest.raises(ValueError, match="other settings .* overwrite=True"):
        make_digits(tree, image_size=16)


def test_the_builders_leave_each_others_trees_alone(tree, tmp_path):
    before = {name: path.stat().st_mtime_ns for name, path in files(tree).items()}
    with pytest.raises(ValueError, match=r"holds another dataset \(cvt\.data\.make_digits\); choose another directory"):
        make_dataset(tree)  # without the check, the shapes generator deleted the digits and drew over them
    assert {name: path.stat().st_mtime_ns for name, path in files(tree).items()} == before
    shapes = make_dataset(tmp_path / "s", num_classes=2, train_per_class=1, val_per_class=1, image_size=16)
    with pytest.raises(ValueError, match=r"holds another dataset \(cvt\.data\.make_dataset\)"):
        make_digits(shapes, overwrite=True)
    assert len(open_dataset(shapes, split="train")) == 2


def test_missing_scikit_learn_names_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # `import sklearn.datasets` now raises ImportError
    with pytest.raises(
        ImportError, match=r"needs scikit-learn, which is not installed: pip install 'cvt-pytorch\[digits\]'"
    ):
        make_digits(tmp_path / "d")
    assert main(["make-dataset", "--kind", "digits", str(tmp_path / "d2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'cvt-pytorch[digits]'" in err


def test_cli(tmp_path, capsys):
    assert main(["make-dataset", "--kind", "digits", str(tmp_path / "d"), "--size", "24"]) == 0
    out = capsys.readouterr().out
    assert "scikit-learn's digits, 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)" in out
    assert "train 1442 images, val 355 images, 24x24" in out
    assert Image.open(next((tmp_path / "d" / "val" / "3").iterdir())).size == (24, 24)
