"""Sharded tar archives (the webdataset layout) for datasets that do not fit one disk or one directory listing.

A shard is a plain tar file whose members are grouped into samples by key, the member name up to the first dot of
its base name: `000123.jpg` + `000123.cls` is one sample with key `000123`. A sample needs one image member (any
ending of `decode.IMAGE_EXTENSIONS`) and a `.cls` member holding the class index as text. Members of a sample must
be adjacent, as tar writers of this layout store them. The class names live in `classes.txt` (one per line, in
label order) beside the shards; without it they are "0".."K-1", K found by reading every shard's labels once.

Splitting: shards (after an optional per-epoch shuffle with the same seed on every rank) are dealt round-robin to
ranks, then each rank's shards round-robin to its loader workers, so every sample is read exactly once per epoch
across all ranks and workers. A rank with fewer shards than loader workers lets every worker read all of them and
keep every n-th sample.

Manifest: `cvt write-shards` writes each shard under a temporary name and, after the last one, `shards.json`
beside them: the classes, and every shard's sample count and size. Reading refuses shards without a manifest (an
interrupted write-shards, whose finished shards would open silently as a smaller dataset) and shards that disagree
with it (missing, extra, or another size); `index_shards` writes one for complete shards made by other tools.
The manifest's counts are checked against the shards: for nothing against their sizes before an epoch is sized
(`total_samples`), exactly whenever a shard is read whole, and for every shard by `verify` (`cvt check-data`, which
reads the tar headers and `.cls` members, not the images). A label outside the classes is an error naming the shard
and the sample.

Damage (see `tar_scan`): every damaged stretch of a shard is reported by shard and member index: as a warning
while training, as an unreadable entry by `cvt check-data` (which then exits 1), as an error with `strict`.

Epoch length: the shards dealt to a rank change from epoch to epoch and hold different numbers of samples, each
loader worker drops its own last partial batch, and unreadable samples are skipped, so a plain pass over a rank's
shards yields a number of batches no rank can know in advance. Training sets a fixed length instead
(`set_epoch_length`, what webdataset's `with_epoch` does): every rank yields exactly that many batches per epoch,
stopping early when its shards hold more and wrapping around them (a second pass, augmented afresh) when they hold
fewer, so all ranks take the same number of optimiser steps and every epoch ends.
"""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from ..fileio import atomic_write, write_json
from ..outputs import check_output, claim_folder
from .class_names import check_class_names
from .decode import DEFAULT_MAX_PIXELS, UnreadableImageError, is_image_file, load_image
from .seeding import rng_scope, sample_seed
from .tar_scan import ShardScan, iter_tar_samples, sample_label, scan_shard

logger = logging.getLogger(__name__)

CLASSES_FILE = "classes.txt"
MANIFEST_FILE = "shards.json"
MANIFEST_FORMAT = "cvt.shards"
MIN_SAMPLE_BYTES = 3 * tarfile.BLOCKSIZE  # an image member's header, a .cls member's header and its data block

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand "a-{000..002}.tar" into a-000.tar, a-001.tar, a-002.tar (zero padding kept) and "{x,y}" into x, y."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        lo, hi = range_match.groups()
        if int(hi) < int(lo):
            raise ValueError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: cannot expand {{{body}}}; use {{000..099}} or {{a,b}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def expand_shards(source: str | os.PathLike) -> list[str]:
    """The shard files of a brace pattern, a single `.tar` file, or a directory of `.tar` files (sorted)."""
    text = os.fspath(source)
    path = Path(text)
    shards = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_braces(text)
    if not shards:
        raise FileNotFoundError(f"no .tar shards found at {text}")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"shard(s) {', '.join(missing[:3])}{more} do not exist (from {text})")
    return shards


