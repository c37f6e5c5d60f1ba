"""`cvt train`: run a training config (configs/*.py), on one process or under torchrun."""

from __future__ import annotations

import argparse
import json
import os

from cvt.checkpoint import read_training_checkpoint
from cvt.train import PREEMPTED_EXIT_CODE, TrainConfig, apply_overrides, load_config, resolve_resume, train


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a config file (runs data-parallel under torchrun)",
        description="Train a CvT with a config from configs/. Under `torchrun --nproc-per-node N` the same "
        "command runs data-parallel (DDP; --set fsdp=True shards the model).",
    )
    p.add_argument("--config", help="config file, or the name of one in configs/ (e.g. cvt_13_224, demo)")
    p.add_argument("--data", help="dataset (overrides the config's `data`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set epochs=10 --set model_kwargs.drop_path_rate=0.2",
    )
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="resume from a checkpoint or run directory (default: OUTPUT/last.pt); without --config the "
                   "run's own config is used")  # fmt: skip
    p.add_argument("--output", help="run directory (overrides the config's `output`)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the arguments describe."""
    extra = list(args.overrides)
    if args.data:
        extra.append(f"data={args.data!r}")
    if args.output:
        extra.append(f"output={args.output!r}")
    if args.config:
        cfg = load_config(args.config, extra)
    elif args.resume:
        output = args.output or ("." if args.resume == "auto" else None)
        path = resolve_resume(args.resume, output or ".")
        saved = read_training_checkpoint(path)["train_config"]
        # continue where the run stopped: its own max_steps would stop it again at once
        saved.update(max_steps=None, output=str(args.output or path.parent))
        cfg = apply_overrides(TrainConfig.from_dict(saved), extra)
    else:
        raise ValueError("pass --config (or --resume with a checkpoint)")
    if args.resume:
        cfg = apply_overrides(cfg, [f"resume={args.resume!r}"])
    return cfg


def run(args: argparse.Namespace) -> int:
    summary = train(build_config(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    if summary.get("preempted"):  # stopped by SIGTERM/SIGUSR1 with the state saved: a scheduler re-queues it
        return PREEMPTED_EXIT_CODE
    return 0
