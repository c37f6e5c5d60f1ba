"""Pre-emption: SIGTERM (what cluster schedulers send before they stop a job) and SIGUSR1 (what SLURM can send
ahead of the time limit) ask the run to stop at the next optimiser step, on every rank at the same step, with the
full state saved to last.pt; `cvt train` then exits with `PREEMPTED_EXIT_CODE`.

Schedulers signal every process of the job (SLURM, Kubernetes: the whole process group), so the data loader's
worker processes receive the signal too. A worker must not die of it: the trainer still needs batches until its
step ends, and a dead worker fails the run before anything is saved. A `ShieldedLoader`'s workers outlive the
signal by `WORKER_GRACE_S`, in which the trainer saves and shuts its workers down; a worker that is never shut down
still ends then, so nothing waits for it for ever. The workers start with the signals blocked, so that one arriving
while they start waits for their handler instead of meeting torch's (which dies of a signal its parent did not send).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .distributed import DistEnv

logger = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with the state saved; run it again with --resume
WORKER_GRACE_S = 120  # a loader worker ends this long after a pre-emption signal (SIGALRM), unless shut down before


class ShieldedLoader(DataLoader):
    """A `DataLoader` whose worker processes outlive a pre-emption signal by `WORKER_GRACE_S` (see the module notes).

    Takes `DataLoader`'s arguments; a `worker_init_fn` given still runs, after the shield is up.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["worker_init_fn"] = functools.partial(_shield_worker, kwargs.get("worker_init_fn"))
        super().__init__(*args, **kwargs)

    def _get_iterator(self) -> Any:  # the workers start here: with the signals blocked, which they inherit
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal that came meanwhile is taken now


def _shield_worker(init_fn: Callable[[int], None] | None, worker_id: int) -> None:
    for sig in PREEMPT_SIGNALS:  # replaces torch's SIGTERM handler in the worker
        signal.signal(sig, _worker_signalled)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPT_SIGNALS)
    if init_fn is not None:
        init_fn(worker_id)


def _worker_signalled(signum: int, frame: object) -> None:
    pending = signal.alarm(0)
    signal.alarm(pending or WORKER_GRACE_S)  # SIGALRM ends the worker; a later signal does not move the deadline


class StopRequest:
    """Whether a pre-emption signal reached this process, and (`agreed`) whether it reached any rank."""

    def __init__(self) -> None:
        self.received: int = 0  # the signal number, 0 for none
        self.agreed: str | None = None  # the signal's name once every rank has agreed to stop

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Catch the pre-emption signals for the body (main thread only); the previous handlers afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPT_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.received:
            self.received = signum
            logger.warning("%s received: stopping at the next step with the state saved", signal.Signals(signum).name)

    def check(self, env: DistEnv) -> bool:
        """Whether any rank received a signal (collective: every rank must call it at the same step)."""
        code = self.received
        if env.distributed:
            flag = torch.tensor([code], dtype=torch.int64, device=env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code:
            self.agreed = signal.Signals(code).name
        return bool(code)
