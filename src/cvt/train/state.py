"""The training state: where a run stands (epoch, step, history, best epoch), saved into and restored from the
"cvt.train" checkpoint format of `cvt.checkpoint.training`, with everything else a bit-identical resume needs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, read_training_checkpoint, write_training_checkpoint
from ..engine import EpochMeter, NonFiniteLossError
from ..model import model_metadata
from .build import Run
from .config import TrainConfig
from .distributed import (
    DistEnv,
    all_finite,
    barrier,
    gather_rng,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    sync_buffers,
)
from .rng import seed_everything, set_rng_state

logger = logging.getLogger(__name__)

PREVIOUS = "last.prev.pt"  # last.pt before the latest write, kept until the new one is complete and verified


class NonFiniteWeightsError(NonFiniteLossError):
    """The weights became NaN or infinite (after a step whose loss was still finite): nothing is saved."""

    def __init__(self, epoch: int, step: int, global_step: int, value: float) -> None:
        super().__init__(epoch, step, global_step, value)
        self.args = (
            f"non-finite weights after step {step} of epoch {epoch} (global step {global_step}; all counted from 0): "
            "not saved as a checkpoint",
        )


@dataclass
class TrainState:
    """Where a run stands.

    Attributes:
        epoch: the epoch in progress (0-based; `epochs` when done).
        step: optimiser steps of that epoch already done.
        global_step: optimiser steps of the whole run.
        meter: the running sums of the epoch in progress.
        history: one row per finished epoch (what metrics.csv holds).
        best: top-1, top-5 and epoch of the best validation top-1 so far.
        elapsed: training and evaluation time of the run so far, in seconds.
    """

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    meter: EpochMeter = field(default_factory=EpochMeter)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"top1": None, "top5": None, "epoch": None})
    elapsed: float = 0.0


AUTO_RESUME = ("auto", "", "last")


def resolve_resume(resume: str, output: str | os.PathLike, *, fresh_ok: bool = False) -> Path | None:
    """The checkpoint file `resume` names: a file, a run directory (its last.pt), or "auto" (output/last.pt).

    With `fresh_ok`, "auto" where `output` holds no last.pt gives None (start a new run): one command line then
    serves the first start and every restart.
    """
    path = Path(output) / "last.pt" if resume in AUTO_RESUME else Path(resume)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        if fresh_ok and resume in AUTO_RESUME:
            logger.info("no checkpoint at %s: starting a new run", path)
            return None
        raise FileNotFoundError(f"no checkpoint to resume from at {path}")
    return path


def save_checkpoint(
    path: Path, run: Run, state: TrainState, cfg: TrainConfig, env: DistEnv, *, full: bool = True
) -> None:
    """Write the run's checkpoint (rank 0 writes; collective: every rank must call it).

    Args:
        path: the file (`last.pt`, `best.pt`).
        run: the run's objects.
        state: where it stands.
        cfg: its config (recorded, so that `--resume` can run without one).
        env: this process.
        full: everything a resume needs; False for the weights and metadata alone (`best.pt`).
    """
    sync_buffers(run.net, env)
    if not all_finite(run.net, env):
        raise NonFiniteWeightsError(state.epoch, state.step, state.global_step, float("nan"))
    weights = model_state(run.net, run.fsdp)
    optimizer = optimizer_state(run.net, run.optimizer, run.fsdp) if full else None
    rng = gather_rng(env) if full else None
    if env.main:
        resumable = {
            "optimizer": optimizer,
            "scheduler": run.scheduler.state_dict() if full else None,
            "scaler": run.scaler.state_dict() if full and run.scaler is not None else None,
            "rng": rng,
            "world_size": env.world_size,
            "epoch": state.epoch,
            "step": state.step,
            "global_step": state.global_step,
            "meter": state.meter.state_dict() if full else None,
            "history": state.history,
            "best": state.best,
            "elapsed": state.elapsed,
            "train_config": cfg.to_dict(),
        }
        ema = run.ema.state_dict() if run.ema is not None else None
        previous = path.with_name(PREVIOUS) if path.name == "last.pt" else None
        write_training_checkpoint(path, weights, model_metadata(run.net), ema=ema, state=resumable, previous=previous)
    barrier(env)


def read_resume_checkpoint(path: Path) -> tuple[Path, dict[str, Any]]:
    """(file, checkpoint) to resume from: `path`, or when a last.pt is damaged the last.prev.pt kept beside it.

    Raises:
        CheckpointError: the file (and its fallback) is no full training checkpoint; the message names the file,
            what it is and what to do.
    """
    try:
        return path, read_training_checkpoint(path, resumable=True)
    except CheckpointError as err:
        previous = path.with_name(PREVIOUS)
        if path.name != "last.pt":
            raise
        if not previous.is_file():
            raise CheckpointError(
                f"{err}; there is no {PREVIOUS} beside it to fall back to: resume from another checkpoint, or start "
                "a new run in another output"
            ) from None
        logger.warning("%s; resuming from the previous checkpoint %s instead", err, previous)
        return previous, read_training_checkpoint(previous, resumable=True)


def restore(path: Path, run: Run, cfg: TrainConfig, env: DistEnv) -> TrainState:
    """Load a full checkpoint into the run's objects and this process's RNGs; returns where the run stood."""
    path, ckpt = read_resume_checkpoint(path)
    if list(ckpt["class_names"]) != list(run.classes):
        raise ValueError(f"{path} was trained on classes {ckpt['class_names']}, the data has {run.classes}")
    load_model_state(run.net, ckpt["model"], run.fsdp)
    load_optimizer_state(run.net, run.optimizer, ckpt["optimizer"], run.fsdp)
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt["scaler"] is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])
    state = TrainState(
        epoch=ckpt["epoch"],
        step=ckpt["step"],
        global_step=ckpt["global_step"],
        meter=EpochMeter(**ckpt["meter"]),
        history=list(ckpt["history"]),
        best=dict(ckpt["best"]),
        elapsed=ckpt["elapsed"],
    )
    rng = ckpt["rng"]
    if len(rng) == env.world_size:
        set_rng_state(rng[env.rank])
    else:
        logger.warning(
            "checkpoint has RNG states of %d process(es), this run has %d: reseeding (not bit-identical)",
            len(rng),
            env.world_size,
        )
        seed_everything(cfg.seed + 1000 * state.global_step + env.rank)
    logger.info(  # epochs counted from 1, as the log and the progress bar count them
        "resumed from %s at epoch %d, step %d (global step %d)", path, state.epoch + 1, state.step, state.global_step
    )
    return state


def repair_best(run_dir: Path, run: Run, state: TrainState, cfg: TrainConfig, env: DistEnv) -> None:
    """Make best.pt hold the epoch the resumed state names as best (collective).

    At an epoch end last.pt is written before best.pt; a run killed between the two leaves best.pt one improvement
    behind, while last.pt holds the new best epoch's weights (it was written at that epoch's end): they are
    written to best.pt.
    """
    epoch = state.best["epoch"]
    if epoch is None:
        return
    best = run_dir / "best.pt"
    try:
        recorded = read_training_checkpoint(best)["best"]["epoch"] if best.is_file() else None
    except (CheckpointError, KeyError, TypeError):
        recorded = None
    if recorded == epoch:
        return
    if (state.epoch, state.step) != (epoch + 1, 0):
        logger.warning("%s holds epoch %s, not the best epoch %d, and cannot be repaired from here", best,
                       recorded, epoch + 1)  # fmt: skip
        return
    logger.warning("%s holds epoch %s, not the best epoch %d (stopped between last.pt and best.pt): rewriting it",
                   best, None if recorded is None else recorded + 1, epoch + 1)  # fmt: skip
    save_checkpoint(best, run, state, cfg, env, full=False)
