"""The run directory rank 0 writes: config.json, metrics.csv, summary.json, curves.png and TensorBoard events
(the checkpoints beside them are `state.save_checkpoint`'s), and the lock that makes it one run's.

The directory follows the rule of every writer (`cvt.outputs`): it never is, contains or lies inside the data or
the checkpoint the run reads, and it is written only when new, empty or cvt's (marked, or a run from before the
marker, with its `last.pt`), unless `overwrite`.

The lock is `run.lock`, created exclusively, holding the owner's PID, host and start time. A second run on the same
directory is refused with a message naming the owner; a lock whose owner is gone (same host, no such process) is
stale and taken over with a warning. Holding it, rank 0 removes the temporary files that a killed run's atomic
writes left behind.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from .._optional import require
from ..fileio import atomic_write, write_error, write_json
from ..outputs import check_output, check_output_folder, mark_folder

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
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
PLOT_EVERY_S = 30  # drawing takes about a second: at most this often, and at the end
LOCK_FILE = "run.lock"
# the files of a run written through `fileio.atomic_write` (temporary names `.<name>.<random>.tmp`)
RUN_FILES = ("config.json", "metrics.csv", "summary.json", "curves.png", "last.pt", "last.prev.pt", "best.pt")
EMPTY_LOCK_GRACE_S = 10  # a lock file still empty after this long was left by a run killed as it took the lock
LEGACY_RUN_FILES = ("last.pt", "last.prev.pt", "best.pt", LOCK_FILE)  # a run directory from before the marker


class RunDirLocked(RuntimeError):
    """The run directory belongs to another run that is still alive."""


class RunDir:
    """The run directory of one process; only the main one (rank 0) writes anything.

    Args:
        path: the directory.
        main: whether this process writes.
        data: the dataset the run reads, which the directory must keep off (not be, contain or lie inside).
        init: the checkpoint the run starts from, likewise (not be or contain).
        resume: the checkpoint the run resumes from; in the directory, it is the run's own.
        overwrite: write into a directory that holds files cvt did not write.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        main: bool,
        data: str | os.PathLike | None = None,
        init: str | os.PathLike | None = None,
        resume: str | os.PathLike | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path, self.main = Path(path), main
        self.data, self.init, self.overwrite = data, init, overwrite
        resumed = Path(resume).expanduser() if resume is not None else None
        own = resumed is not None and resumed.is_file() and resumed.resolve().parent == self.path.resolve()
        self._own_names = (*LEGACY_RUN_FILES, *((resumed.name,) if own else ()))
        self.writer: Any = None
        self._plotted = time.perf_counter()
        self._lock: Path | None = None

    def lock(self) -> None:
        """Make the directory this run's (main process): create it, take the lock, remove stale temporary files.

        Raises:
            OutputError: the directory is, contains or lies inside an input, or holds files cvt did not write
                (every process checks the inputs; the main one the directory's files).
            RunDirLocked: another live run holds the lock.
            OSError: the directory cannot be created or written (the message names it and the cause).
        """
        check_output(self.path, [self.init], folder=True, datasets=[self.data])
        if not self.main:
            return
        check_output_folder(self.path, overwrite=self.overwrite, legacy=self._own_names)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = take_lock(self.path / LOCK_FILE)
            mark_folder(self.path, "cvt train")  # after the lock: a live run's directory stays as it is
        except (PermissionError, FileExistsError, NotADirectoryError) as err:
            raise write_error(f"to the run directory {self.path} (creating it and its {LOCK_FILE})", err) from None
        for name in RUN_FILES:
            for tmp in self.path.glob(f".{name}.*.tmp"):
                logger.info("removing %s, left by an interrupted write", tmp)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def unlock(self) -> None:
        """Release the lock if this process holds it."""
        if self._lock is not None:
            with contextlib.suppress(FileNotFoundError):
                if _read_lock(self._lock).get("pid") == os.getpid():
                    self._lock.unlink()
            self._lock = None

    def start(self, config: dict[str, Any], *, tensorboard: bool = False) -> None:
        """Create the directory, write config.json and, with `tensorboard`, open the event writer."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(config, self.path / "config.json")
        if tensorboard:
            board = require("torch.utils.tensorboard", package="tensorboard", extra="tensorboard",
                            purpose="TrainConfig(tensorboard=True)")  # fmt: skip
            self.writer = board.SummaryWriter(str(self.path / "tb"))

    def log_epoch(self, row: dict[str, Any], history: list[dict[str, Any]], epochs: int) -> None:
        """Record a finished epoch: metrics.csv, the curves (now and then), TensorBoard and one log line."""
        if not self.main:
            return
        write_metrics(self.path / "metrics.csv", history)
        if time.perf_counter() - self._plotted > PLOT_EVERY_S:
            self._plot(history)
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
            epochs,
            row["train_loss"],
            val,
            row["lr"],
            row["throughput"],
        )

    def close(self, history: list[dict[str, Any]]) -> None:
        """Close TensorBoard and draw the final curves."""
        if self.writer is not None:
            self.writer.close()
        if self.main and history:
            try:
                self._plot(history)
            except OSError as err:  # e.g. the disk that stopped the run is full: that error is the one to see
                logger.warning("could not draw %s: %s", self.path / "curves.png", err)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write summary.json."""
        if self.main:
            write_json(summary, self.path / "summary.json")

    def _plot(self, history: list[dict[str, Any]]) -> None:
        plot_curves(history, self.path / "curves.png")
        self._plotted = time.perf_counter()


def take_lock(lock: Path) -> Path:
    """Create `lock` exclusively with this process's PID, host and start time; take over a stale one."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(lock)
            if not _stale(lock, owner):
                raise RunDirLocked(
                    f"{lock.parent} is in use by another run: pid {owner.get('pid')} on host {owner.get('host')}, "
                    f"started {owner.get('started')} ({lock}); wait for it to end or choose another output. If that "
                    f"run is gone, delete {lock}"
                ) from None
            logger.warning("%s: taking over the stale lock of pid %s on %s (no such process)", lock,
                           owner.get("pid"), owner.get("host"))  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunDirLocked(f"{lock}: could not take the lock (another run keeps taking it); choose another output")


def _read_lock(lock: Path) -> dict[str, Any]:
    try:
        owner = json.loads(lock.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _stale(lock: Path, owner: dict[str, Any]) -> bool:
    """Whether the lock's owner is gone: on this host and no such process (another host's cannot be checked)."""
    if not owner:  # empty or garbage: its owner died between creating and writing it, or is writing it now
        try:
            return time.time() - lock.stat().st_mtime > EMPTY_LOCK_GRACE_S
        except FileNotFoundError:
            return True
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv: one row per epoch, the columns of `CSV_COLUMNS` (empty where a value is missing); epochs are
    numbered from 1, as the log and summary.json's best_epoch number them (the history counts from 0)."""
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({**{k: row.get(k, "") for k in CSV_COLUMNS}, "epoch": row["epoch"] + 1})


def plot_curves(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Loss, accuracy and learning rate per epoch, as a PNG."""
    import matplotlib  # noqa: PLC0415 - heavy (seconds with pyplot): only when drawing

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
