"""Training orchestration: `TrainConfig` and `train(cfg) -> summary`.

One function runs the paper's recipe on one CPU, one GPU, or many processes under `torchrun` (DDP; FSDP2 with
`fsdp=True`). Rank 0 owns the run directory:

    config.json    the resolved TrainConfig
    metrics.csv    one row per epoch: losses, top-1/top-5, learning rate, throughput
    summary.json   final and best top-1/top-5, epochs, wall time
    last.pt        the full training state (atomic; written every epoch, every `save_every_steps` and on stop)
    best.pt        the weights of the best epoch (same format, without optimiser state)
    curves.png     loss, accuracy and learning rate per epoch

Checkpoints are `torch.save`d dicts in the agreed "cvt.train" format, readable with `torch.load(weights_only=True)`
and by `cvt.load_model`. Resuming restores the model, optimiser, schedule, loss scaler, EMA, the Python/NumPy/torch
RNG states of every rank and the position in the data order: the sampler skips the batches already seen, so a run
interrupted in the middle of an epoch ends bit-identical to an uninterrupted one (CPU, `deterministic=True`).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from .config import DataConfig
from .engine import EpochMeter, ModelEma, NonFiniteLossError, evaluate, train_one_epoch
from .fileio import atomic_save, atomic_write
from .optim import WarmupCosineSchedule, create_optimizer, scaled_lr

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cvt.train"
CHECKPOINT_VERSION = 1
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training run needs; defaults are the paper's CvT-13 ImageNet-1k recipe at 224.

    Attributes:
        model: registered variant to train ("cvt_13", "cvt_21", "cvt_w24").
        model_kwargs: `CvTConfig` fields overriding the variant's (e.g. {"dims": [16, 32, 48]}).
        init: checkpoint path (any format `cvt.load_model` reads) or registered `name.tag` to start from
            (fine-tuning); the architecture is then the checkpoint's, and a head of another size is re-initialised.
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
        output: run directory.
        resume: checkpoint to resume from: a .pt file, a run directory, or "auto" for `output`/last.pt.
        max_steps: stop (with a checkpoint) after this many optimiser steps of the run, e.g. to split a job.
        save_every_steps: also write last.pt every this many optimiser steps.
        progress: tqdm progress bars (only on a terminal, only on rank 0).
        tensorboard: also log to TensorBoard in `output`/tb (needs the `tensorboard` package).
    """

    model: str = "cvt_13"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
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
    resume: str | None = None
    max_steps: int | None = None
    save_every_steps: int | None = None
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name in ("mean", "std", "scale", "ratio"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp {self.amp!r} is not one of {AMP_MODES}")
        if self.accum_steps < 1:
            raise ValueError("TrainConfig.accum_steps must be >= 1")

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


def _check_keys(data: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(names)}")


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string such as a path or a model name


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply `key=value` overrides; values are Python literals (bare words are strings).

    A dotted key sets one entry of a dict field: `model_kwargs.drop_path_rate=0.2`.
    """
    data = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = key.strip(), _parse_value(text.strip())
        top, _, sub = key.partition(".")
        _check_keys({top: None})
        if sub:
            if not isinstance(data[top], dict):
                raise ValueError(f"override {item!r}: {top} is not a dict field")
            data[top][sub] = value
        else:
            data[top] = value
    return TrainConfig.from_dict(data)


def find_config(spec: str | os.PathLike) -> Path:
    """A config file: `spec` itself, or `configs/<spec>.py` in the working directory or the source checkout."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name if path.suffix == ".py" else f"{path.name}.py"
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / "configs" / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"config {spec} not found (neither a file nor configs/{name})")


