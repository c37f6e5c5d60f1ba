"""Everything a training run trains with, built once from its config: data and loaders, the model (wrapped for
DDP/FSDP2, with EMA), optimiser and schedule, mixed precision, Mixup and the loss."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from .. import data as cdata
from ..checkpoint import Checkpoint
from ..data import ImageDataset
from ..engine import Learner, ModelEma, StepSettings
from ..factory import create_model, model_from_checkpoint, resolve_model
from ..variants import identify, is_registered
from .config import TrainConfig
from .distributed import DistEnv, PaddedEval, ResumableSampler, wrap_model
from .finetune import FineTuneStart
from .optimizer import WarmupCosineSchedule, create_optimizer, scaled_lr
from .preempt import ShieldedLoader
from .rng import seed_everything

logger = logging.getLogger(__name__)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Run:
    """The objects of one training run (built by `build_run`).

    Attributes:
        train_ds, val_ds: the datasets (val_ds None without a validation split).
        classes: class names in label order.
        net: the model itself (unwrapped: what is saved, EMA-tracked and optimised).
        model: what the training step calls: `net`, or `net` under DDP/FSDP2 and/or `torch.compile`.
        fsdp: whether `net` is sharded.
        ema: the EMA of `net`, or None.
        sampler: the resumable sampler of map-style training data, None for streaming data.
        train_loader, val_loader: the loaders (val_loader None without validation data).
        steps_per_epoch: optimiser steps per epoch.
        global_batch: images per optimiser step over all processes.
        lr: the peak learning rate.
        optimizer, scheduler, scaler: optimiser, warm-up cosine schedule, fp16 GradScaler (or None).
        amp_dtype: autocast dtype, None for float32.
        mixup: batch Mixup/CutMix, or None.
        criterion: the loss.
        step_settings: how each training step runs (device, precision, accumulation, clipping, Mixup).
    """

    train_ds: Dataset
    val_ds: Dataset | None
    classes: list[str]
    net: nn.Module
    model: nn.Module
    fsdp: bool
    ema: ModelEma | None
    sampler: ResumableSampler | None
    train_loader: DataLoader
    val_loader: DataLoader | None
    steps_per_epoch: int
    global_batch: int
    lr: float
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineSchedule
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    mixup: Any
    criterion: nn.Module
    step_settings: StepSettings

    @property
    def learner(self) -> Learner:
        """What the training step updates: the model, optimiser, loss, schedule, scaler and EMA."""
        return Learner(self.model, self.optimizer, self.criterion, self.scheduler, self.scaler, self.ema, self.net)


def check_options(cfg: TrainConfig, env: DistEnv) -> None:
    """Refuse combinations of options that cannot run here, before anything is built."""
    if cfg.amp == "fp16" and env.device.type != "cuda":
        raise ValueError("amp='fp16' needs a GPU (GradScaler); use amp='bf16' or 'none' on CPU")
    if cfg.fsdp and not env.distributed:
        logger.warning("fsdp=True without torchrun (one process): training unsharded")
    if cfg.fsdp and cfg.ema_decay is not None:
        raise ValueError("EMA is not supported together with FSDP")
    if not cfg.pretrained and cfg.init and not is_registered(cfg.init):
        raise ValueError(
            f"pretrained=False starts a registered model (init=NAME) from random weights; init={cfg.init!r} is "
            "not one: drop pretrained=False, or pass a name from `cvt list`"
        )


def build_run(cfg: TrainConfig, env: DistEnv, start: FineTuneStart | None = None) -> Run:
    """Build the run's data, model, optimiser, schedule and loss, in an order that fixes every random draw; from
    what `plan_finetune` read (`start`) where it fits `cfg`, instead of reading the checkpoint and split again."""
    start = start if start is not None and start.fits(cfg) else None
    train_ds, val_ds, classes = build_datasets(cfg, env, start.train_set if start else None)
    num_classes = len(classes)
    if num_classes < 2:
        raise ValueError(f"the training set has {num_classes} class(es); at least 2 are needed")

    # the same initial weights on every rank (FSDP does not broadcast them), then per-rank randomness
    seed_everything(cfg.seed)
    net = model_to_train(cfg, classes, start.checkpoint if start else None)
    # trained weights are the run's, not released ones: named by the architecture ("cvt_13", "cvt_13-custom")
    net.identity = identify(net.cfg, net.model_name.partition(".")[0], data=cfg.data_config(), class_names=classes)
    if cfg.grad_checkpointing:
        net.set_grad_checkpointing(True)
    net.to(env.device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    seed_everything(cfg.seed + env.rank)
    fsdp = cfg.fsdp and env.distributed
    ema = ModelEma(net, cfg.ema_decay) if cfg.ema_decay is not None else None
    model = wrap_model(net, env, fsdp=fsdp)
    if cfg.compile:
        model = torch.compile(model)

    sampler, train_loader = build_train_loader(cfg, env, train_ds)
    steps_per_epoch = count_steps(cfg, env, train_ds, train_loader)
    global_batch = cfg.batch_size * cfg.accum_steps * env.world_size
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.lr_per_256, global_batch)
    optimizer = create_optimizer(
        net,
        name=cfg.optimizer,
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        fused=not fsdp and env.device.type in ("cpu", "cuda"),
        layer_decay=cfg.layer_decay,
    )
    scheduler = WarmupCosineSchedule(
        optimizer,
        base_lr=lr,
        epochs=cfg.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        unit=cfg.sched_unit,
    )
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    mixup = build_mixup(cfg, num_classes)
    criterion = build_criterion(cfg, mixup)
    val_loader = build_val_loader(cfg, env, val_ds)
    return Run(
        train_ds=train_ds,
        val_ds=val_ds,
        classes=classes,
        net=net,
        model=model,
        fsdp=fsdp,
        ema=ema,
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        steps_per_epoch=steps_per_epoch,
        global_batch=global_batch,
        lr=lr,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        amp_dtype=AMP_DTYPES[cfg.amp],
        mixup=mixup,
        criterion=criterion,
        step_settings=StepSettings(
            env.device, AMP_DTYPES[cfg.amp], cfg.accum_steps, cfg.clip_grad, cfg.channels_last, mixup
        ),
    )


def model_to_train(cfg: TrainConfig, classes: list[str], checkpoint: Checkpoint | None = None) -> nn.Module:
    """The model to train: a registered variant, or with `cfg.init` the checkpoint to fine-tune, its head fitted
    to `classes` (see `fit_head`); `checkpoint` is `cfg.init` already read."""
    if not cfg.init:
        return create_model(cfg.model, num_classes=len(classes), **cfg.model_kwargs)
    if not cfg.pretrained:  # a registered architecture from random weights (`check_options` refused a path)
        return create_model(cfg.init, num_classes=len(classes), **cfg.model_kwargs)
    # fine-tuning: the architecture is the checkpoint's; model_kwargs change it (e.g. drop path)
    if checkpoint is not None:
        net = model_from_checkpoint(checkpoint, **cfg.model_kwargs)
    else:
        net = resolve_model(cfg.init, **cfg.model_kwargs)
    loaded = len(net.state_dict())
    reinit, why = fit_head(net, classes)
    logger.info(
        "fine-tuning %s from %s: %d of %d tensor(s) loaded; %s",
        net.model_name,
        cfg.init,
        loaded - len(reinit),
        len(net.state_dict()),
        f"re-initialised {', '.join(reinit)}: {why}" if reinit else f"head kept: {why}",
    )
    return net


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(map(str, names[:5]))
    return f"{len(names)} ({shown}{', ...' if len(names) > 5 else ''})"


def fit_head(net: nn.Module, classes: list[str]) -> tuple[list[str], str]:
    """Make the classifier of a loaded model answer for `classes`, the training data's class names in label order.

    The head is kept when the model records the same names in the same order; its rows are re-ordered when the
    names are the same in another order; it is re-initialised when the count or the names differ. A model that
    records no names keeps a head of the right size (nothing says the classes differ).

    Returns:
        (the re-initialised parameter names, empty when kept; the reason, for the log).
    """
    old = list(net.class_names) if net.class_names is not None else None
    head = net.get_classifier()
    if net.num_classes == len(classes):
        if old == classes:
            return [], f"the checkpoint's classes are the data's {_names(classes)}"
        if old is None:
            return [], f"the checkpoint records no class names and has the data's {len(classes)} outputs"
        if sorted(old) == sorted(classes):
            order = torch.tensor([old.index(name) for name in classes], device=head.weight.device)
            with torch.no_grad():
                head.weight.copy_(head.weight[order])
                head.bias.copy_(head.bias[order])
            return [], f"rows re-ordered to the data's class order {_names(classes)}"
    what = f"{net.num_classes} outputs" if old is None else f"classes {_names(old)}"
    why = f"the checkpoint's {what} differ from the data's classes {_names(classes)}"
    net.reset_classifier(len(classes))
    return [name for name, _ in net.get_classifier().named_parameters(prefix="head")], why


def build_datasets(
    cfg: TrainConfig, env: DistEnv, listed: ImageDataset | None = None
) -> tuple[Dataset, Dataset | None, list[str]]:
    """(training set, validation set or None, class names) with the training and evaluation transforms; `listed`
    is the training split already listed (without a transform)."""
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
    if listed is not None:
        train_ds = listed.with_transform(train_tf, seed=cfg.seed)
    else:
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


def build_train_loader(cfg: TrainConfig, env: DistEnv, dataset: Dataset) -> tuple[ResumableSampler | None, DataLoader]:
    """(sampler or None for streaming data, loader) of the training set."""
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = ResumableSampler(dataset, num_replicas=env.world_size, rank=env.rank, seed=cfg.seed)
    loader = ShieldedLoader(  # a scheduler's SIGTERM to the process group must not kill its workers
        dataset,
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


def count_steps(cfg: TrainConfig, env: DistEnv, dataset: Dataset, loader: DataLoader) -> int:
    """Optimiser steps per epoch, the same on every rank; a clear error when the data is too small for one.

    Map-style data: the sampler gives every rank the same number of indices (padding the last ones), so the
    loader's length is it. Streaming data (tar shards) cannot know what an epoch of its shards yields (see
    `cvt.data.shards`): the rank's share of all samples sets a fixed epoch length, that the dataset then yields.
    """
    if isinstance(dataset, IterableDataset):
        if not hasattr(dataset, "set_epoch_length"):
            raise ValueError(f"streaming dataset {type(dataset).__name__} cannot fix its epoch length; use tar shards")
        total = dataset.total_samples()
        per_rank = total // env.world_size
        batches = per_rank // cfg.batch_size
        what = f"{per_rank} sample(s) per process ({total} over {env.world_size})"
    else:
        batches = len(loader)
        what = f"{batches} batch(es) of {cfg.batch_size} per process"
    steps = batches // cfg.accum_steps
    if steps < 1:
        raise ValueError(
            f"one epoch has {what}: fewer than batch_size={cfg.batch_size} x accum_steps={cfg.accum_steps}; "
            "lower batch_size or accum_steps"
        )
    if isinstance(dataset, IterableDataset):
        dataset.set_epoch_length(steps * cfg.accum_steps, cfg.batch_size)
    return steps


def build_val_loader(cfg: TrainConfig, env: DistEnv, dataset: Dataset | None) -> DataLoader | None:
    """The validation loader (each rank its share, padded so that every rank runs the same batches), or None."""
    if dataset is None:
        return None
    batch = cfg.eval_batch_size or 2 * cfg.batch_size
    if isinstance(dataset, IterableDataset):  # already split by rank
        return ShieldedLoader(dataset, batch_size=batch, num_workers=cfg.num_workers)
    padded = PaddedEval(dataset, env.world_size)
    sampler = DistributedSampler(padded, num_replicas=env.world_size, rank=env.rank, shuffle=False)
    return ShieldedLoader(
        padded,
        batch_size=batch,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=env.device.type == "cuda",
        generator=torch.Generator(),
    )


def build_mixup(cfg: TrainConfig, num_classes: int) -> cdata.Mixup | None:
    """Batch Mixup/CutMix with label smoothing, or None when both are off."""
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0 or cfg.mixup_prob <= 0:
        return None
    return cdata.Mixup(
        mixup_alpha=cfg.mixup_alpha,
        cutmix_alpha=cfg.cutmix_alpha,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def build_criterion(cfg: TrainConfig, mixup: cdata.Mixup | None) -> nn.Module:
    """Soft-target cross entropy after Mixup, else cross entropy with label smoothing."""
    if mixup is not None:
        return cdata.SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
