"""Dynamic batching: requests wait in a bounded queue and run together, up to `max_batch` images within `max_delay`.

One asyncio task takes the first waiting request, then keeps taking requests until the batch holds `max_batch`
images or `max_delay` has passed since the first one arrived, concatenates them and hands the batch to `run` in a
worker thread (one thread: the model owns the cores, and the event loop never waits on it). Each request gets its
own rows of the output back. With `max_queue` requests waiting (queued, or in a batch still gathering), the next
is refused at once (`QueueFullError`, which the server answers with 503 and `Retry-After`); a request whose caller
stopped waiting (timeout, disconnect) is dropped before it is run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The batcher's queue holds `max_queue` requests already: try again later."""


class BatcherStoppedError(RuntimeError):
    """The batcher stopped (the server is shutting down) before the request ran."""


@dataclass
class _Item:
    images: torch.Tensor  # (n, 3, H, W)
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Collect requests into batches and run them on one worker thread.

    Args:
        run: the model: a batch (B, 3, H, W) -> outputs (B, ...), called on the worker thread.
        max_batch: images per batch at most (1 turns batching off).
        max_delay: seconds the first request of a batch waits for others to join it (0: run what is waiting).
        max_queue: requests waiting at most; more raise `QueueFullError`.
        on_batch: called with each batch's image count and the seconds it ran (for metrics), on the event loop.
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch: int = 8,
        max_delay: float = 0.005,
        max_queue: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, max_delay >= 0: {max_batch}, {max_queue}, {max_delay}"
            )
        self.run, self.max_batch, self.max_delay, self.max_queue = run, max_batch, max_delay, max_queue
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._held: _Item | None = None  # taken from the queue but did not fit the last batch: first in the next
        self._forming: list[_Item] = []  # the batch being gathered
        self._waiting = 0  # requests submitted and not yet running: in the queue, held, or in a forming batch
        self._task: asyncio.Task | None = None
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the model (queued, or in a batch that is still gathering)."""
        return self._waiting

    async def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._queue = asyncio.Queue()  # bounded by `_waiting` (which counts the forming batch too)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cvt-model")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cvt-batcher")

    async def stop(self) -> None:
        """Stop batching (a batch on the worker thread finishes first) and fail the requests still waiting."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        pending = self._forming + ([self._held] if self._held else [])
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        _fail(pending, BatcherStoppedError("the server is shutting down"))
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    async def submit(self, images: torch.Tensor) -> torch.Tensor:
        """Queue `images` (n, 3, H, W) and wait for their outputs (n, ...).

        Raises:
            ValueError: more images than `max_batch`.
            QueueFullError: `max_queue` requests are waiting already.
        """
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        if images.shape[0] > self.max_batch:
            raise ValueError(
                f"{images.shape[0]} images in one request is above the server's --max-batch {self.max_batch}"
            )
        if self._waiting >= self.max_queue:
            raise QueueFullError(f"{self._waiting} requests are waiting already (--max-queue {self.max_queue})")
        item = _Item(images, asyncio.get_running_loop().create_future())
        self._waiting += 1
        self._queue.put_nowait(item)
        return await item.future  # a cancelled wait (timeout, disconnect) cancels the future: it is skipped

    async def _next_batch(self) -> list[_Item]:
        """Wait for a request, then gather more until the batch is full or the delay has passed."""
        first = self._held or await self._queue.get()
        self._held = None
        batch = self._forming = [first]  # kept on self: stop() fails it when it comes while the batch gathers
        size = first.images.shape[0]
        deadline = time.perf_counter() + self.max_delay
        while size < self.max_batch:
            try:
                if self._queue.empty():
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    item = await asyncio.wait_for(self._queue.get(), left)
                else:
                    item = self._queue.get_nowait()
            except asyncio.TimeoutError:  # noqa: UP041 - a distinct class on Python 3.10
                break
            if size + item.images.shape[0] > self.max_batch:
                self._held = item
                break
            batch.append(item)
            size += item.images.shape[0]
        self._waiting -= len(batch)
        self._forming = []
        return [item for item in batch if not item.future.done()]  # callers that stopped waiting are dropped

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            images = torch.cat([item.images for item in batch])  # (n1 + n2 + ..., 3, H, W)
            start = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._worker, self.run, images)
            except asyncio.CancelledError:
                _fail(batch, BatcherStoppedError("the server is shutting down"))
                raise
            except Exception as err:  # the model failed: every request of the batch hears why, the loop goes on
                logger.exception("the model failed on a batch of %d images", images.shape[0])
                _fail(batch, err)
                continue
            if self.on_batch is not None:
                self.on_batch(images.shape[0], time.perf_counter() - start)
            for item, rows in zip(batch, outputs.split([i.images.shape[0] for i in batch]), strict=True):
                if not item.future.done():
                    item.future.set_result(rows)


def _fail(items: list[_Item], err: Exception) -> None:
    """Answer the requests still waiting among `items` with `err`."""
    for item in items:
        if not item.future.done():
            item.future.set_exception(err)
