"""Reading a tar shard member by member: samples grouped by key, a shard's counts and labels, and its damage.

Python's tarfile stops without an error at a damaged member header, so a header damaged mid-shard silently drops
every sample after it. Shards are read here past damaged headers instead (tarfile's `ignore_zeros`, which finds the
next good header) and every stretch of bytes that belongs to no member is named by the index of the member found
after it. A member larger than `decode.DEFAULT_MAX_BYTES` is not read.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from .decode import DEFAULT_MAX_BYTES, UnreadableImageError, check_size, is_image_file

__all__ = ["ShardScan", "iter_tar_samples", "sample_label", "scan_shard"]


def _split_key(name: str) -> tuple[str, str]:
    """Member name -> (key, ending): "dir/000123.seg.png" -> ("dir/000123", "seg.png")."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _members(tar: tarfile.TarFile, damaged: list[str]) -> Iterator[tarfile.TarInfo]:
    """The members of `tar` (opened with `ignore_zeros=True`), noting in `damaged` each stretch of bytes before a
    member that belongs to none: a damaged header that tarfile skipped to find the next good one."""
    end = 0  # where the next member's header should start
    for index, member in enumerate(tar):
        if member.offset != end:
            damaged.append(f"member {index}: bytes {end}-{member.offset} are no tar member (a damaged header)")
        end = tar.offset
        yield member


def _truncated(path: str, tar: tarfile.TarFile, damaged: list[str]) -> None:
    size = os.path.getsize(path)
    if tar.offset > size:
        damaged.append(f"the last member runs {tar.offset - size} bytes past the end of the file (truncated)")


def iter_tar_samples(
    path: str, *, damaged: list[str] | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> Iterator[tuple[str, dict[str, bytes | UnreadableImageError]]]:
    """(key, {ending: bytes}) for each sample of a shard, streamed in member order.

    Args:
        path: the shard.
        damaged: if given, collects a description of each damaged stretch read past (see the module notes).
        max_bytes: a member larger than this is not read: its entry is an `UnreadableImageError` instead.

    Raises:
        tarfile.TarError or OSError: the shard is unreadable or ends early (samples before the damage are yielded).
    """
    key, files = None, {}
    with tarfile.open(path, mode="r|*", ignore_zeros=True) as tar:
        for member in _members(tar, damaged if damaged is not None else []):
            if not member.isfile() or member.name.rpartition("/")[2].startswith("."):
                continue
            member_key, ext = _split_key(member.name)
            if member_key != key:
                if key is not None:
                    yield key, files
                key, files = member_key, {}
            try:
                check_size(f"{path}:{member.name}", member.size, max_bytes)
                files[ext] = tar.extractfile(member).read()
            except UnreadableImageError as err:
                files[ext] = err
    if key is not None:
        yield key, files


def sample_label(files: dict[str, bytes | UnreadableImageError]) -> int | None:
    """The class index in a sample's `.cls` member, None without one.

    Raises:
        ValueError: the member does not hold an integer.
    """
    data = files.get("cls")
    if not isinstance(data, bytes):
        return None
    return int(data.decode("utf-8").strip())


@dataclass
class ShardScan:
    """What one shard holds, read from its tar headers and `.cls` members (not its images).

    Attributes:
        samples: keys with an image member.
        labels: each label found -> the first sample key that carries it.
        damaged: the damaged stretches (see the module notes).
    """

    samples: int = 0
    labels: dict[int, str] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)


def scan_shard(path: str) -> ShardScan:
    """Count a shard's samples and collect its labels, reading past damage (which `damaged` lists)."""
    scan, keys = ShardScan(), set()
    try:
        with tarfile.open(path, mode="r", ignore_zeros=True) as tar:
            for member in _members(tar, scan.damaged):
                if not member.isfile() or member.name.rpartition("/")[2].startswith("."):
                    continue
                key, ext = _split_key(member.name)
                if is_image_file(ext):
                    keys.add(key)
                elif ext == "cls" and member.size <= 64:
                    with contextlib.suppress(ValueError):  # reading the sample reports it
                        scan.labels.setdefault(int(tar.extractfile(member).read().decode("utf-8").strip()), key)
            _truncated(path, tar, scan.damaged)
    except (tarfile.TarError, OSError, EOFError) as err:
        scan.damaged.append(f"unreadable after {len(keys)} sample(s) ({type(err).__name__}: {err})")
    scan.samples = len(keys)
    return scan
