"""The training run's configuration: `TrainConfig`, `key=value` overrides, and Python config files (cvt/configs/)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, CvTConfig, DataConfig, reject_unknown_fields
from ..shapes import check_size
from ..variants import model_config

AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training run needs; defaults are the paper's CvT-13 ImageNet-1k recipe at 224.

    Attributes:
        model: registered variant to train ("cvt_13", "cvt_21", "cvt_w24").
        model_kwargs: `CvTConfig` fields overriding the variant's (e.g. {"dims": [16, 32, 48]}).
        init: checkpoint path (any format `cvt.load_model` reads) or registered `name.tag` to start from
            (fine-tuning); the architecture is then the checkpoint's, and the head is re-initialised when the data's
            class names or count differ (re-ordered for the same names in another order). `cvt train --model`
            builds a whole fine-tuning config around it: `cvt.train.finetune` (defaults sized to the dataset).
        pretrained: with `init` a registered name, start from its released weights (downloaded once, then cached);
            False for random weights: `cvt train --model cvt_13 --set pretrained=false` runs offline.
        data: dataset location given to `cvt.data.open_dataset` (folder with train/ and val/, CSV or tar shards).
        train_split: split used for training.
        val_split: split used for validation; None or missing on disk for none.
        input_size: training and evaluation resolution.
        crop_mode: evaluation protocol, "center" (resize to size / crop_pct, centre crop) or "squash".
        crop_pct: evaluation centre-crop fraction.
        interpolation: resampling filter for training and evaluation.
        mean: normalisation mean.
        std: normalisation std.
        scale: RandomResizedCrop area range; None resizes the whole image instead.
        ratio: RandomResizedCrop aspect range.
        hflip: horizontal flip probability.
        auto_augment: RandAugment spec (timm syntax), None for none.
        color_jitter: colour jitter strength (ignored by the transform while RandAugment is on, as in the paper).
        re_prob: random-erasing probability.
        mixup_alpha: Mixup alpha (0 disables).
        cutmix_alpha: CutMix alpha (0 disables).
        mixup_prob: probability of applying Mixup/CutMix to a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        label_smoothing: label smoothing (inside Mixup's soft targets when Mixup is on).
        batch_size: images per process per micro-batch.
        eval_batch_size: images per process per evaluation batch (default: 2 x batch_size).
        accum_steps: micro-batches per optimiser step; global batch = batch_size x accum_steps x processes.
        num_workers: data-loading worker processes.
        optimizer: "adamw" (pre-training) or "sgd" (the paper's fine-tuning).
        lr: absolute peak learning rate; None to scale `lr_per_256` by the global batch.
        lr_per_256: peak learning rate per 256 images (linear scaling rule).
        weight_decay: decay of conv/linear weights (none on norms, biases, class token).
        momentum: SGD momentum.
        layer_decay: layer-wise learning-rate decay, as timm's `param_groups_layer_decay` and BEiT-style
            fine-tuning recipes: layer i of L (stem 0, one per block, head L; `CvT.group_matcher`) trains at
            `layer_decay ** (L - i)` times the rate; None (the default) for one rate everywhere.
        epochs: training epochs (length of the cosine).
        warmup_epochs: linear warm-up epochs.
        warmup_lr: learning rate at the start of warm-up.
        min_lr: floor of the cosine.
        sched_unit: "epoch" (the paper: the rate changes once per epoch) or "step".
        clip_grad: max gradient norm, None for no clipping (the paper).
        amp: mixed precision: "none", "bf16" (autocast, CPU or GPU) or "fp16" (autocast + GradScaler, GPU only).
        ema_decay: EMA decay, None for no EMA (the paper).
        channels_last: channels-last memory format.
        compile: wrap the model in `torch.compile`.
        grad_checkpointing: recompute block activations in the backward pass.
        fsdp: shard parameters, gradients and optimiser state with FSDP2 (`fully_shard` per block) under torchrun.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        num_threads: CPU threads of this process (`torch.set_num_threads`), None for torch's default.
        seed: seed of the model initialisation, the data order and per-rank randomness (seed + rank).
        deterministic: `torch.use_deterministic_algorithms(True)` for bit-exact reruns.
        output: run directory: new, empty or cvt's own (`cvt.outputs`); never the data or around it.
        overwrite: write the run into an `output` that holds files cvt did not write.
        resume: checkpoint to resume from: a .pt file, a run directory, or "auto" for `output`/last.pt when there
            is one (a new run otherwise: the setting for `torchrun --max-restarts` and re-queued jobs).
        max_steps: stop (with a checkpoint) after this many optimiser steps of the run, e.g. to split a job.
        save_every_steps: also write last.pt every this many optimiser steps.
        progress: tqdm progress bars (only on a terminal, only on rank 0).
        tensorboard: also log to TensorBoard in `output`/tb (needs the `tensorboard` package).
    """

    model: str = "cvt_13"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    pretrained: bool = True
    data: str | None = None
    train_split: str = "train"
    val_split: str | None = "val"
    input_size: int = 224
    crop_mode: str = "center"
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: tuple[float, float] | None = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    re_prob: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    batch_size: int = 256
    eval_batch_size: int | None = None
    accum_steps: int = 1
    num_workers: int = 8
    optimizer: str = "adamw"
    lr: float | None = None
    lr_per_256: float = 2.5e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: float | None = None
    epochs: int = 300
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    sched_unit: str = "epoch"
    clip_grad: float | None = None
    amp: str = "bf16"
    ema_decay: float | None = None
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    device: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    deterministic: bool = False
    output: str = "runs/train"
    overwrite: bool = False
    resume: str | None = None
    max_steps: int | None = None
    save_every_steps: int | None = None
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name in ("mean", "std", "scale", "ratio"):
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        check_values(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from `to_dict` output; unknown keys are an error naming them."""
        _check_keys(data)
        return cls(**data)

    def data_config(self) -> DataConfig:
        """The evaluation protocol of the trained model."""
        return DataConfig(
            input_size=(self.input_size, self.input_size),
            crop_mode=self.crop_mode,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )


@dataclass(frozen=True)
class Bound:
    """The values a numeric field may take: `low` and `high` (None: unbounded), each inclusive unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        low = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return low and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Bound(0), Bound(1), Bound(0, low_open=True)
PROBABILITY, FRACTION, RATE = Bound(0, 1), Bound(0, 1, low_open=True), Bound(0, 1, high_open=True)
# the natural bounds of the numeric fields (each entry of a tuple), checked with the types; None passes
BOUNDS = {
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "accum_steps": AT_LEAST_1, "eval_batch_size": AT_LEAST_1,
    "max_steps": AT_LEAST_1, "save_every_steps": AT_LEAST_1, "num_threads": AT_LEAST_1, "input_size": AT_LEAST_1,
    "num_workers": AT_LEAST_0, "warmup_epochs": AT_LEAST_0, "warmup_lr": AT_LEAST_0, "min_lr": AT_LEAST_0,
    "weight_decay": AT_LEAST_0, "color_jitter": AT_LEAST_0, "mixup_alpha": AT_LEAST_0, "cutmix_alpha": AT_LEAST_0,
    "lr": POSITIVE, "lr_per_256": POSITIVE, "clip_grad": POSITIVE, "std": POSITIVE, "ratio": POSITIVE,
    "hflip": PROBABILITY, "re_prob": PROBABILITY, "mixup_prob": PROBABILITY, "mixup_switch_prob": PROBABILITY,
    "crop_pct": FRACTION, "scale": FRACTION, "layer_decay": FRACTION,
    "label_smoothing": RATE, "momentum": RATE, "ema_decay": RATE,
}  # fmt: skip
CHOICES = {
    "amp": AMP_MODES,
    "optimizer": ("adamw", "sgd"),
    "sched_unit": ("epoch", "step"),
    "crop_mode": ("center", "squash"),
    "device": ("auto", "cpu", "cuda"),
}


def check_values(cfg: TrainConfig) -> None:
    """Every field's value against its type, its bounds (`BOUNDS`; numbers finite) and its choices (`CHOICES`), so
    that a wrong `--set` fails at once, before anything is created: "epochs must be an int, got 'one'",
    "label_smoothing must be in [0, 1), got 2"."""
    hints = _field_types()
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if not _matches(value, hint):
            raise ValueError(f"{f.name} must be {_describe(hint)}, got {value!r}")
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        bound = BOUNDS.get(f.name)
        if bound is not None and value is not None and not all(v in bound for v in numbers):
            raise ValueError(f"{f.name} must be {bound}{' each' if isinstance(value, tuple) else ''}, got {value!r}")
        if f.name in CHOICES and value not in CHOICES[f.name]:
            raise ValueError(f"{f.name} must be one of {CHOICES[f.name]}, got {value!r}")
    for name in ("scale", "ratio"):
        pair = getattr(cfg, name)
        if pair is not None and pair[0] > pair[1]:
            raise ValueError(f"{name} must be (low, high) with low <= high, got {pair!r}")
    _check_model(cfg)


def _check_model(cfg: TrainConfig) -> None:
    """`model_kwargs` against `CvTConfig`: field names always; for a model trained from scratch, also the values and
    the size (`cvt.shapes.check_size`), so that `--set model_kwargs.depths=[1,2,10**6]` fails with the settings."""
    if cfg.init is not None:  # the architecture is the checkpoint's, known once it is read
        reject_unknown_fields(CvTConfig, cfg.model_kwargs, "CvTConfig")
        return
    try:
        check_size(model_config(cfg.model, **cfg.model_kwargs))
    except ConfigError as err:
        raise ValueError(f"model_kwargs.{err.field}{err.detail}") from None


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_matches, value, args))
    if origin in (dict, list):
        return isinstance(value, origin)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        return f"a tuple of {len(args)} numbers" if all(a is float for a in args) else f"a tuple of {len(args)}"
    names = {type(None): "None", bool: "True or False", int: "an int", float: "a number", str: "a string"}
    return names.get(hint) or names.get(origin) or f"a {getattr(origin or hint, '__name__', hint)}"


