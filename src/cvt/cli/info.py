"""`cvt list` and `cvt info`: the registered variants, their weights, parameters and GMACs."""

from __future__ import annotations

import argparse
import sys

from cvt.cli.usage import UsageError, add_input_size_option
from cvt.config import DataConfig
from cvt.flops import model_cost
from cvt.variants import VARIANTS, model_config, precomputed_cost, resolve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list", help="list the registered models and their released weights")
    p.add_argument("--input-size", "--res", dest="input_size", type=int, nargs="*", default=[224, 384],
                   metavar="N", help="square input sizes, one GMACs column each (default: 224 384)")  # fmt: skip
    p.set_defaults(func=run_list)
    p = subparsers.add_parser("info", help="parameters, GMACs and configuration of one model")
    p.add_argument("--model", help="registered name, optionally with a weights tag (cvt_13, cvt_21.in1k_384)")
    p.add_argument("model_positional", nargs="?", metavar="MODEL", help="deprecated spelling of --model")
    add_input_size_option(p, "input size (default: the weights')")
    p.set_defaults(func=run_info)


def model_table(resolutions: list[int]) -> str:
    """Markdown table of every variant: parameters and GMACs at each resolution."""
    head = "| model | params | " + " | ".join(f"GMACs @{r}" for r in resolutions) + " | weights (tag: top-1) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, (cfg, tags) in VARIANTS.items():
        macs = [precomputed_cost(name, r) or model_cost(cfg, (r, r)) for r in resolutions]
        weights = ", ".join(f"{tag}: {w.top1}" for tag, w in tags.items())
        cells = " | ".join(f"{m / 1e9:.2f}" for _, m in macs)
        lines.append(f"| {name} | {macs[0][0]:,} | {cells} | {weights} |")
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    print(model_table(args.input_size))
    return 0


def run_info(args: argparse.Namespace) -> int:
    if args.model and args.model_positional:
        raise UsageError("give the model once: --model NAME")
    if args.model_positional:
        print(f"cvt info: the positional MODEL is deprecated, use --model {args.model_positional}", file=sys.stderr)
    name = args.model or args.model_positional
    if not name:
        raise UsageError("pass --model NAME (a registered name, e.g. cvt_13 or cvt_21.in1k_384)")
    arch, _, tag, weights = resolve(name)
    cfg = model_config(name)
    data: DataConfig = weights.data
    size = args.input_size or data.input_size
    square = precomputed_cost(arch, size[0]) if size[0] == size[1] else None
    params, macs = square or model_cost(cfg, size)
    print(f"model:       {arch}.{tag}")
    print(f"parameters:  {params:,}")
    print(f"GMACs @{size[0]}x{size[1]}: {macs / 1e9:.3f}")
    print(f"weights:     {weights.hf_hub_id} / {weights.official_file} (ImageNet-1k top-1 {weights.top1})")
    print(f"eval data:   {data}")
    print(f"config:      {cfg}")
    return 0
