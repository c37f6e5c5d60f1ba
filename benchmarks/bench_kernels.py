"""The kernels a CvT forward is made of, timed alone at the model's own shapes: how fast the model could be here.

    .venv/bin/python benchmarks/bench_kernels.py                     # CvT-13 at 224, batch 1 and 32 (~3 min)
    .venv/bin/python benchmarks/bench_kernels.py --model cvt_21 --batch 32

- Linear layers: every (rows, in, out) matrix product of the model's blocks (q, k and v projections, output
  projection, fc1, fc2; k and v read the strided-pooled tokens), timed with `torch.addmm` as `nn.Linear` runs it
  (MKL here), with oneDNN on a prepacked weight (`torch.ops.mkldnn._linear_pointwise`, what `torch.compile` with
  freezing emits) and with MKL on a prepacked weight (`torch.ops.mkl._mkl_linear`). GFLOP/s beside the
  2048x2048 square product's best rate. "forward" is the time all of a forward's products take at the best
  rate measured for each shape: no implementation of the model can spend less on its linear layers.
- Attention: each stage's `scaled_dot_product_attention` (the fused flash kernel) against the explicit product,
  softmax, product, at inference and with its backward pass (what a training step runs).
- Blocks: the first block of each stage, ours against transformers' layer holding the same weights, in train mode,
  forward alone and with its backward pass: how each implementation's block compares with its kernels above.

Every call is timed in alternation with the others of its row, warm, with freed memory kept
(`cvt.allocator.keep_freed_memory`) so that no variant pays page faults; medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from bench_models import build, machine, matmul_gflops  # this directory is on sys.path when run as a script
from torch import nn

import cvt
from cvt.allocator import keep_freed_memory
from cvt.model import conv_out_size, stage_grid


def median_seconds(fns: dict[str, Callable[[], object]], min_seconds: float = 0.3) -> dict[str, float]:
    """Median seconds per call of each function, called in alternation until each has run ~`min_seconds`."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while min(sum(t) for t in times.values()) < min_seconds or min(len(t) for t in times.values()) < 5:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def stage_shapes(name: str, batch: int, size: int) -> list[dict[str, int]]:
    """Per stage: depth, width, heads, token grid, query rows and key/value rows (class token included)."""
    cfg = cvt.model_config(name)
    stages = []
    for i in range(cfg.num_stages):
        h, w = stage_grid(cfg, i, (size, size))
        kq, skv = cfg.qkv_kernel[i], cfg.stride_kv[i]
        hkv, wkv = conv_out_size(h, kq, skv, kq // 2), conv_out_size(w, kq, skv, kq // 2)
        cls = int(cfg.cls_token[i])
        stages.append(
            {
                "depth": cfg.depths[i],
                "dim": cfg.dims[i],
                "hidden": int(cfg.dims[i] * cfg.mlp_ratio[i]),
                "heads": cfg.heads[i],
                "grid": (h, w),
                "tokens": h * w + cls,
                "kv_tokens": hkv * wkv + cls,
                "batch": batch,
                "cls": cls,
            }
        )
    return stages


def linear_rows(stages: list[dict[str, int]]) -> list[tuple[int, int, int, int]]:
    """(rows, in, out, calls per forward) of every linear layer in the blocks."""
    counts: dict[tuple[int, int, int], int] = {}

    def add(rows: int, kv_rows: int, c: int, hidden: int, blocks: int) -> None:
        for shape, calls in (((rows, c, c), 2), ((kv_rows, c, c), 2), ((rows, c, hidden), 1), ((rows, hidden, c), 1)):
            counts[shape] = counts.get(shape, 0) + calls * blocks

    for i, st in enumerate(stages):
        b, c, hidden = st["batch"], st["dim"], st["hidden"]
        # with a class token, the model's last block computes the class token's row alone (the head reads nothing
        # else): its q, output projection and MLP see `batch` rows
        last_rows_only = i == len(stages) - 1 and st["cls"] and st["depth"] > 0
        full = st["depth"] - int(last_rows_only)
        add(b * st["tokens"], b * st["kv_tokens"], c, hidden, full)
        if last_rows_only:
            add(b, b * st["kv_tokens"], c, hidden, 1)
    return [(*shape, calls) for shape, calls in counts.items()]


def time_linear(rows: int, k: int, n: int) -> dict[str, float]:
    """Seconds per (rows, k) x (k, n) product with bias, three ways."""
    x, weight, bias = torch.randn(rows, k), torch.randn(n, k) * 0.05, torch.randn(n)
    onednn = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    mkl = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return median_seconds(
        {
            "torch": lambda: torch.addmm(bias, x, weight.t()),
            "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, bias, "none", [], ""),
            "mkl": lambda: torch.ops.mkl._mkl_linear(x, mkl, weight, bias, rows),
        }
    )


def bench_linear(stages: list[dict[str, int]], peak: float) -> str:
    lines = [
        "| rows x in -> out | calls | torch (addmm) | oneDNN prepacked | MKL prepacked |",
        "|---|---|---|---|---|",
    ]
    best_total = torch_total = 0.0
    for rows, k, n, calls in linear_rows(stages):
        seconds = time_linear(rows, k, n)
        flop = 2 * rows * k * n
        rates = " | ".join(f"{flop / s / 1e9:.0f} GFLOP/s" for s in seconds.values())
        lines.append(f"| {rows} x {k} -> {n} | {calls} | {rates} |")
        torch_total += calls * seconds["torch"]
        best_total += calls * min(seconds.values())
    lines.append(
        f"\nmatmul peak (2048x2048, best of 20): {peak:.0f} GFLOP/s. All linear layers of one forward: "
        f"{torch_total * 1e3:.1f} ms with torch's addmm, {best_total * 1e3:.1f} ms at the best rate per shape."
    )
    return "\n".join(lines)


def time_attention(batch: int, heads: int, head_dim: int, tokens: int, kv_tokens: int, scale: float) -> dict:
    """Seconds per call of the fused and the explicit attention, forward alone and with the backward pass."""

    def layout(n: int) -> torch.Tensor:  # (B, heads, n, head_dim) as the projections lay it out
        return torch.randn(batch, n, heads * head_dim).unflatten(-1, (heads, head_dim)).transpose(1, 2)

    q, k, v = layout(tokens), layout(kv_tokens), layout(kv_tokens)
    grad = torch.randn(batch, heads, tokens, head_dim)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.matmul((torch.matmul(q, k.transpose(-2, -1)) * scale).softmax(-1), v)

    def forward(fn: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return fn(q, k, v)

        return run

    def training(fn: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            for leaf in leaves:
                leaf.grad = None
            fn(*leaves).backward(grad)

        return run

    return median_seconds(
        {
            "flash": forward(flash),
            "explicit": forward(explicit),
            "flash_train": training(flash),
            "explicit_train": training(explicit),
        }
    )


def bench_attention(stages: list[dict[str, int]]) -> str:
    lines = [
        "| stage | q x kv tokens, heads | flash, forward | explicit, forward | flash, fwd+bwd | explicit, fwd+bwd |",
        "|---|---|---|---|---|---|",
    ]
    for i, st in enumerate(stages):
        heads, scale = st["heads"], st["dim"] ** -0.5  # the authors' scale: the full width
        seconds = time_attention(st["batch"], heads, st["dim"] // heads, st["tokens"], st["kv_tokens"], scale)
        times = " | ".join(f"{s * 1e3:.2f} ms" for s in seconds.values())
        lines.append(f"| {i + 1} | {st['tokens']} x {st['kv_tokens']}, {heads} | {times} |")
    return "\n".join(lines)


def time_block(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[float, float]:
    """Seconds for one block's forward, and for its forward and backward, on tokens `x`."""
    leaf, grad = x.detach().requires_grad_(), torch.randn_like(x)

    def forward() -> object:
        with torch.no_grad():
            return block(x)

    def training() -> None:
        leaf.grad = None
        block(leaf).backward(grad)

    seconds = median_seconds({"forward": forward, "training": training})
    return seconds["forward"], seconds["training"]


def bench_blocks(ours: nn.Module, hf: nn.Module, stages: list[dict[str, int]]) -> str:
    """The first block of each stage, ours against transformers' layer on the same weights (both in train mode)."""
    lines = [
        "| stage | tokens x width | ours, forward | transformers, forward | ours, fwd+bwd | transformers, fwd+bwd |",
        "|---|---|---|---|---|---|",
    ]
    for i, st in enumerate(stages):
        (h, w), ours_block, hf_layer = st["grid"], ours.stages[i].blocks[0], hf.cvt.encoder.stages[i].layers[0]
        x = torch.randn(st["batch"], st["tokens"], st["dim"])
        times = time_block(partial(ours_block, hw=(h, w)), x) + time_block(partial(hf_layer, height=h, width=w), x)
        cells = " | ".join(f"{s * 1e3:.1f} ms" for s in (times[0], times[2], times[1], times[3]))
        lines.append(f"| {i + 1} | {st['tokens']} x {st['dim']} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not keep_freed_memory():
        raise SystemExit("bench_kernels needs glibc's mallopt (cvt.allocator.keep_freed_memory)")
    print(f"machine: {machine()}\n")
    peak = matmul_gflops(torch.float32)
    ours = build("ours", args.model, torch.float32, {}, train=True)
    hf = build("hf", args.model, torch.float32, {}, train=True)
    for batch in args.batch:
        stages = stage_shapes(args.model, batch, args.size)
        print(f"### {args.model}, batch {batch}, {args.size}x{args.size}, float32: linear layers\n")
        print(bench_linear(stages, peak), end="\n\n", flush=True)
        print(f"### {args.model}, batch {batch}: attention per block\n")
        print(bench_attention(stages), end="\n\n", flush=True)
        print(f"### {args.model}, batch {batch}: one block, train mode (BatchNorm batch statistics, drop path)\n")
        print(bench_blocks(ours, hf, stages), end="\n\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
