"""`cvt convert SRC DST --to {cvt,hf,official}`: rewrite a checkpoint in another format, weights unchanged.

cvt convert CvT-13-224x224-IN-1k.pth cvt13/ --to hf     # the authors' file -> a transformers folder
cvt convert microsoft-cvt-13/ CvT-13.pth --to official  # a transformers folder -> the authors' layout
"""

from __future__ import annotations

import argparse

from cvt.checkpoint import SAVE_FORMATS, checkpoint_files, read_checkpoint, save_model
from cvt.cli.usage import DeprecatedAlias, UsageError, add_overwrite_option
from cvt.factory import create_model, model_from_checkpoint
from cvt.outputs import check_output, check_output_folder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between the authors', Hugging Face and cvt formats",
        description="Read any supported checkpoint (format detected from the content) and write it in another.",
    )
    p.add_argument("src", help="checkpoint file or folder: the authors' .pth, a Hugging Face CvT folder, cvt's own")
    p.add_argument("dst", help="output: a folder for --to cvt/hf, a file for --to official")
    p.add_argument("--to", required=True, choices=SAVE_FORMATS, help="output format")
    p.add_argument(
        "--arch",
        "--model",
        action=DeprecatedAlias,
        old="--model",  # everywhere else --model is the model to use, here it only names an architecture
        default=None,
        help="architecture as a registered name (cvt_13, cvt_21.in1k_384) when SRC does not record it; "
        "default: read from SRC or inferred from its weights",
    )
    p.add_argument("--ema", action="store_true", help="from a training checkpoint, convert the EMA weights")
    add_overwrite_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = args.to != "official"
    check_output(args.dst, checkpoint_files(args.src), folder=folder, suggest="model.pth")
    if folder:
        check_output_folder(args.dst, overwrite=args.overwrite)
    if args.arch:
        if args.ema:
            raise UsageError("--ema reads a training checkpoint, which records its architecture: drop --arch")
        model = create_model(args.arch, pretrained=args.src)
        results = None
    else:
        ckpt = read_checkpoint(args.src, ema=args.ema)
        model, results = model_from_checkpoint(ckpt), ckpt.results  # a training run's results go into the model card
    path = save_model(model, args.dst, format=args.to, results=results, overwrite=args.overwrite)
    tensors = len(model.state_dict())
    print(f"wrote {path} ({args.to}): {model.model_name}, {model.num_classes} classes, {tensors} tensors")
    return 0
