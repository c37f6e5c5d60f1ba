"""Pre-emption: SIGTERM (what cluster schedulers send before they stop a job) and SIGUSR1 (what SLURM can send
ahead of the time limit) ask the run to stop at the next optimiser step, on every rank at the same step, with the
full state saved to last.pt; `cvt train` then exits with `PREEMPTED_EXIT_CODE`.

Schedulers signal every process of the job (SLURM, Kubernetes: the whole process group), so the data loader's
worker processes receive the signal too. A worker must not die of it: the trainer still needs batches until its
step ends, and a dead worker fails the run before anything is saved (torch's worker dies at once of a SIGTERM that
its parent did not send). A `ShieldedLoader`'s workers start with the signals blocked and keep them blocked; one
thread of each worker takes them with the sender's pid (`sigwaitinfo`): from the parent (the loader shutting it
down, or the parent's exit) the worker ends at once, as torch's does; from anyone else it goes on working for
`WORKER_GRACE_S`, in which the trainer saves and shuts it down, and ends then if it has not been, so nothing waits
for it for ever.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .distributed import DistEnv

logger = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with the state saved; run it again with --resume
WORKER_GRACE_S = 120  # a loader worker ends this long after a scheduler's signal, unless shut down before


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
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPT_SIGNALS)  # as inherited; every thread started later inherits it
    threading.Thread(target=_take_signals, args=(os.getppid(),), name="cvt-signals", daemon=True).start()
    if init_fn is not None:
        init_fn(worker_id)


def _take_signals(parent: int) -> None:
    """A worker's signal thread: exit at once on a signal from `parent`, `WORKER_GRACE_S` after one from elsewhere."""
    deadline = None
    while True:
        if deadline is None:
            info = signal.sigwaitinfo(PREEMPT_SIGNALS)
        else:
            info = signal.sigtimedwait(PREEMPT_SIGNALS, max(deadline - time.monotonic(), 0.0))
        if info is None:  # the grace has run out and the trainer has not shut this worker down
            os._exit(1)
        if info.si_pid == parent:  # the loader ends its worker (what torch's own handler does)
            os._exit(0)
        deadline = deadline or time.monotonic() + WORKER_GRACE_S  # a later signal does not move it


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
