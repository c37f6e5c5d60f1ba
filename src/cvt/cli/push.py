"""`cvt push --model NAME_OR_PATH REPO_ID`: publish a model on the Hugging Face hub, with its model card.

cvt push --model runs/flowers/best.pt me/cvt-13-flowers            # the run's best top-1/top-5 go into the card
cvt push --model runs/demo/best.pt me/cvt-demo --format cvt         # our format: any architecture
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cvt.checkpoint import read_checkpoint
from cvt.factory import model_from_checkpoint, resolve_model
from cvt.publish import push_to_hub


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="publish a model on the Hugging Face hub (weights, config, image processor, model card)",
        description="Save the model with its model card into a temporary folder and upload it to the hub repository "
        "REPO_ID (created if missing) with huggingface_hub; a training checkpoint's best validation results go "
        "into the card. Needs a hub token (HF_TOKEN, or `hf auth login`).",
    )
    p.add_argument("--model", required=True, help="checkpoint path (any format) or registered name[.tag]")
    p.add_argument("repo_id", metavar="REPO_ID", help="hub repository, user/name or org/name")
    p.add_argument("--format", choices=("hf", "cvt"), default="hf",
                   help="hf: a transformers folder, which pipeline() and the hub run (default); cvt: ours")  # fmt: skip
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = None
    if Path(args.model).expanduser().exists():
        ckpt = read_checkpoint(args.model)
        model, results = model_from_checkpoint(ckpt), ckpt.results
    else:
        model = resolve_model(args.model)
    url = push_to_hub(model, args.repo_id, format=args.format, results=results, private=args.private,
                      revision=args.revision, commit_message=args.message)  # fmt: skip
    print(f"pushed {model.model_name} ({args.format} format) to {args.repo_id}: {url}")
    return 0
