"""`train(cfg)`: build, resume, then for each epoch train, evaluate, record and save."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, read_training_checkpoint
from ..engine import EpochMeter, EpochPlan, NonFiniteLossError, evaluate, train_one_epoch
from .build import Run, build_run, check_options
from .config import TrainConfig
from .distributed import DistEnv, setup_env, sync_buffers, teardown_env
from .finetune import FineTuneStart
from .preempt import PREEMPTED_EXIT_CODE, StopRequest
from .rng import deterministic
from .run_dir import RunDir
from .state import PREVIOUS, TrainState, repair_best, resolve_resume, restore, save_checkpoint

logger = logging.getLogger(__name__)


def train(cfg: TrainConfig, *, start: FineTuneStart | None = None) -> dict[str, Any]:
    """Train (or resume training) as `cfg` says; returns the summary also written to summary.json.

    `start`: what `plan_finetune` read to make `cfg` (the checkpoint, the training split's listing), built from
    instead of being read again.

    Under `torchrun` (WORLD_SIZE > 1) this runs data-parallel on every process: DDP, or FSDP2 with `cfg.fsdp`.
    The process group is created here when none exists, and destroyed at the end.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the last checkpoint written before is left as it was.
    """
    env = setup_env(cfg.device)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with contextlib.ExitStack() as stack, deterministic(cfg.deterministic), StopRequest().installed() as stop:
            stack.enter_context(_reported(env))
            check_options(cfg, env)
            run_dir = RunDir(cfg.output, main=env.main, data=cfg.data, init=cfg.init, resume=cfg.resume,
                             overwrite=cfg.overwrite)  # fmt: skip
            run_dir.lock()
            stack.callback(run_dir.unlock)
            resume = resolve_resume(cfg.resume, cfg.output, fresh_ok=True) if cfg.resume is not None else None
            output = Path(cfg.output)
            if resume is None and (output / "last.pt").exists():
                raise ValueError(f"{output} already holds a run (last.pt): resume it or choose another output")
            run = build_run(cfg, env, start)
            state = restore(resume, run, cfg, env) if resume is not None else TrainState()
            if resume is not None:
                repair_best(run_dir.path, run, state, cfg, env)
            run_dir.start(cfg.to_dict(), tensorboard=cfg.tensorboard)
            _log_plan(cfg, env, run, state)
            status = "stopped"
            try:
                status = _epochs(cfg, env, run, state, run_dir, stop)
            except NonFiniteLossError as err:
                raise _with_note(err, f"training stopped; {_keep_good(run_dir.path, err, env)}") from err
            finally:
                run_dir.close(state.history)
            summary = _summary(cfg, env, run, state, run_dir, status == "completed")
            summary["preempted"] = stop.agreed
            run_dir.write_summary(summary)
            return summary
    finally:
        torch.set_num_threads(threads)
        teardown_env(env)


def _epochs(cfg: TrainConfig, env: DistEnv, run: Run, state: TrainState, run_dir: RunDir, stop: StopRequest) -> str:
    """Train from where `state` stands to the end: "completed", "stopped" (by `max_steps`) or "preempted" (by a
    signal, see `preempt`; the state is saved at the step where every rank stopped)."""
    estimate = _Estimate(cfg, run, state)
    while state.epoch < cfg.epochs:
        if _stop(cfg, state):
            return "stopped"
        if stop.check(env):
            return _preempted(cfg, env, run, state, run_dir, stop)
        started = time.perf_counter()
        result = train_one_epoch(
            run.learner,
            _epoch_batches(cfg, run, state),
            EpochPlan(
                state.epoch,
                run.steps_per_epoch,
                start_step=state.step,
                global_step=state.global_step,
                max_steps=_next_stop(cfg, state.global_step),
                meter=state.meter,
                epochs=cfg.epochs,
            ),
            run.step_settings,
            should_stop=lambda: estimate.step() or stop.check(env),
            progress=_progress(cfg, env),
        )
        if not result.finished and not stop.agreed and result.global_step != _next_stop(cfg, state.global_step):
            raise RuntimeError(
                f"epoch {state.epoch + 1}: the training data ran out after step {result.step} of "
                f"{run.steps_per_epoch} (rank {env.rank}); the data changed while training, or its loader "
                "yields fewer batches than it counts"
            )
        state.step, state.global_step = result.step, result.global_step
        state.elapsed += time.perf_counter() - started
        if not result.finished:  # stopped inside the epoch: by max_steps, a signal or for a periodic checkpoint
            if stop.agreed:
                return _preempted(cfg, env, run, state, run_dir, stop)
            save_checkpoint(run_dir.path / "last.pt", run, state, cfg, env)
            if _stop(cfg, state):
                logger.info("stopped after %d step(s) (max_steps); resume with --resume", state.global_step)
                return "stopped"
            continue
        started = time.perf_counter()
        row = {
            "epoch": state.epoch,
            "global_step": state.global_step,
            "lr": run.scheduler.last_lr,
            "train_loss": state.meter.loss,
            "throughput": state.meter.samples / max(state.meter.seconds, 1e-9),
            "epoch_time": state.meter.seconds,
        }
        row.update(_evaluate(cfg, env, run))
        state.elapsed += time.perf_counter() - started
        row["elapsed"] = state.elapsed
        state.history.append(row)
        top1 = row.get("val_top1")
        improved = top1 is not None and (state.best["top1"] is None or top1 > state.best["top1"])
        if improved:
            state.best = {"top1": top1, "top5": row["val_top5"], "epoch": state.epoch}
        state.epoch, state.step, state.meter = state.epoch + 1, 0, EpochMeter()
        run_dir.log_epoch(row, state.history, cfg.epochs)
        estimate.epoch_done(row["epoch_time"] + time.perf_counter() - started)
        save_checkpoint(run_dir.path / "last.pt", run, state, cfg, env)
        if improved:
            save_checkpoint(run_dir.path / "best.pt", run, state, cfg, env, full=False)
        if _stop(cfg, state) and state.epoch < cfg.epochs:
            logger.info("stopped after %d step(s) (max_steps); resume with --resume", state.global_step)
            return "stopped"
    return "completed"


@contextlib.contextmanager
def _reported(env: DistEnv) -> Iterator[None]:
    """Let the run's plan and per-epoch lines reach stderr (rank 0) when the caller configured no logging, as
    `cvt train` shows them: `train(cfg)` from Python reports each epoch the same way."""
    package = logging.getLogger("cvt")
    if not env.main or logging.getLogger().handlers or package.handlers or package.level > logging.INFO:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    package.addHandler(handler)
    level, package.level = package.level, logging.INFO
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.level = level


def _log_plan(cfg: TrainConfig, env: DistEnv, run: Run, state: TrainState) -> None:
    """What the run will do, said when it starts: epochs, steps, images per epoch, input size, batch, rate."""
    steps = cfg.epochs * run.steps_per_epoch
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    logger.info(
        "training %s on %d image(s), %d class(es) at %dx%d: %d epoch(s) x %d step(s) = %d step(s) (%d to go), "
        "%d image(s) per epoch; %d process(es) x batch %d x accumulation %d = %d, lr %.3g; a time estimate follows "
        "the first steps",
        f"{run.net.model_name} from {cfg.init}" if cfg.init else run.net.model_name,
        len(run.train_ds),
        len(run.classes),
        cfg.input_size,
        cfg.input_size,
        cfg.epochs,
        run.steps_per_epoch,
        steps,
        max(0, steps - state.global_step),
        run.steps_per_epoch * run.global_batch,
        env.world_size,
        cfg.batch_size,
        cfg.accum_steps,
        run.global_batch,
        run.lr,
    )


class _Estimate:
    """Logs once how long an epoch and the rest of the run will take: from the pace of the optimiser steps after
    the first (which pays for warm-up), or from the first whole epoch when an epoch is too short for that."""

    STEPS = 5  # steps timed after the first

    def __init__(self, cfg: TrainConfig, run: Run, state: TrainState) -> None:
        self.cfg, self.run, self.state = cfg, run, state
        self.calls, self.started, self.done = 0, 0.0, False

    def step(self) -> bool:
        """Called after each optimiser step that does not end an epoch; never asks to stop."""
        self.calls += 1
        if self.calls == 1:
            self.started = time.perf_counter()
        elif self.calls == self.STEPS + 1 and not self.done:
            per_step = (time.perf_counter() - self.started) / self.STEPS
            self._log(per_step * self.run.steps_per_epoch, "training steps only; validation adds to it")
        return False

    def epoch_done(self, seconds: float) -> None:
        if not self.done:
            self._log(seconds, "from the first epoch")

    def _log(self, per_epoch: float, basis: str) -> None:
        self.done = True
        left = self.cfg.epochs - self.state.epoch  # during an epoch: counting it; after one: the ones after it
        logger.info("estimated time: %s per epoch, %s for the %d epoch(s) left (%s)", _duration(per_epoch),
                    _duration(per_epoch * left), left, basis)  # fmt: skip


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _preempted(cfg: TrainConfig, env: DistEnv, run: Run, state: TrainState, run_dir: RunDir, stop: StopRequest) -> str:
    """Save the full state where every rank stopped, and say so."""
    last = run_dir.path / "last.pt"
    save_checkpoint(last, run, state, cfg, env)
    if env.main:
        logger.warning(
            "%s: stopped at epoch %d, step %d (global step %d) with the full state saved to %s; continue with "
            "`cvt train --resume %s` (exit code %d)",
            stop.agreed,
            state.epoch + 1,
            state.step,
            state.global_step,
            last,
            run_dir.path,
            PREEMPTED_EXIT_CODE,
        )
    return "preempted"


def _keep_good(path: Path, err: NonFiniteLossError, env: DistEnv) -> str:
    """Leave only a good last.pt after a non-finite loss, and say which: a last.pt written right before the step
    that failed holds the weights that gave it (the step's loss is their first test), so the previous one replaces
    it. Returns the note for the error message."""
    last, previous = path / "last.pt", path / PREVIOUS
    if not last.exists():
        return "no checkpoint was written"
    try:
        step = read_training_checkpoint(last)["global_step"]
    except CheckpointError:
        step = None
    if step != err.global_step:
        return f"the last good checkpoint {last} is kept"
    if not previous.exists():
        if env.main:
            os.replace(last, path / "last.diverged.pt")
        return f"{last} held the weights that gave it (now last.diverged.pt); no good checkpoint is left"
    if env.main:
        os.replace(previous, last)
    return f"{last} held the weights that gave it: replaced by the previous checkpoint, the last good one"


def _stop(cfg: TrainConfig, state: TrainState) -> bool:
    return cfg.max_steps is not None and state.global_step >= cfg.max_steps


def _next_stop(cfg: TrainConfig, global_step: int) -> int | None:
    """The global step at which train_one_epoch must return: max_steps or the next periodic checkpoint."""
    stops = []
    if cfg.max_steps is not None:
        stops.append(cfg.max_steps)
    if cfg.save_every_steps:
        stops.append((global_step // cfg.save_every_steps + 1) * cfg.save_every_steps)
    return min(stops) if stops else None


def _epoch_batches(cfg: TrainConfig, run: Run, state: TrainState) -> Any:
    """The training loader positioned at optimiser step `state.step` of epoch `state.epoch`."""
    if hasattr(run.train_ds, "set_epoch"):
        run.train_ds.set_epoch(state.epoch)
    skip = state.step * cfg.accum_steps
    if run.sampler is not None:
        run.sampler.set_epoch(state.epoch, start=skip * cfg.batch_size)
        return run.train_loader
    return itertools.islice(iter(run.train_loader), skip, None)  # streaming data: read past the seen batches


def _progress(cfg: TrainConfig, env: DistEnv) -> bool:
    return cfg.progress and env.main and sys.stderr.isatty()


def _evaluate(cfg: TrainConfig, env: DistEnv, run: Run) -> dict[str, Any]:
    """Validation loss and top-1/top-5 (and the EMA's top-1/top-5), over every rank's share."""
    if run.val_loader is None:
        return {}
    sync_buffers(run.net, env)
    kwargs = {
        "num_classes": len(run.classes),
        "device": env.device,
        "amp_dtype": run.amp_dtype,
        "channels_last": cfg.channels_last,
        "progress": _progress(cfg, env),
    }
    # FSDP needs the sharded module (its forward gathers parameters); DDP is evaluated unwrapped
    res = evaluate(run.model if run.fsdp else run.net, run.val_loader, **kwargs)
    out = {"val_loss": res["loss"], "val_top1": res["top1"], "val_top5": res["top5"]}
    if run.ema is not None:
        ema = evaluate(run.ema.module, run.val_loader, **kwargs)
        out.update(ema_val_top1=ema["top1"], ema_val_top5=ema["top5"])
    return out


def _summary(
    cfg: TrainConfig, env: DistEnv, run: Run, state: TrainState, run_dir: RunDir, completed: bool
) -> dict[str, Any]:
    last = state.history[-1] if state.history else {}
    return {
        "run_dir": str(run_dir.path),
        "completed": completed,
        "epochs": cfg.epochs,
        "epochs_done": len(state.history),
        "global_step": state.global_step,
        "final_top1": last.get("val_top1"),
        "final_top5": last.get("val_top5"),
        "final_train_loss": last.get("train_loss"),
        "best_top1": state.best["top1"],
        "best_top5": state.best["top5"],
        "best_epoch": None if state.best["epoch"] is None else state.best["epoch"] + 1,  # from 1, as the log
        "wall_time_s": state.elapsed,
        "global_batch": run.global_batch,
        "lr": run.lr,
        "world_size": env.world_size,
    }


def _with_note(err: NonFiniteLossError, note: str) -> NonFiniteLossError:
    new = NonFiniteLossError(err.epoch, err.step, err.global_step, err.value)
    new.args = (f"{err.args[0]}; {note}",)
    return new