def load_config_module(path: str | os.PathLike) -> Any:
    """Import a config file (see `find_config`) as a module."""
    path = find_config(path)
    spec = importlib.util.spec_from_file_location(f"cvt_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Run the `get_config()` of a Python config file (see configs/; a bare name is looked up there) and apply
    `key=value` overrides."""
    module = load_config_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"get_config() of {path} returned {type(cfg).__name__}, not TrainConfig")
    return apply_overrides(cfg, overrides)


# --- data order -------------------------------------------------------------------------------------------------


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (seeded shuffle per epoch, split across ranks) that can start part-way into an epoch.

    `set_epoch(epoch, start)` skips the first `start` indices of this rank's share without touching the data,
    which is how a resumed run continues from the batch where the interrupted one stopped.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


class _PaddedEval(Dataset):
    """Evaluation set padded to a multiple of the world size; items carry a flag that is False on the padding.

    Every rank then runs the same number of batches (FSDP needs it) and the padding is not counted.
    """

    def __init__(self, dataset: Dataset, world_size: int) -> None:
        self.dataset, self.size = dataset, len(dataset)
        self.padded = math.ceil(self.size / world_size) * world_size

    def __len__(self) -> int:
        return self.padded

    def __getitem__(self, index: int) -> tuple[Any, Any, bool]:
        image, target = self.dataset[index % self.size]
        return image, target, index < self.size


# --- distributed setup --------------------------------------------------------------------------------------------


@dataclass
class _Env:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_env(device: str) -> _Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    env = _Env(rank=rank, world_size=world, local_rank=local, device=dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        env.owns_group = True
    return env


# --- RNG state --------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors/lists, so `torch.load(weights_only=True)` reads them."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- model, data, optimiser -------------------------------------------------------------------------------------


def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    if cfg.init:  # fine-tuning: the architecture is the checkpoint's; model_kwargs change it (e.g. drop path)
        from .checkpoint import resolve_model  # noqa: PLC0415

        return resolve_model(cfg.init, num_classes=num_classes, **cfg.model_kwargs)
    from .registry import create_model  # noqa: PLC0415

    return create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs)


def _build_datasets(cfg: TrainConfig, env: _Env) -> tuple[Dataset, Dataset | None, list[str]]:
    from . import data as cdata  # noqa: PLC0415

    if cfg.data is None:
        raise ValueError("no training data: set `data` (--data DIR)")
    train_tf = cdata.create_train_transform(
        cfg.input_size,
        scale=cfg.scale,
        ratio=cfg.ratio,
        hflip=cfg.hflip,
        auto_augment=cfg.auto_augment,
        color_jitter=cfg.color_jitter,
        re_prob=cfg.re_prob,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
    )
    common = {"rank": env.rank, "world_size": env.world_size, "seed": cfg.seed}
    # shuffle only applies to tar shards (map-style data is shuffled by the sampler)
    train_ds = cdata.open_dataset(cfg.data, split=cfg.train_split, transform=train_tf, shuffle=True, **common)
    val_ds = None
    if cfg.val_split:
        eval_tf = cdata.create_eval_transform(cfg.data_config())
        val_ds = cdata.open_dataset(
            cfg.data, split=cfg.val_split, transform=eval_tf, classes=list(train_ds.classes), **common
        )
    classes = list(getattr(train_ds, "classes", []))
    if val_ds is not None and list(getattr(val_ds, "classes", classes)) != classes:
        raise ValueError(f"train and val class lists differ: {classes} vs {list(val_ds.classes)}")
    return train_ds, val_ds, classes


def _make_mixup(cfg: TrainConfig, num_classes: int) -> Any:
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0 or cfg.mixup_prob <= 0:
        return None
    from .data import Mixup  # noqa: PLC0415

    return Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def _make_criterion(cfg: TrainConfig, mixup: Any) -> nn.Module:
    if mixup is not None:
        from .data import SoftTargetCrossEntropy  # noqa: PLC0415

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def _shard(model: nn.Module) -> nn.Module:
    """FSDP2: shard every transformer block, then the rest of the model (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    for stage in model.stages:
        for block in stage.blocks:
            fully_shard(block)
    fully_shard(model)
    return model


# --- checkpoints --------------------------------------------------------------------------------------------------


def _model_state(net: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

        return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict[str, Any]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(net, optimizer, options=options)
    return optimizer.state_dict()


def _load_model_state(net: nn.Module, state: dict[str, torch.Tensor], fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # noqa: PLC0415

        set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True))
    else:
        net.load_state_dict(state)


def _load_optimizer_state(net: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(net, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def _gather_rng(env: _Env) -> list[dict[str, Any]]:
    state = rng_state()
    if not env.distributed:
        return [state]
    states: list[Any] = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def _sync_buffers(net: nn.Module, env: _Env) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart between DDP forwards)."""
    if env.distributed:
        for buf in net.buffers():
            dist.broadcast(buf, 0)


def resolve_resume(resume: str, output: str | os.PathLike) -> Path:
    """The checkpoint file `resume` names: a file, a run directory (its last.pt), or "auto" (output/last.pt)."""
    path = Path(output) / "last.pt" if resume in ("auto", "", "last") else Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    return path


# --- run directory ------------------------------------------------------------------------------------------------

_CSV_COLUMNS = (
    "epoch",
    "global_step",
    "lr",
    "train_loss",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_val_top1",
    "ema_val_top5",
    "throughput",
    "epoch_time",
    "elapsed",
)


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    with atomic_write(run_dir / "metrics.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row.get(k, "") for k in _CSV_COLUMNS})


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss, accuracy and learning rate per epoch, as a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    epochs = [row["epoch"] + 1 for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, [row["train_loss"] for row in history], marker=".", label="train")
    if any(row.get("val_loss") is not None for row in history):
        axes[0].plot(epochs, [row.get("val_loss") for row in history], marker=".", label="val")
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    for key in ("val_top1", "val_top5", "ema_val_top1"):
        if any(row.get(key) is not None for row in history):
            axes[1].plot(epochs, [row.get(key) for row in history], marker=".", label=key)
    axes[1].set(title="validation accuracy (%)", xlabel="epoch", ylim=(0, 100))
    axes[1].legend()
    axes[2].plot(epochs, [row["lr"] for row in history], marker=".")
    axes[2].set(title="learning rate (last step of the epoch)", xlabel="epoch")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# --- the run ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume training) as `cfg` says; returns the summary also written to summary.json.

    Under `torchrun` (WORLD_SIZE > 1) this runs data-parallel on every process: DDP, or FSDP2 with `cfg.fsdp`.
    The process group is created here when none exists, and destroyed at the end.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the last checkpoint written before is left as it was.
    """
    env = _setup_env(cfg.device)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with _deterministic(cfg.deterministic):
            return _Run(cfg, env).run()
    finally:
        torch.set_num_threads(threads)
        if env.owns_group:
            dist.destroy_process_group()


class _Run:
    """The state of one training run; `run()` is the epoch loop."""

    def __init__(self, cfg: TrainConfig, env: _Env) -> None:
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.output)
        if cfg.amp == "fp16" and env.device.type != "cuda":
            raise ValueError("amp='fp16' needs a GPU (GradScaler); use amp='bf16' or 'none' on CPU")
        if cfg.fsdp and not env.distributed:
            logger.warning("fsdp=True without torchrun (one process): training unsharded")
        if cfg.fsdp and cfg.ema_decay is not None:
            raise ValueError("EMA is not supported together with FSDP")
        resume_path = resolve_resume(cfg.resume, cfg.output) if cfg.resume is not None else None
        if resume_path is None and (self.run_dir / "last.pt").exists():
            raise ValueError(f"{self.run_dir} already holds a run (last.pt): resume it or choose another output")

        self.train_ds, self.val_ds, self.classes = _build_datasets(cfg, env)
        num_classes = len(self.classes)
        if num_classes < 2:
            raise ValueError(f"the training set has {num_classes} class(es); at least 2 are needed")

        # the same initial weights on every rank (FSDP does not broadcast them), then per-rank randomness
        _seed_everything(cfg.seed)
        net = _build_model(cfg, num_classes)
        net.data_config = cfg.data_config()
        net.class_names = self.classes
        if cfg.grad_checkpointing:
            net.set_grad_checkpointing(True)
        net.to(env.device)
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)
        _seed_everything(cfg.seed + env.rank)
        self.net, self.fsdp = net, cfg.fsdp and env.distributed
        self.ema = ModelEma(net, cfg.ema_decay) if cfg.ema_decay is not None else None
        model: nn.Module = net
        if self.fsdp:
            model = _shard(net)
        elif env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            unused = bool(net.unused_in_forward())  # see `CvT.unused_in_forward`
            model = nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=unused)
        if cfg.compile:
            model = torch.compile(model)
        self.model = model

        self.sampler, self.train_loader = self._train_loader()
        self.steps_per_epoch = self._steps_per_epoch()
        self.global_batch = cfg.batch_size * cfg.accum_steps * env.world_size
        self.lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.lr_per_256, self.global_batch)
        self.optimizer = create_optimizer(
            net,
            name=cfg.optimizer,
            lr=self.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            fused=not self.fsdp and env.device.type in ("cpu", "cuda"),
        )
        self.scheduler = WarmupCosineSchedule(
            self.optimizer,
            base_lr=self.lr,
            epochs=cfg.epochs,
            steps_per_epoch=self.steps_per_epoch,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            unit=cfg.sched_unit,
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.mixup = _make_mixup(cfg, num_classes)
        self.criterion = _make_criterion(cfg, self.mixup)
        self.val_loader = self._val_loader()

        self.epoch, self.step, self.global_step = 0, 0, 0
        self.meter = EpochMeter()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"top1": None, "top5": None, "epoch": None}
        self.elapsed = 0.0
        if resume_path is not None:
            self._resume(resume_path)
        self.writer = None
        self._plotted = time.perf_counter()

    # -- data --

    def _train_loader(self) -> tuple[ResumableSampler | None, DataLoader]:
        cfg, env = self.cfg, self.env
        sampler = None
        if not isinstance(self.train_ds, IterableDataset):
            sampler = ResumableSampler(self.train_ds, num_replicas=env.world_size, rank=env.rank, seed=cfg.seed)
        loader = DataLoader(
            self.train_ds,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=cfg.num_workers,
            drop_last=True,
            pin_memory=env.device.type == "cuda",
            persistent_workers=False,
            # a private generator: creating the iterator must not draw from the global RNG, or a resumed
            # epoch would see different Mixup/drop-path randomness than the uninterrupted one
            generator=torch.Generator().manual_seed(cfg.seed + env.rank),
        )
        return sampler, loader

    def _steps_per_epoch(self) -> int:
        try:
            batches = len(self.train_loader)
        except TypeError as err:
            raise ValueError("the training set has no length: streaming datasets must define __len__") from err
        steps = batches // self.cfg.accum_steps
        if steps < 1:
            raise ValueError(
                f"one epoch has {batches} batch(es) of {self.cfg.batch_size} per process: fewer than "
                f"accum_steps={self.cfg.accum_steps}; lower batch_size or accum_steps"
            )
        return steps

    def _val_loader(self) -> DataLoader | None:
        if self.val_ds is None:
            return None
        cfg, env = self.cfg, self.env
        batch = cfg.eval_batch_size or 2 * cfg.batch_size
        if isinstance(self.val_ds, IterableDataset):  # already split by rank
            return DataLoader(self.val_ds, batch_size=batch, num_workers=cfg.num_workers)
        padded = _PaddedEval(self.val_ds, env.world_size)
        sampler = DistributedSampler(padded, num_replicas=env.world_size, rank=env.rank, shuffle=False)
        return DataLoader(
            padded,
            batch_size=batch,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=env.device.type == "cuda",
            generator=torch.Generator(),
        )

    def _epoch_batches(self, epoch: int, step: int) -> Any:
        """The training loader positioned at optimiser step `step` of `epoch`."""
        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(epoch)
        skip = step * self.cfg.accum_steps
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start=skip * self.cfg.batch_size)
            return self.train_loader
        import itertools  # noqa: PLC0415

        return itertools.islice(iter(self.train_loader), skip, None)  # streaming data: read past the seen batches

    # -- checkpoints --

    def _checkpoint(self, *, full: bool) -> dict[str, Any] | None:
        """The checkpoint dict (on rank 0; None elsewhere). Collective: every rank must call it."""
        _sync_buffers(self.net, self.env)
        model = _model_state(self.net, self.fsdp)
        optimizer = _optimizer_state(self.net, self.optimizer, self.fsdp) if full else None
        rng = _gather_rng(self.env) if full else None
        if not self.env.main:
            return None
        net = self.net
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": model,
            "model_name": getattr(net, "model_name", self.cfg.model),
            "model_config": net.cfg.to_dict(),
            "data_config": self.cfg.data_config().to_dict(),
            "class_names": list(self.classes),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict() if full else None,
            "scaler": self.scaler.state_dict() if full and self.scaler is not None else None,
            "rng": rng,
            "world_size": self.env.world_size,
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "meter": self.meter.state_dict() if full else None,
            "history": self.history,
            "best": self.best,
            "elapsed": self.elapsed,
            "train_config": self.cfg.to_dict(),
        }

    def _save(self, name: str, *, full: bool = True) -> None:
        state = self._checkpoint(full=full)
        if state is not None:
            atomic_save(state, self.run_dir / name)
        if self.env.distributed:
            dist.barrier()

    def _resume(self, path: Path) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("optimizer") is None:
            raise ValueError(f"{path} is not a full training checkpoint (format {CHECKPOINT_FORMAT!r})")
        if list(ckpt["class_names"]) != list(self.classes):
            raise ValueError(f"{path} was trained on classes {ckpt['class_names']}, the data has {self.classes}")
        _load_model_state(self.net, ckpt["model"], self.fsdp)
        _load_optimizer_state(self.net, self.optimizer, ckpt["optimizer"], self.fsdp)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt["scaler"] is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt["ema"] is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step, self.global_step = ckpt["epoch"], ckpt["step"], ckpt["global_step"]
        self.meter = EpochMeter(**ckpt["meter"])
        self.history, self.best, self.elapsed = list(ckpt["history"]), dict(ckpt["best"]), ckpt["elapsed"]
        rng = ckpt["rng"]
        if len(rng) == self.env.world_size:
            set_rng_state(rng[self.env.rank])
        else:
            logger.warning(
                "checkpoint has RNG states of %d process(es), this run has %d: reseeding (not bit-identical)",
                len(rng),
                self.env.world_size,
            )
            _seed_everything(self.cfg.seed + 1000 * self.global_step + self.env.rank)
        logger.info(
            "resumed from %s at epoch %d, step %d (global step %d)", path, self.epoch, self.step, self.global_step
        )

    # -- the loop --

    def _progress(self) -> bool:
        return self.cfg.progress and self.env.main and sys.stderr.isatty()

    def _evaluate(self) -> dict[str, Any]:
        if self.val_loader is None:
            return {}
        _sync_buffers(self.net, self.env)
        num_classes = len(self.classes)
        kwargs = {
            "num_classes": num_classes,
            "device": self.env.device,
            "amp_dtype": self.amp_dtype,
            "channels_last": self.cfg.channels_last,
            "progress": self._progress(),
        }
        # FSDP needs the sharded module (its forward gathers parameters); DDP is evaluated unwrapped
        res = evaluate(self.model if self.fsdp else self.net, self.val_loader, **kwargs)
        out = {"val_loss": res["loss"], "val_top1": res["top1"], "val_top5": res["top5"]}
        if self.ema is not None:
            ema = evaluate(self.ema.module, self.val_loader, **kwargs)
            out.update(ema_val_top1=ema["top1"], ema_val_top5=ema["top5"])
        return out

    def _summary(self, completed: bool) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "run_dir": str(self.run_dir),
            "completed": completed,
            "epochs": self.cfg.epochs,
            "epochs_done": len(self.history),
            "global_step": self.global_step,
            "final_top1": last.get("val_top1"),
            "final_top5": last.get("val_top5"),
            "final_train_loss": last.get("train_loss"),
            "best_top1": self.best["top1"],
            "best_top5": self.best["top5"],
            "best_epoch": self.best["epoch"],
            "wall_time_s": self.elapsed,
            "global_batch": self.global_batch,
            "lr": self.lr,
            "world_size": self.env.world_size,
        }

    def _plot(self) -> None:
        plot_curves(self.history, self.run_dir / "curves.png")
        self._plotted = time.perf_counter()

    def _log_epoch(self, row: dict[str, Any]) -> None:
        _write_metrics(self.run_dir, self.history)
        if time.perf_counter() - self._plotted > 30:  # drawing takes about a second: at most every 30 s, and at the end
            self._plot()
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and value is not None:
                    self.writer.add_scalar(key, value, row["epoch"] + 1)
            self.writer.flush()
        val = ""
        if row.get("val_top1") is not None:
            val = f"  val loss {row['val_loss']:.4f}  top-1 {row['val_top1']:.2f}  top-5 {row['val_top5']:.2f}"
        logger.info(
            "epoch %d/%d  train loss %.4f%s  lr %.3g  %.0f img/s",
            row["epoch"] + 1,
            self.cfg.epochs,
            row["train_loss"],
            val,
            row["lr"],
            row["throughput"],
        )

    def run(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        if env.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.run_dir / "config.json", cfg.to_dict())
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
        logger.info(
            "training %s on %d image(s), %d class(es): %d process(es) x batch %d x accumulation %d = %d, lr %.3g, "
            "%d step(s) per epoch",
            cfg.model,
            len(self.train_ds),
            len(self.classes),
            env.world_size,
            cfg.batch_size,
            cfg.accum_steps,
            self.global_batch,
            self.lr,
            self.steps_per_epoch,
        )
        completed = False
        try:
            completed = self._loop()
        except NonFiniteLossError as err:
            last = self.run_dir / "last.pt"
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint was written"
            raise _with_note(err, f"training stopped; {kept}") from err
        finally:
            if self.writer is not None:
                self.writer.close()
            if env.main and self.history:
                self._plot()
        summary = self._summary(completed)
        if env.main:
            _write_json(self.run_dir / "summary.json", summary)
        return summary

    def _loop(self) -> bool:
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                return False
            started = time.perf_counter()
            result = train_one_epoch(
                self.model,
                self._epoch_batches(self.epoch, self.step),
                self.optimizer,
                criterion=self.criterion,
                epoch=self.epoch,
                steps_per_epoch=self.steps_per_epoch,
                scheduler=self.scheduler,
                device=self.env.device,
                mixup=self.mixup,
                amp_dtype=self.amp_dtype,
                scaler=self.scaler,
                accum_steps=cfg.accum_steps,
                clip_grad=cfg.clip_grad,
                ema=self.ema,
                ema_source=self.net,
                channels_last=cfg.channels_last,
                start_step=self.step,
                global_step=self.global_step,
                max_steps=self._next_stop(),
                meter=self.meter,
                progress=self._progress(),
            )
            self.step, self.global_step = result.step, result.global_step
            self.elapsed += time.perf_counter() - started
            if not result.finished:  # stopped inside the epoch: by max_steps or for a periodic checkpoint
                self._save("last.pt")
                if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                    logger.info("stopped after %d step(s) (max_steps); resume with --resume", self.global_step)
                    return False
                continue
            started = time.perf_counter()
            row = {
                "epoch": self.epoch,
                "global_step": self.global_step,
                "lr": self.scheduler.last_lr,
                "train_loss": self.meter.loss,
                "throughput": self.meter.samples / max(self.meter.seconds, 1e-9),
                "epoch_time": self.meter.seconds,
            }
            row.update(self._evaluate())
            self.elapsed += time.perf_counter() - started
            row["elapsed"] = self.elapsed
            self.history.append(row)
            top1 = row.get("val_top1")
            improved = top1 is not None and (self.best["top1"] is None or top1 > self.best["top1"])
            if improved:
                self.best = {"top1": top1, "top5": row["val_top5"], "epoch": self.epoch}
            self.epoch, self.step, self.meter = self.epoch + 1, 0, EpochMeter()
            if self.env.main:
                self._log_epoch(row)
            self._save("last.pt")
            if improved:
                self._save("best.pt", full=False)
            if cfg.max_steps is not None and self.global_step >= cfg.max_steps and self.epoch < cfg.epochs:
                logger.info("stopped after %d step(s) (max_steps); resume with --resume", self.global_step)
                return False
        return True

    def _next_stop(self) -> int | None:
        """The global step at which train_one_epoch must return: max_steps or the next periodic checkpoint."""
        stops = []
        if self.cfg.max_steps is not None:
            stops.append(self.cfg.max_steps)
        if self.cfg.save_every_steps:
            every = self.cfg.save_every_steps
            stops.append((self.global_step // every + 1) * every)
        return min(stops) if stops else None


def _with_note(err: NonFiniteLossError, note: str) -> NonFiniteLossError:
    new = NonFiniteLossError(err.epoch, err.step, err.global_step, err.value)
    new.args = (f"{err.args[0]}; {note}",)
    return new
