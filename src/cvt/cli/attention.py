"""`cvt attention`: the class token's last-block attention, per head and averaged, overlaid on an image."""

from __future__ import annotations

import argparse

from cvt.attention_map import class_token_attention, denormalize, plot_attention, top_predictions
from cvt.checkpoint import checkpoint_files
from cvt.cli.usage import DeviceAction
from cvt.data import create_eval_transform, load_image
from cvt.factory import resolve_model
from cvt.outputs import check_output


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("attention", help="plot where the class token attends in the last block")
    p.add_argument("--model", required=True, help="checkpoint path (any format) or registered name[.tag]")
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--output", required=True, help="figure to write (.png)")
    p.add_argument("--topk", type=int, default=3, help="predictions shown in the title (default 3)")
    p.add_argument("--device", action=DeviceAction, default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, [args.image, *checkpoint_files(args.model)], folder=False, suggest="attention.png")
    model = resolve_model(args.model).to(args.device)
    data_config = model.data_config
    image = create_eval_transform(data_config)(load_image(args.image))  # (3, H, W), normalised
    result = class_token_attention(model, image[None].to(args.device))
    predictions = top_predictions(result.logits[0], model.class_names, args.topk)
    title = "  ".join(f"{label}: {prob:.1%}" for label, prob in predictions)
    plot_attention(denormalize(image, data_config.mean, data_config.std), result.maps[0], args.output, title=title)
    hk, wk = result.key_grid
    print(f"{args.image}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in predictions))
    print(
        f"class-token attention of the last block: {result.maps.shape[1]} heads over {hk}x{wk} keys "
        f"(+ its own key, mean weight {float(result.to_class_token[0].mean()):.3f}); wrote {args.output}"
    )
    return 0
