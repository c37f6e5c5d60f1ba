"""`cvt serve`: a model behind HTTP (Open Inference Protocol v2, /predict, a web page, /metrics), run by uvicorn."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from cvt._optional import require
from cvt.allocator import keep_freed_memory
from cvt.cli.usage import UsageError
from cvt.inference import BACKENDS

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP (KServe V2 protocol, /predict, a web page)")
    p.add_argument("--model", required=True, help="checkpoint path (any format) or registered name[.tag]")
    p.add_argument("--name", help="the name clients use in /v2/models/NAME (default: the model's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", type=int, default=8, help="images per model run (default 8); 1: no batching")
    p.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503 (default 64)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request gets 504 (default 30)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest image (width x height) decoded, else 400 (default PIL's, 89.5 M)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="what runs the optimized model (as cvt predict: default auto)")  # fmt: skip
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    for option, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 1),
        ("--port", args.port, 0),
        ("--max-delay-ms", args.max_delay_ms, 0),
    ):
        if value < low:
            raise UsageError(f"{option} must be at least {low}, not {value}")
    for option, value in (
        ("--timeout", args.timeout),
        ("--max-body-mb", args.max_body_mb),
        ("--max-pixels", args.max_pixels),
    ):
        if value is not None and value <= 0:
            raise UsageError(f"{option} must be positive, not {value}")


def _exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT outside uvicorn (while loading, and the one uvicorn raises again after its graceful
    shutdown): exit 0, since whatever was in flight has been answered."""
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    _check(args)
    for module, package in (
        ("starlette", "starlette"),
        ("uvicorn", "uvicorn"),
        ("prometheus_client", "prometheus-client"),
    ):
        require(module, package=package, extra="serve", purpose="cvt serve")
    keep_freed_memory()
    if threading.current_thread() is not threading.main_thread():  # signal handlers can be set there only
        return _serve(args)
    previous = {sig: signal.signal(sig, _exit_cleanly) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _serve(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415

    from cvt.data.decode import DEFAULT_MAX_PIXELS  # noqa: PLC0415
    from cvt.factory import resolve_model  # noqa: PLC0415
    from cvt.serve.app import ServeSettings, create_app  # noqa: PLC0415
    from cvt.serve.runner import ServedModel  # noqa: PLC0415

    model = resolve_model(args.model)
    name = args.name or (model.model_name or "cvt").replace("/", "_")
    served = ServedModel(
        model, name, backend=args.backend, device=args.device, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS
    )
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        max_body_bytes=int(args.max_body_mb * 2**20),
    )
    print(f"serving {name} on http://{args.host}:{args.port}/ (KServe V2: /v2/models/{name}/infer)", flush=True)
    uvicorn.run(  # on SIGTERM: stop accepting, answer what is in flight (its timeout and 5 s more at most), exit
        create_app(served, settings),
        host=args.host,
        port=args.port,
        log_level="info" if args.verbose else "warning",
        timeout_graceful_shutdown=int(args.timeout) + 5,
    )
    return 0
