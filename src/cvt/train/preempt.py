"""Pre-emption: SIGTERM (what cluster schedulers send before they stop a job) and SIGUSR1 (what SLURM can send
ahead of the time limit) ask the run to stop at the next optimiser step, on every rank at the same step, with the
full state saved to last.pt; `cvt train` then exits with `PREEMPTED_EXIT_CODE`."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .distributed import DistEnv

logger = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request with the state saved; run it again with --resume


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
