"""Dynamic batching on its own (`cvt.serve.batcher`), with a stand-in model whose calls are recorded, and the
request timeout of the server (uvicorn in a thread, a model slowed on purpose)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from cvt.config import CvTConfig, DataConfig
from cvt.model import CvT
from cvt.serve.batcher import DynamicBatcher, QueueFullError

TIMEOUT = 10  # seconds any one wait may take before the test fails


class Recorder:
    """A stand-in model: doubles its input, records each batch's size, and can wait or fail on purpose."""

    def __init__(self, delay: float = 0.0, fail_first: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay, self.fail_first = delay, fail_first
        self.threads: set[str] = set()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.threads.add(threading.current_thread().name)
        self.sizes.append(images.shape[0])
        time.sleep(self.delay)
        if self.fail_first and len(self.sizes) == 1:
            raise RuntimeError("the model broke")
        return images * 2


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def images(n: int, value: float) -> torch.Tensor:
    return torch.full((n, 3, 2, 2), value)


async def started(model: Recorder, **kwargs) -> DynamicBatcher:
    batcher = DynamicBatcher(model, **kwargs)
    await batcher.start()
    return batcher


def test_requests_within_the_delay_run_together_and_each_gets_its_rows():
    model = Recorder()

    async def main():
        batcher = await started(model, max_batch=8, max_delay=0.3)
        outs = await asyncio.gather(*(batcher.submit(images(n, v)) for n, v in ((1, 1.0), (2, 2.0), (1, 3.0))))
        await batcher.stop()
        return outs

    outs = run(main())
    assert model.sizes == [4]
    for out, (n, v) in zip(outs, ((1, 1.0), (2, 2.0), (1, 3.0)), strict=True):
        assert torch.equal(out, images(n, 2 * v))
    assert model.threads == {"cvt-model_0"}  # the model's own thread, not the event loop's


def test_what_does_not_fit_a_batch_opens_the_next():
    model = Recorder()

    async def main():
        batcher = await started(model, max_batch=4, max_delay=0.2)
        await asyncio.gather(*(batcher.submit(images(n, 0.0)) for n in (3, 2, 1)))
        await batcher.stop()

    run(main())
    assert model.sizes == [3, 3]  # 2 did not fit beside 3: it opened the next batch, which 1 joined


def test_a_full_batch_runs_without_waiting_out_the_delay():
    model = Recorder()

    async def main():
        batcher = await started(model, max_batch=4, max_delay=5.0)
        start = time.perf_counter()
        await asyncio.gather(batcher.submit(images(2, 1.0)), batcher.submit(images(2, 2.0)))
        elapsed = time.perf_counter() - start
        await batcher.stop()
        return elapsed

    assert run(main()) < 2.5 and model.sizes == [4]


def test_a_full_queue_refuses_at_once_and_stop_fails_what_waits():
    model = Recorder()

    async def main():
        batcher = await started(model, max_batch=8, max_delay=5.0, max_queue=2)
        waiting = [asyncio.ensure_future(batcher.submit(images(1, 0.0))) for _ in range(2)]
        while batcher.depth < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="--max-queue 2"):
            await batcher.submit(images(1, 0.0))
        await batcher.stop()
        return await asyncio.gather(*waiting, return_exceptions=True)

    results = run(main())
    assert [str(r) for r in results] == ["the server is shutting down"] * 2
    assert model.sizes == []


def test_a_request_whose_caller_gave_up_is_not_run():
    model = Recorder()

    async def main():
        batcher = await started(model, max_batch=8, max_delay=0.3)
        kept = asyncio.ensure_future(batcher.submit(images(1, 1.0)))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(images(2, 5.0)), 0.05)
        out = await kept
        await batcher.stop()
        return out

    assert torch.equal(run(main()), images(1, 2.0))
    assert model.sizes == [1]


def test_a_model_error_reaches_every_request_of_its_batch_and_batching_goes_on():
    model = Recorder(fail_first=True)

    async def main():
        batcher = await started(model, max_batch=8, max_delay=0.1)
        failed = await asyncio.gather(*(batcher.submit(images(1, 0.0)) for _ in range(2)), return_exceptions=True)
        ok = await batcher.submit(images(1, 1.0))
        with pytest.raises(ValueError, match="above the server's --max-batch 8"):
            await batcher.submit(images(9, 0.0))
        await batcher.stop()
        return failed, ok

    failed, ok = run(main())
    assert [str(e) for e in failed] == ["the model broke"] * 2
    assert torch.equal(ok, images(1, 2.0))


def test_the_event_loop_runs_while_the_model_does():
    model = Recorder(delay=0.5)

    async def main():
        batcher = await started(model, max_batch=1, max_delay=0.0)
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await batcher.submit(images(1, 0.0))
        ticker.cancel()
        await batcher.stop()
        return ticks

    assert run(main()) >= 10  # ~50 ticks of 10 ms fit in the model's 0.5 s; none if it blocked the loop


def test_a_request_past_its_timeout_gets_504_and_the_server_stays_ready():
    # uvicorn serves from a thread with the model's first call made slow; run in a child process, so that what its
    # threads leave running (the server's, the model's) ends with the child instead of living on in the test session
    loader = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('serve_batcher', sys.argv[1]); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "module.serve_past_timeout(); print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", loader, __file__], capture_output=True, text=True, timeout=6 * TIMEOUT)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def serve_past_timeout() -> None:
    """The server answers 504 to a request whose model call outlives the timeout, then 200 to the next one."""
    import uvicorn  # noqa: PLC0415

    from cvt.serve.app import ServeSettings, create_app  # noqa: PLC0415
    from cvt.serve.runner import ServedModel  # noqa: PLC0415

    model = CvT(CvTConfig(dims=(16, 32, 48), depths=(1, 1, 1), heads=(1, 2, 3), num_classes=4))
    model.data_config = DataConfig(input_size=(32, 32))
    served = ServedModel(model, "slow", backend="torch")
    fast = served.logits
    fast(torch.zeros(1, 3, 32, 32))  # the first call's set-up is not what the timeout should catch
    slow_calls = []

    def slow_logits(x: torch.Tensor) -> torch.Tensor:
        if not slow_calls:
            slow_calls.append(1)
            time.sleep(1.5)
        return fast(x)

    served.logits = slow_logits
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(served, ServeSettings(max_batch=1, max_delay_ms=0, timeout_s=0.5))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()

    def infer() -> tuple[int, dict]:
        body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("POST", "/v2/models/slow/infer", json.dumps(body))
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        status, answer = infer()
        assert status == 504 and answer["error"] == "no answer within the server's timeout of 0.5 s"
        time.sleep(1.5)  # the slow call ends
        status, answer = infer()
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 4]
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
    assert not thread.is_alive()
