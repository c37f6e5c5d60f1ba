"""`cvt list` and `cvt info`: the registered variants, their weights, parameters and GMACs."""

from __future__ import annotations

import argparse

from cvt.config import DataConfig
from cvt.flops import model_cost
from cvt.variants import VARIANTS, model_config, resolve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list", help="list the registered models and their released weights")
    p.add_argument("--res", type=int, nargs="*", default=[224, 384], help="resolutions to count GMACs at")
    p.set_defaults(func=run_list)
    p = subparsers.add_parser("info", help="parameters, GMACs and configuration of one model")
    p.add_argument("model", help="registered name, optionally with a weights tag (cvt_13, cvt_21.in1k_384)")
    p.add_argument("--res", type=int, nargs="+", default=None, help="input size: N or H W (default: the weights')")
    p.set_defaults(func=run_info)


def model_table(resolutions: list[int]) -> str:
    """Markdown table of every variant: parameters and GMACs at each resolution."""
    head = "| model | params | " + " | ".join(f"GMACs @{r}" for r in resolutions) + " | weights (tag: top-1) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, (cfg, tags) in VARIANTS.items():
        macs = [model_cost(cfg, (r, r)) for r in resolutions]
        weights = ", ".join(f"{tag}: {w.top1}" for tag, w in tags.items())
        cells = " | ".join(f"{m / 1e9:.2f}" for _, m in macs)
        lines.append(f"| {name} | {macs[0][0]:,} | {cells} | {weights} |")
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    print(model_table(args.res))
    return 0


def run_info(args: argparse.Namespace) -> int:
    arch, _, tag, weights = resolve(args.model)
    cfg = model_config(args.model)
    data: DataConfig = weights.data
    size = tuple(args.res * 2 if len(args.res) == 1 else args.res[:2]) if args.res else data.input_size
    params, macs = model_cost(cfg, size)
    print(f"model:       {arch}.{tag}")
    print(f"parameters:  {params:,}")
    print(f"GMACs @{size[0]}x{size[1]}: {macs / 1e9:.3f}")
    print(f"weights:     {weights.hf_hub_id} / {weights.official_file} (ImageNet-1k top-1 {weights.top1})")
    print(f"eval data:   {data}")
    print(f"config:      {cfg}")
    return 0
