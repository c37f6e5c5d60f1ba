"""Datasets: class folders, CSV lists and tar shards (split by rank and worker), skipping and reproducible samples."""

import hashlib
import logging
import random
import shutil
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import cvt.data.shards as shards_module
from cvt.data import (
    FolderDataset,
    ListDataset,
    TarShardDataset,
    UnreadableImageError,
    create_train_transform,
    expand_braces,
    index_shards,
    make_dataset,
    open_dataset,
    write_shards,
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small generated dataset: 4 classes, 6 train + 2 val images each, 32x32."""
    root = tmp_path_factory.mktemp("shapes") / "data"
    return make_dataset(root, num_classes=4, train_per_class=6, val_per_class=2, image_size=32)


def _digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


def _tree(root, files):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Image.Image):
            content.save(path)
        else:
            path.write_bytes(content)
    return root


def _img(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, value, value))


# ---- class folders ---------------------------------------------------------------------------------------------


def test_folder_classes_sorted_and_samples(tmp_path):
    root = _tree(
        tmp_path,
        {
            "zebra/a.png": _img(1),
            "Apple/b.JPG": _img(2),  # upper-case ending counts; sort is by code point: "Apple" < "mango" < "zebra"
            "mango/deep/c.png": _img(3),  # nested folders are searched
            "mango/.hidden.png": _img(4),  # hidden files are not
            "mango/readme.txt": b"notes",  # other endings are listed as ignored
            ".git/x.png": _img(5),  # hidden folders are not classes
        },
    )
    ds = open_dataset(root)
    assert isinstance(ds, FolderDataset)
    assert ds.classes == ["Apple", "mango", "zebra"]
    assert [(p.split("/")[-1], label) for p, label in ds.samples] == [("b.JPG", 0), ("c.png", 1), ("a.png", 2)]
    assert ds.ignored == [str(root / "mango/readme.txt")]
    image, label = ds[1]
    assert image.getpixel((0, 0)) == (3, 3, 3) and label == 1


def test_folder_splits_need_a_choice_and_share_classes(tmp_path):
    _tree(tmp_path, {"train/a/1.png": _img(1), "train/b/2.png": _img(2), "val/b/3.png": _img(3)})
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'val'\]; pick one with split="):
        open_dataset(tmp_path)
    val = open_dataset(tmp_path, split="val")
    assert val.classes == ["a", "b"] and val.samples[0][1] == 1  # 'b' keeps label 1 although val has no 'a'
    with pytest.raises(ValueError, match="has no split 'test'"):
        open_dataset(tmp_path, split="test")


def test_folder_imposed_class_order(tmp_path):
    _tree(tmp_path, {"a/1.png": _img(1), "b/2.png": _img(2)})
    ds = open_dataset(tmp_path, classes=["b", "a", "c"])
    assert [(path.split("/")[-1], label) for path, label in ds.samples] == [("2.png", 0), ("1.png", 1)]
    with pytest.raises(ValueError, match=r"class folder\(s\) \['b'\] are not among the given classes"):
        open_dataset(tmp_path, classes=["a"])


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders found"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        open_dataset(tmp_path / "empty")


# ---- CSV lists -------------------------------------------------------------------------------------------------


def test_csv_with_names_header_and_relative_paths(tmp_path):
    _tree(tmp_path, {"img/x.png": _img(10), "img/y.png": _img(20)})
    (tmp_path / "list.csv").write_text("path,label\nimg/x.png,dog\n\nimg/y.png,cat\n")
    ds = open_dataset(tmp_path / "list.csv")
    assert isinstance(ds, ListDataset)
    assert ds.classes == ["cat", "dog"] and ds.targets == [1, 0]
    assert ds[1][0].getpixel((0, 0)) == (20, 20, 20)


def test_csv_with_integer_labels(tmp_path):
    _tree(tmp_path, {"x.png": _img(1)})
    (tmp_path / "l.csv").write_text(f"{tmp_path / 'x.png'},3\nx.png,0\n")
    ds = open_dataset(tmp_path / "l.csv")
    assert ds.classes == ["0", "1", "2", "3"] and ds.targets == [3, 0]
    assert open_dataset(tmp_path / "l.csv", classes=["a", "b", "c", "d"]).classes == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a.png,1\nb.png\n", "line 2: expected 2 columns"),
        ("a.png,1\nb.png,dog\n", "line 2: label 'dog' mixes names and integers"),
        ("a.png,-1\n", "line 1: label -1 is negative"),
        ("", "no rows"),
    ],
)
def test_csv_errors(tmp_path, text, match):
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        open_dataset(tmp_path / "bad.csv")


def test_csv_unknown_class_and_split_csv(tmp_path):
    (tmp_path / "train.csv").write_text("a.png,dog\n")
    (tmp_path / "val.csv").write_text("a.png,cat\n")
    with pytest.raises(ValueError, match="line 1: class 'cat' is not among"):
        open_dataset(tmp_path, split="val", classes=["dog"])
    assert open_dataset(tmp_path, split="train").classes == ["dog"]


# ---- unreadable files ------------------------------------------------------------------------------------------


def _with_bad_files(tmp_path):
    return _tree(
        tmp_path,
        {"a/0.png": _img(0), "a/1.png": b"", "a/2.png": b"text, not an image", "b/3.png": _img(3)},
    )


def test_skipping_substitutes_the_next_readable_sample_and_warns_once(tmp_path, caplog):
    ds = open_dataset(_with_bad_files(tmp_path))
    with caplog.at_level(logging.WARNING):
        got = [ds[i] for i in range(4)] + [ds[1]]
    assert [img.getpixel((0, 0))[0] for img, _ in got] == [0, 3, 3, 3, 3]  # 1 and 2 are replaced by 3
    assert [label for _, label in got] == [0, 1, 1, 1, 1]
    assert sorted(ds.skipped) == [str(tmp_path / "a/1.png"), str(tmp_path / "a/2.png")]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "a/1.png: empty file (0 bytes)" in warnings[0]
    assert "2 unreadable file(s) skipped" in ds.summary()


def test_strict_fails_at_the_first_unreadable_file(tmp_path):
    ds = open_dataset(_with_bad_files(tmp_path), strict=True)
    assert ds[0][1] == 0
    with pytest.raises(UnreadableImageError, match="a/1.png: empty file"):
        ds[1]


def test_all_unreadable_is_an_error(tmp_path):
    ds = open_dataset(_tree(tmp_path, {"a/x.png": b"", "a/y.png": b"bad"}))
    with pytest.raises(RuntimeError, match="none of its 2 images can be read"):
        ds[0]


# ---- reproducible augmentation ---------------------------------------------------------------------------------


def test_sample_depends_only_on_seed_epoch_and_index(shapes):
    ds = open_dataset(shapes, split="train", transform=create_train_transform(32))
    random.seed(99)
    torch.manual_seed(99)
    state = (random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy())
    a = [ds[i][0] for i in (3, 7, 3)]
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])  # globals restored
    assert np.array_equal(np.random.get_state()[1], state[2])
    ds.set_epoch(1)
    b = ds[3][0]
    assert not torch.equal(a[0], b)
    ds.set_epoch(0)
    assert torch.equal(ds[3][0], a[0])  # back to epoch 0: the same sample (exact resume)
    other_seed = open_dataset(shapes, split="train", transform=create_train_transform(32), seed=1)
    assert not torch.equal(other_seed[3][0], a[0])


def test_samples_identical_with_and_without_loader_workers(shapes):
    ds = open_dataset(shapes, split="train", transform=create_train_transform(32))
    ds.set_epoch(2)
    order = list(range(len(ds)))
    serial = torch.cat([x for x, _ in DataLoader(ds, batch_size=5, sampler=order, num_workers=0)])
    workers = torch.cat([x for x, _ in DataLoader(ds, batch_size=5, sampler=order, num_workers=2)])
    assert torch.equal(serial, workers)


# ---- tar shards ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_dir(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    train = open_dataset(shapes, split="train")
    paths = write_shards(train.samples, train.classes, out, shard_size=3)  # 24 samples -> 8 shards
    assert [p.name for p in paths] == [f"shard-{i:06d}.tar" for i in range(8)]
    return out


def test_write_shards_layout(shard_dir, shapes):
    with tarfile.open(shard_dir / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 6 and names[0].split(".")[0] == names[1].split(".")[0]
    assert names[0].endswith((".jpg", ".png")) and names[1].endswith(".cls")
    assert (shard_dir / "classes.txt").read_text().split() == open_dataset(shapes, split="train").classes


def test_tar_reads_every_sample_with_the_folder_labels(shard_dir, shapes):
    folder = open_dataset(shapes, split="train")
    expected = sorted((_digest(img), label) for img, label in (folder[i] for i in range(len(folder))))
    ds = open_dataset(shard_dir)
    assert isinstance(ds, TarShardDataset) and ds.classes == folder.classes and len(ds) == 24
    assert sorted((_digest(img), label) for img, label in ds) == expected
    pattern = str(shard_dir / "shard-{000000..000007}.tar")
    assert sorted((_digest(img), label) for img, label in open_dataset(pattern)) == expected


@pytest.mark.parametrize(("world_size", "workers"), [(1, 1), (2, 1), (2, 3), (3, 2), (8, 1)])
def test_tar_split_by_rank_and_worker_no_overlap_full_coverage(shard_dir, monkeypatch, world_size, workers):
    seen = []
    for rank in range(world_size):
        ds = open_dataset(shard_dir, rank=rank, world_size=world_size)
        per_rank = []
        for worker in range(workers):
            info = SimpleNamespace(id=worker, num_workers=workers)
            monkeypatch.setattr(shards_module, "get_worker_info", lambda info=info: info)
            per_rank += [_digest(img) for img, _ in ds]
        assert len(per_rank) == len(ds)  # __len__ is this rank's share
        seen += per_rank
    assert len(seen) == 24 and len(set(seen)) == 24


def test_tar_split_with_real_loader_workers_and_shuffle(shard_dir):
    def collect(rank, epoch):
        ds = open_dataset(shard_dir, rank=rank, world_size=2, shuffle=True, seed=3)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda sample: sample)
        return [_digest(img) for img, _ in loader]

    epoch0 = collect(0, 0) + collect(1, 0)
    assert len(epoch0) == 24 and len(set(epoch0)) == 24
    epoch1 = collect(0, 1) + collect(1, 1)
    assert sorted(epoch1) == sorted(epoch0) and epoch1 != epoch0  # same samples, another order


def test_tar_augmentation_is_reproducible(shard_dir):
    ds = open_dataset(shard_dir, transform=create_train_transform(32))
    first = [x for x, _ in ds]
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in ds], strict=True))
    ds.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in ds], strict=True))


def test_tar_more_ranks_than_shards_is_an_error(shard_dir):
    with pytest.raises(ValueError, match="8 shard\\(s\\) cannot be split across 9 ranks"):
        open_dataset(shard_dir, rank=0, world_size=9)


def test_tar_bad_member_is_skipped_or_strict(tmp_path, caplog):
    good = (tmp_path / "g.png").open("wb")
    _img(7).save(good, "PNG")
    good.close()
    with tarfile.open(tmp_path / "s-0.tar", "w") as tar:
        tar.add(tmp_path / "g.png", "0001.png")
        _add(tar, "0001.cls", b"2")
        _add(tar, "0002.jpg", b"garbage")
        _add(tar, "0002.cls", b"1")
        _add(tar, "0003.png", (tmp_path / "g.png").read_bytes())  # no label
        _add(tar, "0004.png", (tmp_path / "g.png").read_bytes())
        _add(tar, "0004.cls", b"cat")  # not a class index
    index_shards(tmp_path)  # made by hand: given its manifest
    with caplog.at_level(logging.WARNING):
        got = list(open_dataset(tmp_path / "s-0.tar"))
    assert [(img.getpixel((0, 0)), label) for img, label in got] == [((7, 7, 7), 2)]
    assert any("s-0.tar:0002.jpg" in r.getMessage() for r in caplog.records)
    assert any("0003" in r.getMessage() and "needs an image and a .cls label" in r.getMessage() for r in caplog.records)
    with pytest.raises(UnreadableImageError, match="0002.jpg"):
        list(open_dataset(tmp_path / "s-0.tar", strict=True))
    assert any("0004" in r.getMessage() for r in caplog.records)
    assert open_dataset(tmp_path / "s-0.tar").classes == ["0", "1", "2"]  # no classes.txt: from the labels
    data = (tmp_path / "s-0.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "s-1.tar").write_bytes(data[:4000])  # cut inside sample 0002: only 0001 (label 2) is whole
    index_shards(tmp_path / "cut")
    assert open_dataset(tmp_path / "cut" / "s-1.tar").classes == ["0", "1", "2"]


def test_tar_truncated_shard_keeps_what_came_before(shard_dir, tmp_path, caplog):
    data = (shard_dir / "shard-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    shutil.copy(shard_dir / "classes.txt", tmp_path / "classes.txt")
    index_shards(tmp_path)
    with caplog.at_level(logging.WARNING):
        got = list(open_dataset(tmp_path / "cut.tar"))
    assert 1 <= len(got) < 3
    assert any("cut.tar" in r.getMessage() for r in caplog.records)


def _add(tar, name, data):
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_expand_braces():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="runs backwards"):
        expand_braces("{5..1}")


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"s-001.tar, .*s-002.tar do not exist"):
        open_dataset(str(tmp_path / "s-{001..002}.tar"))


def test_split_folders_of_shards_and_split_errors(shard_dir, tmp_path):
    shutil.copytree(shard_dir, tmp_path / "train")
    ds = open_dataset(tmp_path, split="train")
    assert isinstance(ds, TarShardDataset) and len(ds) == 24
    with pytest.raises(ValueError, match="has no split sub-folders or files"):
        open_dataset(shard_dir, split="train")
