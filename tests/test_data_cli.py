"""`cvt make-dataset`, `cvt check-data` and `cvt write-shards` through `cvt.cli.main`."""

import shutil

from PIL import Image

from cvt.cli import main
from cvt.data import index_shards


def test_make_dataset_then_check_clean(tmp_path, capsys):
    root = tmp_path / "shapes"
    args = ["make-dataset", str(root), "--classes", "3", "--train-per-class", "4", "--val-per-class", "2"]
    assert main([*args, "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "3 classes (disk, ring, square)" in out and "train 12 images, val 6 images, 32x32" in out
    assert main(["check-data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "split train (folder): 12 readable images, 3 classes (4-4 per class)" in out
    assert "split val (folder): 6 readable images" in out
    assert "smallest 32x32" in out and "summary: 18 files checked, 18 readable, 0 unreadable" in out


def test_check_data_lists_every_unreadable_file_and_exits_1(tmp_path, capsys):
    root = tmp_path / "d"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (10, 20)).save(root / "cat" / "ok.png")
    Image.new("RGB", (300, 200)).save(root / "dog" / "big.jpg")
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "letter.png").write_text("dear dataset,")
    (root / "dog" / "notes.txt").write_text("ignored")
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'cat' / 'empty.jpg'}: empty file (0 bytes)" in out
    assert f"{root / 'dog' / 'letter.png'}: not an image" in out
    assert "2 unreadable file(s)" in out and "summary: 4 files checked, 2 readable, 2 unreadable" in out
    assert "smallest 10x20, median 300x200, largest 300x200" in out
    assert "1 file(s) without an image ending ignored" in out
    assert main(["check-data", str(root), "--max-pixels", "1000"]) == 1
    assert "60,000 pixels is above the limit of 1,000" in capsys.readouterr().out
    assert main(["check-data", str(root), "--strict"]) == 1
    assert "stopped at the first unreadable file" in capsys.readouterr().err


def test_check_data_on_csv_and_missing_source(tmp_path, capsys):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "l.csv").write_text("a.png,x\nmissing.png,y\n")
    assert main(["check-data", str(tmp_path / "l.csv")]) == 1
    assert "missing.png: cannot read the file" in capsys.readouterr().out
    assert main(["check-data", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_write_shards_and_check_them(tmp_path, capsys):
    root = tmp_path / "shapes"
    assert main(["make-dataset", str(root), "--classes", "2", "--train-per-class", "5", "--size", "16"]) == 0
    out = tmp_path / "shards"
    assert main(["write-shards", str(root), str(out), "--split", "train", "--shard-size", "4"]) == 0
    assert "wrote 10 samples of 2 classes into 3 shard(s)" in capsys.readouterr().out
    assert main(["check-data", str(out)]) == 0
    assert "dataset (tar): 10 readable images, 2 classes (5-5 per class)" in capsys.readouterr().out
    shutil.copy(out / "shard-000000.tar", out / "shard-000003.tar")
    (out / "shard-000003.tar").write_bytes((out / "shard-000003.tar").read_bytes()[:1500])
    assert main(["check-data", str(out)]) == 1  # a shard the manifest does not list: refused
    assert "shard-000003.tar is not in" in capsys.readouterr().err
    index_shards(out)  # taken in as it is: the damage is found by reading
    assert main(["check-data", str(out)]) == 1
    assert "shard-000003.tar" in capsys.readouterr().out


def test_check_data_tells_a_dataset_from_a_folder_of_stray_images(tmp_path, capsys):
    # a folder of plots with one sub-folder of more plots: every file decodes, so decoding alone found it fine
    plots = tmp_path / "plots"
    (plots / "attention").mkdir(parents=True)
    for name in ("curves.png", "confusion.png", "attention/head0.png"):
        Image.new("RGB", (64, 48)).save(plots / name)
    assert main(["check-data", str(plots)]) == 1
    out = capsys.readouterr().out
    assert "summary: 1 files checked, 1 readable, 0 unreadable" in out and "not a classification dataset" in out
    assert f"2 image file(s) lie outside any class folder, e.g. {plots / 'confusion.png'}" in out
    assert "only 1 class (attention): classification needs two" in out
    (plots / "attention" / "head0.png").unlink()
    (plots / "attention").rmdir()
    assert main(["check-data", str(plots)]) == 1  # only loose images: no class folder at all
    assert "no class folders found" in capsys.readouterr().err
