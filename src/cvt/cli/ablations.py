"""`cvt ablations`: the paper's ablation tables, with parameters and GMACs from our counter beside the paper's."""

from __future__ import annotations

import argparse

from cvt.ablations import (
    ABLATIONS,
    BASELINE,
    PAPER_TABLES,
    ablation_config,
    get_ablation,
    paper_rows,
    train_overrides,
)
from cvt.flops import model_cost


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ablations",
        help="the paper's ablations of CvT-13: our parameter/GMAC counts beside the paper's figures",
        description="One line per row of the paper's ablation tables (Tables 5-8), CvT-13 at the given input size. "
        "Params and GMACs are counted here (meta device); paper figures are as printed, '-' where the table has none. "
        "Deltas are against the CvT-13 baseline: ours for params/GMACs, the table's own baseline row for top-1.",
    )
    p.add_argument("--input-size", "--res", dest="input_size", type=int, default=224, metavar="N",
                   help="input size to count at (square; default 224)")  # fmt: skip
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these ablations (default: all)")
    p.add_argument(
        "--train-commands",
        action="store_true",
        help="print the `cvt train` command of each ablation (the paper's ImageNet recipe) instead of the table",
    )
    p.set_defaults(func=run)


def _fmt(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _signed(value: float, spec: str) -> str:
    return "0" if value == 0 else format(value, "+" + spec)


def ablation_table(res: int = 224, only: list[str] | None = None) -> str:
    """Markdown table of the paper's ablation rows with our counts at `res` x `res` and the paper's figures."""
    names = [a.name for a in ABLATIONS] if only is None else [BASELINE, *(get_ablation(n).name for n in only)]
    costs = {n: model_cost(ablation_config(n, input_size=(res, res)), (res, res)) for n in {BASELINE, *names}}
    base_params, base_macs = costs[BASELINE]
    head = (
        f"| table | row | paper setting | ablation | params | Δ params | GMACs @{res} | Δ GMACs | spec GMACs "
        "| paper params (M) | paper GFLOPs | paper top-1 | Δ top-1 (paper) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def line(table: str, row: str, label: str, name: str, spec: float | None, pm, gf, top1, dtop1) -> str:
        params, macs = costs[name]
        return (
            f"| {table} | {row} | {label} | {name} | {params:,} | {_signed(params - base_params, ',')} "
            f"| {macs / 1e9:.2f} | {_signed((macs - base_macs) / 1e9, '.2f')} | {_fmt(spec)} "
            f"| {_fmt(pm)} | {_fmt(gf)} | {_fmt(top1)} | {dtop1} |"
        )

    for table in PAPER_TABLES:
        rows = paper_rows(table)
        base_top1 = next((r.top1 for r, a in rows if a.name == BASELINE), None)
        for row, ablation in rows:
            if ablation.name not in names:
                continue
            dtop1 = "-" if row.top1 is None or base_top1 is None else _signed(round(row.top1 - base_top1, 1), ".1f")
            spec = ablation.spec_gmacs if res == 224 else None
            lines.append(
                line(table, row.row, row.label, ablation.name, spec, row.params_m, row.gflops, row.top1, dtop1)
            )
    for ablation in ABLATIONS:
        if not ablation.paper and ablation.name in names:
            lines.append(line("-", "-", ablation.note, ablation.name, None, None, None, None, "-"))
    return "\n".join(lines)


def train_commands(only: list[str] | None = None, data: str = "/data/imagenet") -> str:
    """One `cvt train` command per ablation: the paper's CvT-13 recipe with the ablation's model overrides."""
    lines = []
    for ablation in ABLATIONS:
        if only is not None and ablation.name not in (BASELINE, *only):
            continue
        flags = " ".join(train_overrides(ablation.name))
        lines.append(f"# {ablation.name}: {ablation.description}")
        lines.append(
            f"torchrun --nproc-per-node 8 -m cvt train --config cvt_13_224 --data {data} "
            f"--output runs/ablations/{ablation.name}" + (f" {flags}" if flags else "")
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for name in args.only or []:
        get_ablation(name)
    if args.train_commands:
        print(train_commands(args.only))
        return 0
    print(ablation_table(args.input_size, args.only))
    print(
        "\nParams: trainable (position embeddings laid out for the counted size). GMACs: convolutions, linear layers"
        " and both attention matmuls, as the spec counts them; the paper's 'FLOPs' are the same quantity (MACs)."
    )
    notes = [
        f"- {a.name}: {a.note}" for a in ABLATIONS if a.note and a.paper and (not args.only or a.name in args.only)
    ]
    if notes:
        print("Notes:\n" + "\n".join(notes))
    return 0
