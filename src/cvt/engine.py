"""One training epoch and one evaluation pass, each a plain function of a few explicit objects.

`train_one_epoch(learner, loader, plan, settings)` takes the run's model and what updates it (`Learner`), the
data, where the epoch stands (`EpochPlan`) and how steps run (`StepSettings`). It handles gradient accumulation,
mixed precision (autocast; a GradScaler for fp16), gradient clipping, EMA, Mixup and the learning-rate schedule,
and can start in the middle of an epoch and stop after a given number of optimiser steps (the training loop
positions the data sampler; this function only counts).
`evaluate` returns loss, top-1/top-5 and the confusion matrix, summed over every process of a distributed run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; carries where it happened and the value."""

    def __init__(self, epoch: int, step: int, global_step: int, value: float) -> None:
        self.epoch, self.step, self.global_step, self.value = epoch, step, global_step, value
        super().__init__(
            f"non-finite loss {value} at epoch {epoch}, step {step} of the epoch (global step {global_step}; "
            "all counted from 0)"
        )


class ModelEma:
    """Exponential moving average of a model's parameters; buffers (BatchNorm statistics) are copied.

    Args:
        model: the (unwrapped) model to track; a deep copy is kept in `module`, in eval mode, without gradients.
        decay: weight of the old average at every update.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self._params = {name for name, _ in self.module.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            ema_value = ema_state[name]
            if name in self._params:
                ema_value.lerp_(value.detach(), 1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


@dataclass
class EpochMeter:
    """Running sums of one epoch, kept in the checkpoint so a resumed epoch reports the same loss.

    Attributes:
        loss_sum: sum over optimiser steps of the (process-averaged) loss.
        steps: optimiser steps counted in `loss_sum`.
        samples: images seen by all processes.
        seconds: time spent in the epoch's steps.
    """

    loss_sum: float = 0.0
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def state_dict(self) -> dict[str, float | int]:
        return {"loss_sum": self.loss_sum, "steps": self.steps, "samples": self.samples, "seconds": self.seconds}


@dataclass
class EpochResult:
    """What `train_one_epoch` did.

    Attributes:
        meter: the epoch's running sums (including steps done before a resume).
        step: optimiser steps of this epoch completed so far (the position to resume from).
        global_step: optimiser steps of the whole run completed so far.
        finished: whether the epoch ran to its end (False when stopped by `max_steps` or `should_stop`).
        lr: the learning rate of the last step.
    """

    meter: EpochMeter = field(default_factory=EpochMeter)
    step: int = 0
    global_step: int = 0
    finished: bool = False
    lr: float = 0.0


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _no_grad_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce of a DDP model (used on micro-batches that do not end an accumulation)."""
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


def _set_fsdp_sync(model: nn.Module, sync: bool) -> None:
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 module
        model.set_requires_gradient_sync(sync)


