"""Datasets: a class-per-folder tree, a CSV list file, or sharded tar archives, opened through `open_dataset`.

Every dataset yields `(transform(image), label)` (the PIL image itself without a transform) and exposes `classes`,
the class names in label order. Folder classes are the sorted sub-folder names; CSV classes are the sorted label
names, or "0".."K-1" for integer labels; tar classes come from `classes.txt` beside the shards.

Reproducible augmentation (exact resume): map-style datasets seed Python's `random`, numpy's global generator and
torch's default CPU generator from (seed, epoch, index) around each sample's transform, then restore the previous
states. The augmented sample i of epoch e is therefore the same whatever the number of loader workers, the batch
order or where a run resumed; call `set_epoch(epoch)` at the start of each epoch. The tar dataset does the same
with (seed, epoch, shard, position in the shard).

Unreadable files: with `strict=False` (default) a file that fails to decode is logged once with its name and reason,
recorded in `skipped`, and replaced by the next readable sample in index order (deterministic, so a batch keeps its
size); the tar dataset drops it. With `strict=True` the first unreadable file raises `UnreadableImageError`.
`skipped` counts what this process decoded: with loader workers each worker keeps its own record, so use
`cvt check-data` for a complete list.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .class_names import check_class_names
from .decode import DEFAULT_MAX_PIXELS, UnreadableImageError, is_image_file, load_image
from .seeding import rng_scope, sample_seed
from .shards import TarShardDataset, expand_shards

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "validation", "test")


class ImageDataset(Dataset):
    """A map-style dataset over a list of (path, label) samples, with robust decoding and seeded augmentation.

    Args:
        samples: (image path, class index) pairs.
        classes: class names in label order.
        transform: PIL image -> anything; None returns the PIL image.
        strict: raise on the first unreadable file instead of substituting the next readable sample.
        seed: base of the per-sample augmentation seed.
        max_pixels: decompression-bomb guard passed to `load_image`.
        source: what to call the dataset in messages.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        *,
        transform: Callable | None = None,
        strict: bool = False,
        seed: int = 0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        source: str = "",
    ) -> None:
        if not samples:
            raise ValueError(f"dataset {source} holds no images")
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.strict = strict
        self.seed = seed
        self.max_pixels = max_pixels
        self.source = source
        self.epoch = 0
        self.skipped: dict[str, str] = {}

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation `__getitem__` reproduces."""
        self.epoch = int(epoch)

    def with_transform(self, transform: Callable | None, *, seed: int) -> ImageDataset:
        """A copy over the same samples (nothing listed or read again) through `transform`, augmentation seeded
        with `seed`."""
        other = copy.copy(self)
        other.transform, other.seed, other.skipped = transform, seed, dict(self.skipped)
        return other

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Any, int]:
        """The decoded image and label at `index`, or of the next readable sample (see the module notes)."""
        n = len(self.samples)
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            if path in self.skipped:
                continue
            try:
                return load_image(path, max_pixels=self.max_pixels), label
            except UnreadableImageError as err:
                if self.strict:
                    raise
                self.skipped[path] = err.reason
                logger.warning(
                    "skipping unreadable image %s: %s (the next readable sample takes its place; "
                    "strict=True fails instead)",
                    path,
                    err.reason,
                )
        raise RuntimeError(f"dataset {self.source}: none of its {n} images can be read (see the warnings above)")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index < 0:
            index += len(self.samples)
        image, label = self.load(index)
        if self.transform is None:
            return image, label
        with rng_scope(sample_seed(self.seed, self.epoch, index)):
            return self.transform(image), label

    def summary(self) -> str:
        """One line: images, classes and unreadable files met so far in this process."""
        line = f"{len(self.samples)} images in {len(self.classes)} classes from {self.source}"
        return line + (f"; {len(self.skipped)} unreadable file(s) skipped" if self.skipped else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()}, transform={self.transform!r})"


class FolderDataset(ImageDataset):
    """Images in a class-per-folder tree: `root/<class>/**/<image>` (the ImageFolder layout).

    Classes are the sorted names of the sub-folders (hidden ones excluded); images are files with an image ending
    (`decode.IMAGE_EXTENSIONS`, any case) at any depth below them, in sorted order. Other files are listed in
    `ignored`.

    Args:
        root: the folder.
        classes: impose this class order (e.g. from a checkpoint); a sub-folder not in it is an error, a missing
            one is allowed (no images for that class).
        **kwargs: `ImageDataset` options.
    """

    def __init__(self, root: str | os.PathLike, *, classes: Sequence[str] | None = None, **kwargs: Any) -> None:
        root = Path(root)
        found = class_folders(root)
        if not found:
            raise ValueError(f"{root}: no class folders found; expected the layout {root}/<class name>/<image files>")
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(f"{root}: class folder(s) {unknown} are not among the given classes {list(classes)}")
        self.root = root
        self.ignored: list[str] = []
        samples, seen = [], set()
        for label, name in enumerate(classes):
            for path in _walk_files(root / name, seen):
                if is_image_file(path):
                    samples.append((path, label))
                else:
                    self.ignored.append(path)
        super().__init__(samples, list(classes), source=str(root), **kwargs)


def class_folders(root: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders of `root`, each a class name that can round-trip."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    check_class_names(names, str(root))
    return names


def _walk_files(folder: Path, seen: set[tuple[int, int]]) -> list[str]:
    """The files below `folder` (links followed, sorted), each real file once: a directory met again through a
    link (a loop, a link to a folder above, or two links to one folder) is not walked again, and a file already
    in `seen` (by device and inode, shared across the class folders) is left out, with a warning."""
    if not folder.is_dir():
        return []
    files, repeats = [], []
    dirs = {(st.st_dev, st.st_ino) for st in map(os.stat, folder.resolve().parents)}  # a link up is a loop
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in dirs:
            repeats.append(dirpath)
            dirnames[:] = []
            continue
        dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):
            path = os.path.join(dirpath, name)
            try:
                fst = os.stat(path)
            except OSError:  # a dangling link: listed, decoding reports it
                files.append(path)
                continue
            key = (fst.st_dev, fst.st_ino)
            if key in seen:
                repeats.append(path)
                continue
            seen.add(key)
            files.append(path)
    if repeats:
        logger.warning(
            "%s: %d folder(s) or file(s) reached a second time through symbolic links (a loop, or links to the same "
            "files) are counted once, e.g. %s",
            folder,
            len(repeats),
            repeats[0],
        )
    return files


class ListDataset(ImageDataset):
    """Images listed in a CSV file of `path,label` rows.

    Paths are relative to the CSV's folder unless absolute. Labels are all integers (classes "0".."K-1", K one
    more than the largest label, unless `classes` is given) or all class names (classes sorted, unless given).
    An optional header row whose second column reads "label" is skipped; blank lines are ignored. Spaces after a
    comma are formatting; a class name that cannot round-trip (`class_names`, e.g. one holding a line break in a
    quoted field, or ending in a space) is refused.

    Args:
        path: the CSV file.
        classes: class names in label order, to impose an order or the names of integer labels.
        **kwargs: `ImageDataset` options.
    """

    def __init__(self, path: str | os.PathLike, *, classes: Sequence[str] | None = None, **kwargs: Any) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"list file {path} does not exist")
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, skipinitialspace=True)
            for row in reader:
                lineno = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path} line {lineno}: expected 2 columns 'path,label', got {len(row)}: {row}")
                if lineno == 1 and row[1].strip().lower() == "label":
                    continue
                label = row[1].strip() if row[1].strip().lstrip("-").isdigit() else row[1]
                rows.append((lineno, row[0].strip(), label))
        if not rows:
            raise ValueError(f"{path}: no rows; expected lines of 'path,label'")
        numeric = [label.lstrip("-").isdigit() for _, _, label in rows]
        if any(numeric) and not all(numeric):
            lineno, _, label = rows[numeric.index(not numeric[0])]
            raise ValueError(f"{path} line {lineno}: label {label!r} mixes names and integers; use one kind")
        if all(numeric):
            labels = [int(label) for _, _, label in rows]
            bad = next(((n, v) for (n, _, _), v in zip(rows, labels, strict=True) if v < 0), None)
            if bad:
                raise ValueError(f"{path} line {bad[0]}: label {bad[1]} is negative")
            num_classes = max(labels) + 1
            if classes is None:
                classes = [str(i) for i in range(num_classes)]
            elif num_classes > len(classes):
                raise ValueError(f"{path}: label {num_classes - 1} is out of range for {len(classes)} given classes")
        else:
            names = [label for _, _, label in rows]
            if classes is None:
                check_class_names(dict.fromkeys(names), str(path))
                classes = sorted(set(names))
            index = {name: i for i, name in enumerate(classes)}
            unknown = next(((n, v) for (n, _, _), v in zip(rows, names, strict=True) if v not in index), None)
            if unknown:
                raise ValueError(f"{path} line {unknown[0]}: class {unknown[1]!r} is not among {list(classes)}")
            labels = [index[name] for name in names]
        samples = [(str(path.parent / file), label) for (_, file, _), label in zip(rows, labels, strict=True)]
        self.path = path
        super().__init__(samples, list(classes), source=str(path), **kwargs)


def open_dataset(
    source: str | os.PathLike,
    *,
    split: str | None = None,
    transform: Callable | None = None,
    strict: bool = False,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle: bool = False,
    classes: Sequence[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Dataset:
    """Open a dataset, recognising its format from `source`.

    Args:
        source: a class-per-folder directory; a directory with split sub-directories (`train/`, `val/`, ...,
            each a folder tree, a directory of tar shards, or `<split>.csv` beside them); a `.csv` list file;
            a `.tar` shard; a directory of `.tar` shards; or a brace pattern "shards-{000..009}.tar".
        split: which split of a directory with split sub-directories.
        transform: PIL image -> anything (e.g. `create_train_transform(...)`); None yields PIL images.
        strict: fail on the first unreadable file instead of skipping it.
        rank: this process's rank; only tar shards are split by rank (map-style datasets leave it to the sampler).
        world_size: number of ranks.
        seed: base seed of the per-sample augmentation (and of the tar shard / buffer shuffle).
        shuffle: tar shards only: shuffle shard order per epoch and samples through a buffer.
        classes: impose a class order (e.g. a checkpoint's); the data's classes must be among them.
        max_pixels: decompression-bomb guard (pixels per image).

    Returns:
        `FolderDataset` or `ListDataset` (map-style, with `classes`, `samples`, `set_epoch`) or
        `TarShardDataset` (iterable, with `classes`, `set_epoch`).
    """

    text = os.fspath(source)
    path = Path(text)
    common: dict[str, Any] = {"transform": transform, "strict": strict, "seed": seed, "max_pixels": max_pixels}
    sharded = {"rank": rank, "world_size": world_size, "shuffle": shuffle, "classes": classes}
    if path.is_dir():
        splits = [s for s in SPLITS if (path / s).is_dir() or (path / f"{s}.csv").is_file()]
        if splits:
            if split is None:
                raise ValueError(
                    f"{path} holds the splits {splits}; pick one with split= (--split on the command line)"
                )
            if split not in splits:
                raise ValueError(f"{path} has no split {split!r}; it holds {splits}")
            target = path / split if (path / split).is_dir() else path / f"{split}.csv"
            if classes is None and target.is_dir() and not any(target.glob("*.tar")):
                # the union over the splits, so a class missing from one split cannot shift another's labels
                sharded["classes"] = sorted({c for s in splits if (path / s).is_dir() for c in class_folders(path / s)})
            return open_dataset(target, **sharded, **common)
    if split is not None:
        raise ValueError(
            f"{path} has no split sub-folders or files ({', '.join(SPLITS)}), so split={split!r} cannot apply"
        )
    if "{" in text or text.endswith(".tar") or (path.is_dir() and any(path.glob("*.tar"))):
        return TarShardDataset(expand_shards(text), whole=path.is_dir(), **sharded, **common)
    if text.endswith(".csv"):
        return ListDataset(path, classes=classes, **common)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    return FolderDataset(path, classes=classes, **common)