class TarShardDataset(IterableDataset):
    """An iterable dataset over tar shards, split by rank and by loader worker (see the module notes).

    Args:
        shards: shard paths (see `expand_shards`).
        transform: PIL image -> anything; None yields PIL images.
        strict: raise on the first unreadable image, sample without label or damaged shard instead of skipping.
        rank: this process's rank.
        world_size: number of ranks.
        seed: base seed of augmentation and shuffling.
        shuffle: shuffle the shard order per epoch (same order on every rank) and samples through a buffer.
        shuffle_buffer: samples held for shuffling per worker.
        classes: class names in label order; default `classes.txt` beside the first shard.
        max_pixels: decompression-bomb guard.
        verify: check the shards against the manifest beside them (see the module notes).
        whole: the shards are meant to be all of the manifest's (a directory): a missing one is an error too.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        transform: Callable | None = None,
        strict: bool = False,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        classes: Sequence[str] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        verify: bool = True,
        whole: bool = False,
    ) -> None:
        super().__init__()
        if not shards:
            raise ValueError("TarShardDataset needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if world_size > len(shards):
            raise ValueError(
                f"{len(shards)} shard(s) cannot be split across {world_size} ranks without overlap; "
                f"write at least {world_size} shards (cvt write-shards --shard-size smaller)"
            )
        self.shards = list(shards)
        self._manifest: dict[str, int] = read_manifest(self.shards, whole=whole) if verify else {}
        self._scans: dict[str, ShardScan] = {}
        self.transform, self.strict = transform, strict
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.max_pixels = max_pixels
        self.epoch = 0
        self.skipped: dict[str, str] = {}
        self._classes = list(classes) if classes is not None else None
        self.epoch_batches: int | None = None
        self.batch_size = 1

    @property
    def classes(self) -> list[str]:
        """Class names in label order: given, from `classes.txt` beside the shards, or "0".."K-1"."""
        if self._classes is None:
            names_file = Path(self.shards[0]).parent / CLASSES_FILE
            if names_file.is_file():
                self._classes = read_class_names(names_file)
            else:
                labels = set().union(*(self.scan(shard).labels for shard in self.shards))
                self._classes = [str(i) for i in range(max(labels) + 1)] if labels else []
        return self._classes

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order, shuffle and augmentation)."""
        self.epoch = int(epoch)

    def rank_shards(self) -> list[tuple[int, str]]:
        """(shard index, path) of the shards this rank reads this epoch."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(sample_seed(self.seed, self.epoch)).shuffle(order)  # identical on every rank
        return [(i, self.shards[i]) for i in order[self.rank :: self.world_size]]

    def set_epoch_length(self, batches: int, batch_size: int) -> None:
        """Yield exactly `batches` batches of `batch_size` samples per epoch on this rank (see the module notes).

        The loader workers share them: worker w of W yields `batches // W` batches, one more if w < batches % W,
        so no worker is left with a partial batch. `batches` must be the same on every rank.
        """
        if batches < 0 or batch_size < 1:
            raise ValueError(f"epoch length {batches} batch(es) of {batch_size} is not valid")
        self.epoch_batches, self.batch_size = int(batches), int(batch_size)

    def total_samples(self) -> int:
        """Samples in all shards (every rank's): the same number on every rank.

        From the manifest, without reading the shards, after a check that costs nothing: a sample takes at least
        `MIN_SAMPLE_BYTES` of tar, so a count the shard's size cannot hold is refused. Reading a shard whole then
        checks its count exactly (an error naming the shard), and `verify` (`cvt check-data`) checks every shard
        before anything runs. Without a manifest, the shards are scanned.

        Raises:
            ValueError: a manifest count that the shard's size cannot hold; the message names the shard.
        """
        if not self._manifest:
            return sum(self.scan(path).samples for path in self.shards)
        for path, count in self._manifest.items():
            most = os.path.getsize(path) // MIN_SAMPLE_BYTES
            if count > most:
                raise ValueError(_count_error(path, f"at most {most}", count))
        return sum(self._manifest.values())

    def verify(self) -> int:
        """Scan every shard (`scan_shard`: its tar headers and labels, not its images) and check it: the manifest's
        count against the samples found, the labels against the classes. Damage is logged as a warning with its
        count (the samples there are lost). Returns the samples found.

        Raises:
            ValueError: a manifest count that the shard does not hold (and no damage explains), or a label that is
                not a class index; the message names the shard (and the sample).
        """
        classes = len(self.classes)
        for path in self.shards:
            scan = self.scan(path)
            if scan.damaged:
                logger.warning("%s: %d damaged stretch(es), the samples there are lost: %s; `cvt check-data` lists "
                               "them", path, len(scan.damaged), "; ".join(scan.damaged))  # fmt: skip
            if self._manifest.get(path, scan.samples) != scan.samples and not scan.damaged:
                raise ValueError(_count_error(path, scan.samples, self._manifest[path]))
            bad = next(((label, key) for label, key in sorted(scan.labels.items()) if not 0 <= label < classes), None)
            if bad is not None:
                raise ValueError(_label_error(path, bad[1], bad[0], classes))
        return sum(self.scan(path).samples for path in self.shards)

    def scan(self, path: str) -> ShardScan:
        """`scan_shard(path)`, once per process."""
        if path not in self._scans:
            self._scans[path] = scan_shard(path)
        return self._scans[path]

    def _worker_plan(self) -> tuple[int, int, list[tuple[int, str]], int]:
        """(worker, workers, shards it reads, stride): a stride n > 1 keeps every n-th sample of the shards."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.rank_shards()
        if len(shards) >= num_workers:
            return worker, num_workers, shards[worker::num_workers], 1
        return worker, num_workers, shards, num_workers  # fewer shards than workers: share them by sample

    def worker_shards(self) -> list[tuple[int, str]]:
        """(shard index, path) of the shards the calling loader worker reads."""
        return self._worker_plan()[2]

    def __len__(self) -> int:
        """Samples this rank yields per epoch: `set_epoch_length`'s, else those in its shards (from the tar headers)."""
        if self.epoch_batches is not None:
            return self.epoch_batches * self.batch_size
        return sum(self.scan(path).samples for _, path in self.rank_shards())

    def _skip(self, name: str, reason: str) -> None:
        if self.strict:
            raise UnreadableImageError(name, reason)
        if name not in self.skipped:
            self.skipped[name] = reason
            logger.warning("skipping %s: %s (strict=True fails instead)", name, reason)

    def _damaged(self, path: str, damaged: list[str]) -> None:
        """Record a shard's damaged stretches in `skipped` (one entry each) and warn once, with their count."""
        new = []
        for note in damaged:
            where, _, what = note.partition(": ")
            name, reason = f"{path} {where}", f"damaged tar data: {what}; the sample stored there is lost"
            if self.strict:
                raise UnreadableImageError(name, reason)
            if name not in self.skipped:
                self.skipped[name] = reason
                new.append(note)
        if new:
            logger.warning("%s: %d damaged stretch(es), the samples stored there are lost: %s (`cvt check-data` "
                           "lists them; strict=True fails instead)", path, len(new), "; ".join(new))  # fmt: skip

    def _samples(self, shards: list[tuple[int, str]], stride: int, worker: int, rep: int) -> Iterator[tuple[Any, int]]:
        """One pass (`rep`, from 0) over `shards`, keeping the samples at positions = worker (mod stride)."""
        for shard_index, path in shards:
            position, images, damaged = 0, 0, []
            try:
                for key, files in iter_tar_samples(path, damaged=damaged):
                    images += any(is_image_file(ext) for ext in files)
                    label = self._label(path, key, files)
                    if label is None:
                        continue
                    position += 1
                    if (position - 1) % stride != worker % stride:
                        continue
                    image = self._decode(path, key, files)
                    if image is None:
                        continue
                    if self.transform is not None:
                        keys = (self.seed, self.epoch, shard_index, position - 1) + ((rep,) if rep else ())
                        with rng_scope(sample_seed(*keys)):
                            image = self.transform(image)
                    yield image, label
            except (tarfile.TarError, OSError, EOFError) as err:
                damaged.append(f"end: damaged shard, stopped reading it ({type(err).__name__}: {err})")
            self._damaged(path, damaged)
            if not damaged and self._manifest.get(path, images) != images:  # a whole pass: the manifest is checked
                raise ValueError(_count_error(path, images, self._manifest[path]))

    def _label(self, path: str, key: str, files: dict[str, Any]) -> int | None:
        """The sample's label, or None (skipped, reported) without an image and a label.

        Raises:
            ValueError: the label is not a class index.
        """
        try:
            label = sample_label(files)
        except ValueError:
            label = None
        if label is None or not any(is_image_file(ext) for ext in files):
            self._skip(f"{path}:{key}", f"sample has members {sorted(files)}; it needs an image and a .cls label")
            return None
        if not 0 <= label < len(self.classes):
            raise ValueError(_label_error(path, key, label, len(self.classes)))
        return label

    def _decode(self, path: str, key: str, files: dict[str, Any]) -> Any:
        """The sample's image, or None (skipped, reported) when it cannot be read."""
        image_ext = next(ext for ext in files if is_image_file(ext))
        try:
            data = files[image_ext]
            if isinstance(data, UnreadableImageError):
                raise data
            return load_image(data, name=f"{path}:{key}.{image_ext}", max_pixels=self.max_pixels)
        except UnreadableImageError as err:
            self._skip(err.path, err.reason)
            return None

    def _stream(self) -> Iterator[tuple[Any, int]]:
        """This worker's samples: one pass, or with an epoch length passes without end (cut by `__iter__`)."""
        worker, num_workers, shards, stride = self._worker_plan()
        for rep in itertools.count():
            found = 0
            for sample in self._samples(shards, stride, worker, rep):
                found += 1
                yield sample
            if self.epoch_batches is None:
                return
            if not found:
                names = ", ".join(path for _, path in shards) or "none"
                raise RuntimeError(
                    f"rank {self.rank} loader worker {worker}/{num_workers}: not one readable sample in its "
                    f"shard(s) ({names}); check them with `cvt check-data`"
                )

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        samples = self._stream()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.epoch_batches is not None:
            share = self.epoch_batches // num_workers + (worker < self.epoch_batches % num_workers)
            quota = share * self.batch_size
            if quota == 0:
                return
        else:
            quota = None
        if self.shuffle and self.shuffle_buffer > 1:
            samples = self._shuffled(samples, worker, min(self.shuffle_buffer, quota or self.shuffle_buffer))
        yield from itertools.islice(samples, quota)

    def _shuffled(self, samples: Iterator[tuple[Any, int]], worker: int, size: int) -> Iterator[tuple[Any, int]]:
        """`samples` through a shuffle buffer of `size` (seeded by epoch, rank and worker)."""
        rng = random.Random(sample_seed(self.seed, self.epoch, self.rank, worker))
        buffer = list(itertools.islice(samples, size))
        for sample in samples:
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __repr__(self) -> str:
        return (
            f"TarShardDataset({len(self.shards)} shards, rank {self.rank}/{self.world_size}, shuffle={self.shuffle}, "
            f"transform={self.transform!r})"
        )


def write_shards(
    samples: Sequence[tuple[str | os.PathLike, int]],
    classes: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    prefix: str = "shard",
    shuffle: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Copy image files (bytes unchanged) into tar shards plus `classes.txt`, under the rule of `cvt.outputs`.

    Args:
        samples: (image file, class index) pairs, e.g. the `samples` of a folder or CSV dataset from `open_dataset`;
            sample i is stored as members `{i:08d}.<ending>` and `{i:08d}.cls`.
        classes: class names in label order.
        out_dir: where the shards go (created).
        shard_size: samples per shard.
        prefix: shard file names are `<prefix>-000000.tar`, ...
        shuffle: shuffle the samples first (a folder lists one class after another, which a shuffle buffer
            cannot mix well).
        seed: seed of that shuffle.
        overwrite: write into a folder that holds files cvt did not write.

    Returns:
        The shard paths, in order. Each shard is written atomically; shards of an earlier write under the same
        prefix that this one does not write again are removed.

    Raises:
        OutputError: `out_dir` is or contains a folder of the images, or holds files cvt did not write (without
            `overwrite`); nothing is written then.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    image_folders = {os.path.dirname(os.path.abspath(file)) for file, _ in samples}  # a few per class, not per image
    check_output(out_dir, sorted(image_folders), folder=True)
    out = claim_folder(out_dir, "write_shards", overwrite=overwrite)
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST_FILE).unlink()  # until the last shard is written, the folder is no dataset
    order = list(range(len(samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    paths = []
    for shard, start in enumerate(range(0, len(order), shard_size)):
        path = out / f"{prefix}-{shard:06d}.tar"
        with atomic_write(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in order[start : start + shard_size]:
                file, label = samples[index]
                ext = Path(file).suffix.lower().lstrip(".") or "img"
                _add_member(tar, f"{index:08d}.{ext}", Path(file).read_bytes())
                _add_member(tar, f"{index:08d}.cls", str(label).encode())
        paths.append(path)
    for stale in set(out.glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar")) - set(paths):
        stale.unlink()  # an earlier write's extra shard, under a name of ours: it would not match the manifest
    counts = [min(shard_size, len(order) - start) for start in range(0, len(order), shard_size)]
    with atomic_write(out / CLASSES_FILE, "w") as f:
        f.write("".join(f"{name}\n" for name in classes))
    _write_manifest(out, paths, counts, list(classes))
    return paths


def _write_manifest(folder: Path, paths: Sequence[Path], counts: Sequence[int], classes: list[str] | None) -> Path:
    shards = {p.name: {"samples": n, "bytes": p.stat().st_size} for p, n in zip(paths, counts, strict=True)}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "classes": classes, "samples": sum(counts), "shards": shards}
    return write_json(manifest, folder / MANIFEST_FILE)


def index_shards(source: str | os.PathLike, classes: Sequence[str] | None = None) -> Path:
    """Write the manifest of complete shards that another tool made (counting each shard's samples once).

    Args:
        source: a directory of `.tar` shards.
        classes: class names in label order, if known (else `classes.txt` or the labels decide when reading).

    Returns:
        The manifest's path.
    """
    folder = Path(source)
    paths = [Path(p) for p in expand_shards(folder)]
    scans = [scan_shard(str(p)) for p in paths]
    for path, scan in zip(paths, scans, strict=True):
        if scan.damaged:
            logger.warning("%s is damaged (%s): the manifest records the %d sample(s) that can be read",
                           path, "; ".join(scan.damaged), scan.samples)  # fmt: skip
    counts = [scan.samples for scan in scans]
    return _write_manifest(folder, paths, counts, list(classes) if classes is not None else None)


def read_manifest(shards: Sequence[str], *, whole: bool = False) -> dict[str, int]:
    """{shard path: samples} from the manifest beside `shards`, which must all be in it with the recorded size.

    Args:
        shards: shard paths (one folder).
        whole: also require every shard the manifest lists.

    Raises:
        ValueError: no manifest, an unreadable one, or shards that disagree with it; the message says what to do.
    """
    folder = Path(shards[0]).parent
    path = folder / MANIFEST_FILE
    redo = "rerun `cvt write-shards` into an empty folder"
    if not path.is_file():
        raise ValueError(
            f"{folder}: no {MANIFEST_FILE} beside the shards, so they may be an unfinished `cvt write-shards` (it "
            f"writes the manifest last): {redo}; shards that another tool made complete can be indexed with "
            f"cvt.data.index_shards({str(folder)!r})"
        )
    try:
        manifest = json.loads(path.read_text("utf-8"))
        listed = {name: (int(v["samples"]), int(v["bytes"])) for name, v in manifest["shards"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable shard manifest ({err}); {redo}") from None
    counts = {}
    for shard in shards:
        name = Path(shard).name
        if Path(shard).parent != folder:
            raise ValueError(f"shards from more than one folder ({folder}, {Path(shard).parent}): use one folder")
        if name not in listed:
            raise ValueError(f"{shard} is not in {path}: the shards and their manifest disagree; {redo}")
        size = Path(shard).stat().st_size
        if size != listed[name][1]:
            raise ValueError(
                f"{shard} has {size} bytes, {path} records {listed[name][1]}: the shard changed or is damaged; {redo}"
            )
        counts[shard] = listed[name][0]
    missing = sorted(set(listed) - {Path(s).name for s in shards}) if whole else []
    if missing:
        raise ValueError(f"{folder} lacks shard(s) {', '.join(missing[:3])} that {path} lists; {redo}")
    return counts


def _count_error(path: str, found: int | str, listed: int) -> str:
    return (
        f"{path} holds {found} sample(s), its manifest {MANIFEST_FILE} records {listed}: the manifest does not "
        "describe these shards; rerun `cvt write-shards` or cvt.data.index_shards"
    )


def _label_error(path: str, key: str, label: int, classes: int) -> str:
    return (
        f"{path} sample {key}: label {label} is not a class index (the dataset has {classes} classes, "
        f"0..{classes - 1}; {CLASSES_FILE} beside the shards names them): the shards and their classes disagree"
    )


def read_class_names(path: Path) -> list[str]:
    """The class names of a `classes.txt`, one per line (blank lines ignored), checked with `check_class_names`."""
    names = [line for line in path.read_text("utf-8").splitlines() if line.strip()]
    check_class_names(names, str(path))
    return names


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed metadata: identical input, identical shard
    tar.addfile(info, io.BytesIO(data))
