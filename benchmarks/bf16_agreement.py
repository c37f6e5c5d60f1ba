"""Top-1 agreement of `optimize_for_inference(model, dtype=torch.bfloat16 or "int8")` with the float32 model.

    .venv/bin/python benchmarks/bf16_agreement.py --model runs/demo-<date>/best.pt --data data/demo
    .venv/bin/python benchmarks/bf16_agreement.py --model best.pt --data data/demo --calibration data/demo/train

With `--calibration DIR` (images, e.g. the training split: up to 300 are used) it adds OpenVINO's bfloat16 and its
NNCF int8 model calibrated on them (`pip install 'cvt-pytorch[openvino]'`).

Evaluates the split with the model's own evaluation transform and prints top-1 for the plain float32 model, the
optimized float32 model and the optimized bfloat16 model, how often their top-1 agrees with the plain model's, and
the largest logit difference. Runs on any CPU: without native bf16 kernels (AVX512-BF16/AMX) it is slower than
float32, but computes the same bfloat16 numbers.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import cvt
from cvt.evaluate import open_eval_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint path (any format) or registered name[.tag]")
    parser.add_argument("--data", required=True, help="dataset folder (its val/ split when it has one)")
    parser.add_argument("--split", default=None)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--calibration", help="folder of images to calibrate OpenVINO's int8 model on")
    args = parser.parse_args(argv)

    model = cvt.resolve_model(args.model).eval()
    dataset = open_eval_dataset(model, args.data, split=args.split)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-native-bf16 warning: expected here
        fast = {"fp32-opt": cvt.optimize_for_inference(model),
                "bf16-opt": cvt.optimize_for_inference(model, dtype=torch.bfloat16)}  # fmt: skip
        if args.calibration:
            fast["bf16-ov"] = cvt.optimize_for_inference(model, torch.bfloat16, backend="openvino")
            fast["int8-ov"] = cvt.optimize_for_inference(
                model, "int8", backend="openvino", calibration=args.calibration, batch_size=args.batch_size
            )
    labels, outputs = [], {"fp32": [], **{name: [] for name in fast}}
    with torch.inference_mode():
        for x, y in loader:
            labels.append(y)
            outputs["fp32"].append(model(x))
            for name, m in fast.items():
                outputs[name].append(m(x))
    y = torch.cat(labels)
    logits = {name: torch.cat(out) for name, out in outputs.items()}
    ref = logits["fp32"]
    print(f"{args.model} on {len(y)} images of {args.data}")
    for name, out in logits.items():
        top1 = (out.argmax(1) == y).float().mean().item() * 100
        agree = (out.argmax(1) == ref.argmax(1)).float().mean().item() * 100
        diff = (out - ref).abs().max().item()
        print(f"  {name:9s} top-1 {top1:6.2f}%   agrees with fp32 on {agree:6.2f}%   max |logit diff| {diff:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