@dataclass
class Learner:
    """The run's model and what updates it: the state one training step reads and changes.

    Attributes:
        model: the model to train (possibly DDP/FSDP-wrapped or compiled).
        optimizer: the optimiser.
        criterion: loss of (logits, targets); targets are soft when `StepSettings.mixup` is given.
        scheduler: object with `step(epoch, step_in_epoch)` setting the rate before each optimiser step.
        scaler: GradScaler for float16 training.
        ema: EMA updated after every optimiser step from `ema_source`.
        ema_source: the unwrapped model the EMA follows (defaults to `model`).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEma | None = None
    ema_source: nn.Module | None = None


@dataclass(frozen=True)
class StepSettings:
    """How each training step runs (the run's settings, the same every epoch).

    Attributes:
        device: where the batches go.
        amp_dtype: autocast dtype (torch.bfloat16 or torch.float16), None for full precision.
        accum_steps: micro-batches per optimiser step; the loss is divided by it.
        clip_grad: max global gradient norm, None for no clipping.
        channels_last: send images in channels-last memory format.
        mixup: callable (images, targets) -> (images, soft targets), e.g. `cvt.data.Mixup`.
    """

    device: torch.device | str = "cpu"
    amp_dtype: torch.dtype | None = None
    accum_steps: int = 1
    clip_grad: float | None = None
    channels_last: bool = False
    mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class EpochPlan:
    """Which epoch to train and where it stands.

    Attributes:
        epoch: epoch index (from 0), for the schedule; messages and the progress bar count from 1.
        steps_per_epoch: optimiser steps in a full epoch; leftover micro-batches that cannot fill an
            accumulation are not used.
        start_step: optimiser steps of this epoch already done (resume point).
        global_step: optimiser steps of the run already done.
        max_steps: stop once the run has done this many optimiser steps.
        meter: running sums carried over from before a resume.
        epochs: the run's number of epochs, for the progress bar ("epoch 3/10"), if known.
    """

    epoch: int
    steps_per_epoch: int
    start_step: int = 0
    global_step: int = 0
    max_steps: int | None = None
    meter: EpochMeter | None = None
    epochs: int | None = None


def train_one_epoch(
    learner: Learner,
    loader: Iterable,
    plan: EpochPlan,
    settings: StepSettings = StepSettings(),
    *,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
) -> EpochResult:
    """Train for (the rest of) one epoch.

    Args:
        learner: the model (put in train mode here), optimiser, loss, schedule, scaler and EMA.
        loader: yields (images, targets) micro-batches, already positioned at `plan.start_step *
            settings.accum_steps` batches into the epoch's data order.
        plan: the epoch, its length and where it stands.
        settings: device, precision, accumulation, clipping, memory format and Mixup.
        should_stop: called after every optimiser step that does not end the epoch; True stops there (e.g. on a
            pre-emption signal; under DDP it must give the same answer on every process).
        progress: show a tqdm progress bar.

    Returns:
        An `EpochResult`.

    Raises:
        NonFiniteLossError: the loss was NaN or infinite (checked on every micro-batch, on every process).
    """
    learner.model.train()
    device = torch.device(settings.device)
    world = dist.get_world_size() if _is_distributed() else 1
    result = EpochResult(meter=plan.meter or EpochMeter(), step=plan.start_step, global_step=plan.global_step)
    if plan.start_step >= plan.steps_per_epoch:
        result.finished = True
        return result
    bar = _progress_bar(plan) if progress else None
    micro, step_loss = 0, torch.zeros((), device=device)
    started = time.perf_counter()
    learner.optimizer.zero_grad(set_to_none=True)
    for images, targets in loader:
        if micro == 0 and learner.scheduler is not None:
            result.lr = learner.scheduler.step(plan.epoch, result.step)
        micro += 1
        last_micro = micro == settings.accum_steps
        step_loss += _forward_backward(learner, settings, images, targets, last_micro, (plan.epoch, result))
        if not last_micro:
            continue
        _optimizer_step(learner, settings.clip_grad)
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        loss_value = step_loss.item()
        micro, step_loss = 0, torch.zeros((), device=device)
        result.meter.loss_sum += loss_value
        result.meter.steps += 1
        result.meter.samples += images.shape[0] * settings.accum_steps * world
        result.step += 1
        result.global_step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{result.lr:.3g}")
        if result.step >= plan.steps_per_epoch:
            break
        if plan.max_steps is not None and result.global_step >= plan.max_steps:
            break
        if should_stop is not None and should_stop():
            break
    result.meter.seconds += time.perf_counter() - started
    if bar is not None:
        bar.close()
    result.finished = result.step >= plan.steps_per_epoch
    return result


def _progress_bar(plan: EpochPlan) -> tqdm:
    """The epoch's bar, counting epochs from 1 as the log does ("epoch 3/10")."""
    label = f"epoch {plan.epoch + 1}" + (f"/{plan.epochs}" if plan.epochs else "")
    return tqdm(total=plan.steps_per_epoch, initial=plan.start_step, desc=label, leave=False, dynamic_ncols=True)


def _forward_backward(
    learner: Learner,
    settings: StepSettings,
    images: torch.Tensor,
    targets: torch.Tensor,
    last_micro: bool,
    where: tuple[int, EpochResult],
) -> torch.Tensor:
    """One micro-batch's loss and gradients (synchronised across processes on the last micro-batch of a step);
    returns its share of the step's loss. `where` is (epoch, result so far), for the non-finite loss message."""
    device = torch.device(settings.device)
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if settings.mixup is not None:
        images, targets = settings.mixup(images, targets)
    model = learner.model
    _set_fsdp_sync(model, last_micro)
    with contextlib.nullcontext() if last_micro else _no_grad_sync(model):
        with _autocast(device, settings.amp_dtype):
            loss = learner.criterion(model(images), targets)
        _check_finite(loss, where[0], where[1], _is_distributed())
        scaled = loss / settings.accum_steps
        (learner.scaler.scale(scaled) if learner.scaler is not None else scaled).backward()
    return loss.detach().float() / settings.accum_steps


def _optimizer_step(learner: Learner, clip_grad: float | None) -> None:
    """Clip (after unscaling), step the optimiser (through the scaler, for float16), clear the gradients and
    update the EMA."""
    optimizer, scaler = learner.optimizer, learner.scaler
    if scaler is not None and clip_grad is not None:
        scaler.unscale_(optimizer)
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(learner.model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if learner.ema is not None:
        learner.ema.update(learner.ema_source if learner.ema_source is not None else learner.model)


def _check_finite(loss: torch.Tensor, epoch: int, result: EpochResult, distributed: bool) -> None:
    """Raise NonFiniteLossError on every process as soon as one of them sees a NaN or infinite loss."""
    value = loss.detach().float()
    if distributed:  # every process must stop at the same step, or the others hang in the next all-reduce
        bad = (~torch.isfinite(value)).float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            raise NonFiniteLossError(epoch, result.step, result.global_step, value.item())
    elif not math.isfinite(value.item()):
        raise NonFiniteLossError(epoch, result.step, result.global_step, value.item())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Cross-entropy, top-1/top-5 accuracy and the confusion matrix of `model` on `loader`.

    Batches are (images, targets) or (images, targets, valid) where `valid` masks out the padding a distributed
    sampler adds; in a distributed run the counts of every process are summed, so each image counts once.

    Args:
        model: the model (put in eval mode here).
        loader: evaluation batches with integer targets.
        num_classes: number of classes (size of the confusion matrix).
        device: where the batches go.
        amp_dtype: autocast dtype, None for full precision.
        channels_last: send images in channels-last memory format.
        progress: show a tqdm progress bar.

    Returns:
        {"loss", "top1", "top5" (percent; top-k with k capped at the number of classes), "count",
        "confusion": (num_classes, num_classes) int64 tensor, rows = true class, columns = predicted class}.
    """
    model.eval()
    device = torch.device(device)
    k = min(5, num_classes)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    if progress:
        loader = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True)
    for batch in loader:
        images, targets = batch[0].to(device), batch[1].to(device)
        valid = batch[2].to(device).bool() if len(batch) > 2 else torch.ones_like(targets, dtype=torch.bool)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
        logits, targets = logits.float()[valid], targets[valid]
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        topk = logits.topk(k, dim=1).indices
        correct5 += (topk == targets[:, None]).any(dim=1).sum()
        confusion += torch.bincount(targets * num_classes + topk[:, 0], minlength=num_classes * num_classes)
    if _is_distributed():
        for t in (loss_sum, correct5, confusion):
            dist.all_reduce(t)
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = int(confusion.sum())
    correct1 = int(confusion.diag().sum())
    return {
        "loss": loss_sum.item() / max(count, 1),
        "top1": 100.0 * correct1 / max(count, 1),
        "top5": 100.0 * int(correct5) / max(count, 1),
        "count": count,
        "confusion": confusion,
    }


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Accuracy in percent of each true class (row) of a confusion matrix; None for a class with no images."""
    totals = confusion.sum(dim=1)
    return [100.0 * int(confusion[i, i]) / int(n) if n else None for i, n in enumerate(totals)]
