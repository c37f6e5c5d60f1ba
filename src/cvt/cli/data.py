"""`cvt make-dataset`, `cvt check-data` and `cvt write-shards`: generate, verify and shard image datasets."""

from __future__ import annotations

import argparse
import sys
import time

from cvt.cli.usage import add_overwrite_option
from cvt.data import UnreadableImageError, make_dataset, make_digits, open_dataset, write_shards
from cvt.data.check import check_dataset
from cvt.data.decode import DEFAULT_MAX_PIXELS
from cvt.data.synthetic import MAX_CLASSES
from cvt.outputs import check_output, check_output_folder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-dataset",
        help="draw the generated 'shapes' classification dataset (JPEG and PNG files, train/val class folders), "
        "or write scikit-learn's digits the same way (--kind digits)",
    )
    p.add_argument("dir", help="output directory (empty, new, or made by this command before)")
    p.add_argument(
        "--kind",
        choices=("shapes", "digits"),
        default="shapes",
        help="shapes: the generated dataset (default); digits: scikit-learn's 1,797 8x8 handwritten "
        "digits with a fixed 80/20 split, upscaled (needs scikit-learn; only --size and --overwrite apply)",
    )
    p.add_argument("--classes", type=int, default=10, help=f"number of classes, 2-{MAX_CLASSES} (default 10)")
    p.add_argument("--train-per-class", type=int, default=300, help="training images per class (default 300)")
    p.add_argument("--val-per-class", type=int, default=50, help="validation images per class (default 50)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 64; digits 32)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="drawing processes (default: this process only)")
    p.add_argument("--overwrite", action="store_true", help="replace a generated dataset made with other settings")
    p.set_defaults(func=run_make)

    p = subparsers.add_parser(
        "check-data",
        help="decode every image of a dataset, list unreadable files; exit 1 if there are any, or if the folder "
        "is not laid out as a dataset (loose images beside the class folders, fewer than two classes)",
    )
    p.add_argument("source", help="class folders, a folder with train/ val/, a .csv list, or tar shards")
    p.add_argument("--split", default=None, help="check only this split (default: every split)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: this process only)")
    p.set_defaults(func=run_check)

    p = subparsers.add_parser("write-shards", help="copy a folder or CSV dataset into tar shards (webdataset layout)")
    p.add_argument("source", help="class folders, a folder with train/ val/ (with --split), or a .csv list")
    p.add_argument("out", help="output directory for <prefix>-000000.tar ... and classes.txt")
    p.add_argument("--split", default=None, help="which split of a folder with train/ val/")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order instead of shuffling")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    add_overwrite_option(p)
    p.set_defaults(func=run_write_shards)


def run_make(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.kind == "digits":
        return run_make_digits(args, start)
    args.size = args.size or 64
    root = make_dataset(
        args.dir,
        num_classes=args.classes,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        image_size=args.size,
        seed=args.seed,
        num_workers=args.workers,
        overwrite=args.overwrite,
    )
    train = open_dataset(root, split="train")
    print(f"{root}: {len(train.classes)} classes ({', '.join(train.classes)})")
    print(
        f"train {len(train)} images, val {args.val_per_class * args.classes} images, {args.size}x{args.size} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    return 0


def run_make_digits(args: argparse.Namespace, start: float) -> int:
    root = make_digits(args.dir, image_size=args.size or 32, overwrite=args.overwrite)
    train, val = (open_dataset(root, split=split) for split in ("train", "val"))
    print(f"{root}: scikit-learn's digits, {len(train.classes)} classes ({', '.join(train.classes)})")
    print(f"train {len(train)} images, val {len(val)} images, {args.size or 32}x{args.size or 32} "
          f"({time.perf_counter() - start:.1f}s)")  # fmt: skip
    return 0


def run_check(args: argparse.Namespace) -> int:
    try:
        reports = check_dataset(
            args.source, split=args.split, strict=args.strict, max_pixels=args.max_pixels, workers=args.workers
        )
    except UnreadableImageError as err:
        print(f"unreadable: {err.path}: {err.reason}", file=sys.stderr)
        print("stopped at the first unreadable file (--strict)", file=sys.stderr)
        return 1
    unreadable = [item for report in reports for item in report.unreadable]
    problems = []
    for report in reports:
        title = f"split {report.name}" if report.name else "dataset"
        counts = report.per_class.values()
        balance = f"{min(counts, default=0)}-{max(counts, default=0)} per class" if counts else "none"
        print(f"{title} ({report.kind}): {report.images} readable images, {len(report.classes)} classes ({balance})")
        print(f"  {report.size_summary()}")
        empty = [c for c in report.classes if report.per_class[c] == 0]
        if empty:
            print(f"  classes with no readable image: {', '.join(empty)}")
        if report.ignored:
            print(f"  {len(report.ignored)} file(s) without an image ending ignored, e.g. {report.ignored[0]}")
        problems += [f"{args.source} {title}: {problem}" for problem in report.layout_problems()]
    if unreadable:
        print(f"\n{len(unreadable)} unreadable file(s):")
        for file, reason in unreadable:
            print(f"  {file}: {reason}")
    total = sum(r.images for r in reports)
    print(f"\nsummary: {total + len(unreadable)} files checked, {total} readable, {len(unreadable)} unreadable")
    if problems:
        print("\nnot a classification dataset:", *problems, sep="\n  ")
    return 1 if unreadable or problems else 0


def run_write_shards(args: argparse.Namespace) -> int:
    check_output(args.out, folder=True, datasets=[args.source])
    check_output_folder(args.out, overwrite=args.overwrite)
    dataset = open_dataset(args.source, split=args.split)
    if not hasattr(dataset, "samples"):
        raise ValueError(f"{args.source} is already sharded; write-shards reads class folders or a .csv list")
    shuffle, seed = not args.no_shuffle, args.seed
    paths = write_shards(
        dataset.samples,
        dataset.classes,
        args.out,
        shard_size=args.shard_size,
        prefix=args.prefix,
        shuffle=shuffle,
        seed=seed,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(dataset)} samples of {len(dataset.classes)} classes into {len(paths)} shard(s) in {args.out}")
    return 0
