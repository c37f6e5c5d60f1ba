"""The model card (README.md) written with every saved model folder: the Hugging Face hub's YAML metadata header
(library, tags, licence, datasets, metrics and results from the run, if any), then what the model is and how to
load it. The header is huggingface_hub's `ModelCardData`, so the hub reads it as it reads its own cards."""

from __future__ import annotations

from typing import Any

from ..config import CvTConfig, DataConfig, PretrainedCfg

CARD_FILE = "README.md"
PAPER = "https://arxiv.org/abs/2103.15808"


def released_datasets(model_name: str | None) -> list[str]:
    """The hub's dataset ids of released weights, from the tag of their name (in1k, in22k_ft_384, ...)."""
    tag = (model_name or "").partition(".")[2]
    if tag.startswith("in22k"):
        return ["imagenet-21k", "imagenet-1k"]  # pre-trained on ImageNet-22k, fine-tuned on ImageNet-1k
    return ["imagenet-1k"] if tag.startswith("in1k") else []


def model_card(
    meta: dict[str, Any],
    *,
    format: str,
    entry: PretrainedCfg | None = None,
    results: dict[str, Any] | None = None,
) -> str:
    """The README.md text of a saved model.

    Args:
        meta: the model's metadata (`cvt.model.model_metadata`: model_name, model_config, data_config, class_names).
        format: the folder's format, "cvt" or "hf" (which library loads it).
        entry: the released weights the model still is (`ModelIdentity.weights`), if any: the card then names
            their licence and datasets; None for any other model (licence "unknown").
        results: what the run measured, if anything: {"dataset", "split", "top1", "top5", "epoch"} (percent).

    Returns:
        The card: a YAML metadata header, then markdown.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData  # noqa: PLC0415 - only needed to write a card

    cfg, data = CvTConfig.from_dict(meta["model_config"]), DataConfig.from_dict(meta["data_config"])
    name = meta.get("model_name") or "cvt_custom"
    names = meta.get("class_names")
    released = entry is not None  # `cvt.variants.identify` decided whether the model still is them
    dataset = (results or {}).get("dataset")
    datasets = [dataset] if dataset else released_datasets(name if released else None)
    evals = []
    for key, label in (("top1", "top-1 accuracy"), ("top5", "top-5 accuracy")):
        if results and results.get(key) is not None and dataset:
            evals.append(EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                                    dataset_split=results.get("split"), metric_type="accuracy",
                                    metric_value=round(float(results[key]), 2), metric_name=label))  # fmt: skip
    card_data = ModelCardData(
        library_name="transformers" if format == "hf" else "cvt",
        pipeline_tag="image-classification",
        tags=["image-classification", "vision", "cvt", "pytorch"],
        license=entry.license if released and entry.license else "unknown",
        datasets=datasets or None,
        metrics=["accuracy"] if evals else None,
        model_name=name if evals else None,
        eval_results=evals or None,
    )
    load = (
        'from transformers import pipeline\nclassify = pipeline("image-classification", model="path/to/this-folder")'
        if format == "hf"
        else 'import cvt\nmodel = cvt.load_model("path/to/this-folder")  # or: cvt predict --model FOLDER img.jpg'
    )
    numerics = ""
    if format == "hf" and cfg.act != "gelu":
        numerics = ("\nThe weights were trained with QuickGELU, which `cvt.load_model` computes; transformers computes "
                    "GELU, so its\nlogits differ slightly.\n")  # fmt: skip
    shown = ", ".join(map(str, names[:10])) + (", ..." if len(names) > 10 else "") if names else "not recorded"
    result_lines = [
        f"- {e.metric_name}: {e.metric_value}% on {e.dataset_name}"
        + (f" ({e.dataset_split})" if e.dataset_split else "")
        for e in evals
    ]
    if results and results.get("epoch") is not None and evals:
        result_lines.append(f"- best epoch: {results['epoch']}")
    body = f"""
# {name}

A CvT (Convolutional vision Transformer, Wu et al., ICCV 2021, [arXiv:2103.15808]({PAPER})) image classifier,
saved by `cvt` in its {"Hugging Face transformers (CvtForImageClassification)" if format == "hf" else "own"} format.

- architecture: widths {list(cfg.dims)}, depths {list(cfg.depths)}, heads {list(cfg.heads)}, activation {cfg.act}
- classes ({cfg.num_classes}): {shown}
- evaluation preprocessing: {data.input_size[0]}x{data.input_size[1]}, {data.crop_mode} (crop {data.crop_pct}),
  {data.interpolation}, mean {list(data.mean)}, std {list(data.std)}
{chr(10).join(["", "## Results", "", *result_lines]) if result_lines else ""}

## Use

```python
{load}
```
{numerics}"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}").content


__all__ = ["CARD_FILE", "model_card", "released_datasets"]
