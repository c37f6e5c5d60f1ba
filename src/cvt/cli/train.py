"""`cvt train`: run a training config (a shipped one by name, or a file), or fine-tune a model with `--model`, on one
process or under torchrun; `cvt configs`: the shipped configs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from cvt.cli.usage import DeviceAction, UsageError, add_overwrite_option
from cvt.train import (
    PREEMPTED_EXIT_CODE,
    FineTuneStart,
    TrainConfig,
    apply_overrides,
    load_config,
    load_config_module,
    parse_overrides,
    plan_finetune,
    read_resume_checkpoint,
    resolve_resume,
    shipped_configs,
    train,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a config file, or fine-tune one (runs data-parallel under torchrun)",
        description="Train a CvT with a config: a shipped one by name (`cvt configs` lists them) or a file; or "
        "fine-tune a checkpoint or released model with --model and the fine-tuning defaults (cvt.train.finetune: "
        "SGD, a low learning rate, a short warm-up, the schedule sized to the dataset). Under "
        "`torchrun --nproc-per-node N` the same command runs data-parallel (DDP; --set fsdp=True shards the model).",
        epilog=_fields_help(),
    )
    p.add_argument("--config", help="config file, or the name of a shipped one (e.g. cvt_13_224, demo; `cvt configs`)")
    p.add_argument("--model", metavar="NAME_OR_PATH",
                   help="fine-tune this checkpoint (any format) or registered name[.tag]; without --config the "
                   "fine-tuning defaults apply, with --config it sets the config's init")  # fmt: skip
    p.add_argument("--data", help="dataset (overrides the config's `data`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (listed below), e.g. --set epochs=10 --set model_kwargs.drop_path_rate=0.2; "
        "--set pretrained=false starts --model NAME from random weights (offline)",
    )
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="resume from a checkpoint or run directory (default: OUTPUT/last.pt); without --config the "
                   "run's own config is used")  # fmt: skip
    p.add_argument("--output", help="run directory (overrides the config's `output`)")
    add_overwrite_option(p)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), action=DeviceAction, default=None,
                   help="where to train (overrides the config's `device`; auto: CUDA when available)")  # fmt: skip
    p.set_defaults(func=run)

    p = subparsers.add_parser("configs", help="list the shipped training configs with the paper's figures",
                              description="The configs shipped with the package, usable by name from any "
                              "directory: `cvt train --config NAME`.")  # fmt: skip
    p.set_defaults(func=run_configs)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the arguments describe; the options' values travel typed, `--set`'s are parsed once."""
    return _plan(args)[0]


def _plan(args: argparse.Namespace) -> tuple[TrainConfig, FineTuneStart | None]:
    """`build_config`'s config, and what fine-tuning planning read for `train` to build from (or None)."""
    start = None
    extra = parse_overrides(args.overrides)
    extra.update({k: v for k, v in (("data", args.data), ("output", args.output), ("device", args.device)) if v})
    if args.overwrite:
        extra["overwrite"] = True
    if args.config:
        cfg = load_config(args.config, {**extra, **({"init": args.model} if args.model else {})})
    elif args.model:
        if not args.data:
            raise UsageError("--model needs --data DIR: the dataset to fine-tune on")
        cfg, start = plan_finetune(args.model, args.data, extra)
    elif args.resume:
        output = args.output or ("." if args.resume == "auto" else None)
        path = resolve_resume(args.resume, output or ".")
        saved = read_resume_checkpoint(path)[1]["train_config"]
        # continue where the run stopped: its own max_steps would stop it again at once
        saved.update(max_steps=None, output=str(args.output or path.parent))
        cfg = apply_overrides(TrainConfig.from_dict(saved), extra)
    else:
        raise UsageError("pass --config, --model with --data, or --resume with a checkpoint")
    if args.resume:
        cfg = apply_overrides(cfg, {"resume": args.resume})
    return cfg, start


def _fields_help() -> str:
    """The `--set` fields with their defaults, for `cvt train --help`."""
    fields = [f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f"{f.name}={{...}}"
              for f in dataclasses.fields(TrainConfig)]  # fmt: skip
    return "fields of --set KEY=VALUE, with the defaults (the paper's CvT-13 recipe; cvt.train.TrainConfig): " + (
        ", ".join(fields)
    )


def run(args: argparse.Namespace) -> int:
    cfg, start = _plan(args)
    summary = train(cfg, start=start)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    if summary.get("preempted"):  # stopped by SIGTERM/SIGUSR1 with the state saved: a scheduler re-queues it
        return PREEMPTED_EXIT_CODE
    return 0


def run_configs(args: argparse.Namespace) -> int:
    print("| config | model | input | epochs | paper |")
    print("|---|---|---|---|---|")
    for name in shipped_configs():
        module = load_config_module(name)
        cfg = module.get_config()
        print(f"| {name} | {cfg.model} | {cfg.input_size} | {cfg.epochs} | {module.PAPER_RESULT} |")
    return 0
