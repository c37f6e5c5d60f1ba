"""Throughput and latency of `cvt serve` at 1, 4 and 16 concurrent clients, batching on and off, beside `cvt predict`.

    .venv/bin/python benchmarks/bench_serve.py                 # CvT-13 at 224 (random weights): ~3-5 min on 2 cores
    .venv/bin/python benchmarks/bench_serve.py --model PATH --requests 10 20 40   # another model, fewer requests

Loopback only (127.0.0.1). Each client holds one connection and posts a real photo (scikit-learn's two sample
images, JPEG) to `/predict`, one request after another, so the server decodes, batches and runs the model as it
would for real clients. "batching" serves with `--max-batch 16 --max-delay-ms 10`, "batch of one" with
`--max-batch 1 --max-delay-ms 0`; both servers run side by side and their cells alternate, so that a drifting load
on a shared machine favours neither. `cvt predict` classifies the same photos as files (`--batch-size 16`); its row
gives the images per second of the batch work alone (the wall time of the run on all the images minus that of a run
on two, which is the start-up and model load) and, in the latency columns, nothing. Bounded: a fixed number of
requests per cell and `--max-seconds` per cell; requests not sent in time are reported.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
MODES = {
    "batch of one": ("--max-batch", "1", "--max-delay-ms", "0"),
    "batching": ("--max-batch", "16", "--max-delay-ms", "10"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def write_inputs(root: Path, model: str, count: int) -> tuple[Path, list[Path]]:
    """The model as a folder (a registered name gets random weights: nothing is downloaded) and `count` photo files."""
    import torch  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from sklearn.datasets import load_sample_images  # noqa: PLC0415

    import cvt  # noqa: PLC0415
    from cvt.checkpoint.save import save_model  # noqa: PLC0415

    if Path(model).exists():
        model_dir = Path(model)
    else:
        torch.manual_seed(0)
        model_dir = root / "model"
        save_model(cvt.create_model(model), model_dir)
    photos = []
    for i, pixels in enumerate(load_sample_images().images):
        photos.append(root / f"photo{i}.jpg")
        Image.fromarray(pixels).save(photos[-1], quality=90)
    return model_dir, [photos[i % len(photos)] for i in range(count)]


class Server:
    def __init__(self, model_dir: Path, backend: str, options: tuple[str, ...], env: dict[str, str]) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "cvt", "serve", "--model", str(model_dir), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "--backend", backend, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        deadline = time.monotonic() + 300
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("cvt serve did not start")
            time.sleep(0.2)

    def batches(self) -> tuple[float, float]:
        """(model runs, images run) so far, from the server's /metrics."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        conn.request("GET", "/metrics")
        values = dict(
            line.split(" ", 1)
            for line in conn.getresponse().read().decode().splitlines()
            if line.startswith("cvt_batch_size_")
        )
        return float(values["cvt_batch_size_count"]), float(values["cvt_batch_size_sum"])

    def _ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load(port: int, images: list[bytes], clients: int, requests: int, max_seconds: float) -> dict:
    """`clients` threads share `requests` POSTs to /predict; latencies, failures and images per second."""
    latencies, failures, lock = [], [], threading.Lock()
    next_index = iter(range(requests))
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=max_seconds)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                conn.request("POST", "/predict", images[i % len(images)], {"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                ok = response.status == 200 and len(json.loads(response.read())) == 5
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn, ok = http.client.HTTPConnection(HOST, port, timeout=max_seconds), False
            with lock:
                (latencies if ok else failures).append(time.perf_counter() - start)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 60)
    wall = time.perf_counter() - start
    done = sorted(latencies)
    return {
        "ok": len(done),
        "failed": len(failures),
        "not sent": requests - len(done) - len(failures),
        "per_s": len(done) / wall,
        "p50": 1000 * statistics.median(done) if done else float("nan"),
        "p99": 1000 * done[min(len(done) - 1, round(0.99 * (len(done) - 1)))] if done else float("nan"),
    }


def cell(server: Server, images: list[bytes], clients: int, requests: int, max_seconds: float) -> dict:
    """One row of the table: `load`, and the mean batch size the server ran meanwhile."""
    runs, count = server.batches()
    result = load(server.port, images, clients, requests, max_seconds)
    runs_after, count_after = server.batches()
    return result | {"batch": (count_after - count) / max(runs_after - runs, 1)}


def predict_rate(model_dir: Path, photos: list[Path], backend: str, env: dict[str, str]) -> float:
    """Images per second of `cvt predict --batch-size 16` on `photos`, start-up and model load subtracted."""

    def wall(files: list[Path]) -> float:
        cmd = [sys.executable, "-m", "cvt", "predict", "--model", str(model_dir), "--backend", backend]
        start = time.perf_counter()
        subprocess.run(
            [*cmd, "--batch-size", "16", *map(str, files)], check=True, capture_output=True, timeout=1200, env=env
        )
        return time.perf_counter() - start

    return (len(photos) - 2) / (wall(photos) - wall(photos[:2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13", help="a checkpoint, or a registered name (random weights)")
    parser.add_argument("--backend", default="torch", help="optimize_for_inference backend, for both (default torch)")
    parser.add_argument("--clients", type=int, nargs=3, default=(1, 4, 16), help="concurrency levels (1 4 16)")
    parser.add_argument("--requests", type=int, nargs=3, default=(20, 60, 200), help="requests per level")
    parser.add_argument("--max-seconds", type=float, default=240, help="time limit per cell (default 240)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the server and of cvt predict (OMP_NUM_THREADS; default 1, the faster "
                             "on a machine whose cores are busy with other work; 0 keeps torch's default)")  # fmt: skip
    args = parser.parse_args()
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    print(f"{os.cpu_count()} CPU cores, torch threads {args.threads or 'default'}, model {args.model}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, photos = write_inputs(Path(tmp), args.model, max(args.requests))
        images = [p.read_bytes() for p in photos[:2]]
        servers = {}
        try:
            for mode, options in MODES.items():  # both up at once, the cells interleaved: the load of a shared
                servers[mode] = Server(model_dir, args.backend, options, env)  # machine drifts over minutes
                load(servers[mode].port, images, 2, 4, args.max_seconds)  # warm-up: first calls set things up
            rows = []
            for level, (clients, requests) in enumerate(zip(args.clients, args.requests, strict=True)):
                for mode in list(MODES)[:: 1 if level % 2 == 0 else -1]:  # which runs first alternates
                    rows.append((mode, clients, cell(servers[mode], images, clients, requests, args.max_seconds)))
                    print(f"  {mode}, {clients} clients: {rows[-1][2]}", flush=True)
        finally:
            for server in servers.values():
                server.stop()
        rows.sort(key=lambda row: list(MODES).index(row[0]))
        per_s = predict_rate(model_dir, photos, args.backend, env)
    print("\n| serving | clients | requests ok / failed / not sent | mean batch | images/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for mode, clients, r in rows:
        counts = f"{r['ok']} / {r['failed']} / {r['not sent']}"
        cells = f"{r['batch']:.1f} | {r['per_s']:.1f} | {r['p50']:.0f} | {r['p99']:.0f}"
        print(f"| {mode} | {clients} | {counts} | {cells} |")
    print(f"| `cvt predict --batch-size 16` | - | {len(photos)} files | 16 | {per_s:.1f} | - | - |")
    top = {mode: r for mode, clients, r in rows if clients == args.clients[-1]}
    print(
        f"\nat {args.clients[-1]} clients: batching {top['batching']['per_s']:.1f} images/s against "
        f"{top['batch of one']['per_s']:.1f} for batch-of-one serving "
        f"({top['batching']['per_s'] / top['batch of one']['per_s']:.2f}x); "
        f"failed or not sent: {sum(r['failed'] + r['not sent'] for r in top.values())}"
    )


if __name__ == "__main__":
    main()