def _check_keys(data: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(names)}")


def _parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"  # --set pretrained=false, as a shell user writes it
    if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)  # a number, so that the check names it as one that is not finite
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string such as a path or a model name


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings (`--set`) -> {key: value}; values are Python literals (bare words are strings)."""
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        parsed[key.strip()] = _parse_value(text.strip())
    return parsed


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str] | Mapping[str, Any]) -> TrainConfig:
    """Apply overrides: `key=value` strings (see `parse_overrides`), or {key: value} with typed values as they are.

    A dotted key sets one entry of a dict field: `model_kwargs.drop_path_rate=0.2`.
    """
    data = cfg.to_dict()
    items = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    for key, value in items.items():
        top, _, sub = key.partition(".")
        _check_keys({top: None})
        if sub:
            if not isinstance(data[top], dict):
                raise ValueError(f"override {key}={value!r}: {top} is not a dict field")
            data[top][sub] = value
        else:
            data[top] = value
    return TrainConfig.from_dict(data)


def _shipped_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"  # cvt/configs/, inside the installed package


def shipped_configs() -> list[str]:
    """Names of the config files shipped with the package, sorted."""
    return sorted(p.stem for p in _shipped_dir().glob("*.py") if not p.name.startswith("_"))


def find_config(spec: str | os.PathLike) -> Path:
    """A config file: `spec` itself when it is a file, else the shipped config of that name (`cvt_13_224`,
    `demo.py` or, as older commands wrote it, `configs/demo.py`), from any working directory."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        candidate = _shipped_dir() / f"{path.stem if path.suffix == '.py' else path.name}.py"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config {spec} not found: neither a file nor one of the shipped configs {shipped_configs()} (`cvt configs`)"
    )


def load_config_module(path: str | os.PathLike) -> Any:
    """Import a config file (see `find_config`) as a module."""
    path = find_config(path)
    spec = importlib.util.spec_from_file_location(f"cvt_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """Run the `get_config()` of a Python config file (a bare name is one of the shipped configs) and apply
    overrides (`apply_overrides`)."""
    module = load_config_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"get_config() of {path} returned {type(cfg).__name__}, not TrainConfig")
    return apply_overrides(cfg, overrides)
