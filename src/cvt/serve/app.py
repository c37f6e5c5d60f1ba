"""The HTTP application of `cvt serve` (Starlette): the Open Inference Protocol, `/predict`, the page and metrics.

Routes:
    GET  /v2/health/live, /v2/health/ready, /v2            server liveness, readiness, metadata
    GET  /v2/models/{name}[/versions/1], .../ready         model metadata (inputs, outputs), readiness
    POST /v2/models/{name}[/versions/1]/infer              "images": FP32 (N, 3, H, W) or BYTES (N,) encoded images
    POST /predict?top_k=5                                  an image (body or multipart) -> [{"label", "score"}]
    POST /attention                                        an image -> PNG of the class token's attention over it
    GET  /                                                 the web page;  GET /metrics: Prometheus
Errors are JSON `{"error": "one line"}` (the protocol's error body) with a 4xx status for anything the client sent.
Blocking work (parsing large bodies, decoding images, the model) runs in threads; the event loop only routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..data.decode import UnreadableImageError
from .batcher import BatcherStoppedError, DynamicBatcher, QueueFullError
from .metrics import ServeMetrics
from .page import render_page
from .protocol import HEADER_LENGTH, InferRequest, ProtocolError, Tensor, classification, encode_infer_response
from .protocol import parse_infer_request as parse_v2
from .runner import ServedModel

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TOP_K_OUTPUTS = ("labels", "scores")  # with the request parameter top_k
DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # Content-Encoding -> zlib wbits


@dataclass(frozen=True)
class ServeSettings:
    """What the server accepts and how long it waits.

    Attributes:
        max_batch: images per model run at most (1: no batching); also the most images one request may send.
        max_delay_ms: how long the first request of a batch waits for others.
        max_queue: requests waiting for the model at most; more are answered 503 with Retry-After.
        timeout_s: a request not answered in this time gets 504 (and is dropped if still waiting).
        max_body_bytes: request bodies above this size (after decompression too) get 413.
    """

    max_batch: int = 8
    max_delay_ms: float = 5.0
    max_queue: int = 64
    timeout_s: float = 30.0
    max_body_bytes: int = 32 * 2**20


class ServeError(Exception):
    """An answer other than success: HTTP status, one-line reason, extra headers."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def _endpoint(route: str) -> Callable:
    """Wrap a handler: `ServeError` becomes its JSON error, a handler past the request timeout 504 (reading the
    body, decoding, waiting for the model: all of it), anything else a logged 500; every answer is counted under
    `route` in the metrics."""

    def wrap(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def run(request: Request) -> Response:
            start, timeout = time.perf_counter(), request.app.state.settings.timeout_s
            try:
                response = await asyncio.wait_for(handler(request), timeout)
            except asyncio.TimeoutError:  # noqa: UP041 - a distinct class on Python 3.10
                response = JSONResponse({"error": f"no answer within the server's timeout of {timeout:g} s"}, 504)
            except ServeError as err:
                response = JSONResponse({"error": err.reason}, err.status, headers=err.headers)
            except Exception:
                logger.exception("%s %s failed", request.method, request.url.path)
                response = JSONResponse({"error": "internal error (the server log has the traceback)"}, 500)
            request.app.state.metrics.observe_request(route, response.status_code, time.perf_counter() - start)
            return response

        return run

    return wrap


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 above the size limit before it is read (Content-Length) or as soon as
    it passes it (chunked), and inflated when Content-Encoding is gzip or deflate (within the same limit)."""
    limit = request.app.state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the body of {declared} bytes is above the server's limit of {limit} (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"the body is above the server's limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding == "identity":
        return body
    if encoding not in DECODERS:
        raise ServeError(415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(DECODERS[encoding])
    try:
        body = inflater.decompress(body, limit + 1)
    except zlib.error as err:
        raise ServeError(400, f"the {encoding} body does not decompress ({err})") from None
    if len(body) > limit or inflater.unconsumed_tail:
        raise ServeError(413, f"the body inflates above the server's limit of {limit} bytes (--max-body-mb)")
    return body


async def _run_model(request: Request, images: torch.Tensor) -> torch.Tensor:
    """Logits for `images` (N, 3, H, W) through the batcher."""
    try:
        return await request.app.state.batcher.submit(images)
    except QueueFullError as err:
        raise ServeError(503, f"the server is busy ({err}); retry shortly", {"Retry-After": "1"}) from None
    except BatcherStoppedError as err:
        raise ServeError(503, str(err)) from None
    except ValueError as err:
        raise ServeError(400, str(err)) from None


async def _decode_images(model: ServedModel, blobs: list[bytes]) -> torch.Tensor:
    """Encoded images -> the model's inputs (N, 3, H, W), decoded in a worker thread; a bad one is a 400."""

    def decode() -> torch.Tensor:
        images = []
        for i, blob in enumerate(blobs):
            try:
                images.append(model.preprocess(blob))
            except UnreadableImageError as err:
                where = f"image {i}: " if len(blobs) > 1 else ""
                raise ServeError(400, f"{where}{err.reason}") from None
        return torch.stack(images)

    return await run_in_threadpool(decode)


def _model(request: Request) -> ServedModel:
    """The served model the path names (404 for another name, 400 for a version other than 1)."""
    model = request.app.state.model
    name, version = request.path_params["name"], request.path_params.get("version", "1")
    if name != model.name:
        raise ServeError(404, f"unknown model {name!r}; this server serves {model.name!r}")
    if version != "1":
        raise ServeError(404, f"model {name!r} has version 1 only, not {version!r}")
    return model


@_endpoint("/v2/health/live")
async def live(request: Request) -> Response:
    """Server liveness: the process answers."""
    return JSONResponse({"live": True})


@_endpoint("/v2/health/ready")
async def ready(request: Request) -> Response:
    """Server readiness: 200 while the batcher runs (after start-up, before shutdown), else 503."""
    is_ready = request.app.state.ready
    return JSONResponse({"ready": is_ready}, 200 if is_ready else 503)


@_endpoint("/v2")
async def server_metadata(request: Request) -> Response:
    """Server metadata: name, version and the protocol extensions it speaks."""
    return JSONResponse({"name": "cvt", "version": __version__, "extensions": ["binary_tensor_data", "classification"]})


@_endpoint("/v2/models/{name}")
async def model_metadata(request: Request) -> Response:
    """Model metadata: its input and output tensors with datatype and shape."""
    model = _model(request)
    return JSONResponse(
        {
            "name": model.name,
            "versions": ["1"],
            "platform": f"cvt_{model.backend}",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *model.input_shape]}],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, model.num_classes]}],
        }
    )


@_endpoint("/v2/models/{name}/ready")
async def model_ready(request: Request) -> Response:
    """Model readiness (the one model is ready when the server is)."""
    _model(request)
    is_ready = request.app.state.ready
    return JSONResponse({"ready": is_ready}, 200 if is_ready else 503)


async def _input_images(model: ServedModel, request: InferRequest) -> torch.Tensor:
    """The one input of an infer request as model inputs (N, 3, H, W): FP32 as it is, BYTES decoded."""
    if len(request.inputs) != 1 or request.inputs[0].name != INPUT_NAME:
        names = [t.name for t in request.inputs]
        raise ServeError(400, f"the model takes one input named {INPUT_NAME!r}, the request has {names}")
    tensor = request.inputs[0]
    expected = [-1, *model.input_shape]
    if tensor.datatype == "BYTES":
        if len(tensor.shape) not in (1, 2) or tensor.shape[1:] not in ([], [1]) or not tensor.shape[0]:
            raise ServeError(
                400, f"BYTES input {INPUT_NAME!r} must have shape [N] or [N, 1], N >= 1, not {tensor.shape}"
            )
        return await _decode_images(model, tensor.data)
    if tensor.datatype != "FP32":
        raise ServeError(400, f"input {INPUT_NAME!r} is {tensor.datatype}; send FP32 {expected} or BYTES [N] images")
    if len(tensor.shape) != 4 or tensor.shape[1:] != expected[1:] or not tensor.shape[0]:
        raise ServeError(400, f"input {INPUT_NAME!r} has shape {tensor.shape}; the model takes FP32 {expected}, N >= 1")
    return torch.from_numpy(np.array(tensor.data, dtype=np.float32))  # a copy: the request's buffer is read-only


def _outputs(model: ServedModel, request: InferRequest, logits: torch.Tensor) -> list[Tensor]:
    """The tensors the request asked for: logits, and labels/scores with parameters.top_k, each possibly as
    Triton's classification extension."""
    values = logits.numpy()
    available = {OUTPUT_NAME: Tensor(OUTPUT_NAME, "FP32", list(values.shape), values)}
    top_k = request.parameters.get("top_k")
    if top_k is not None:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ServeError(400, f"parameter top_k must be a positive integer, not {top_k!r}")
        rows = model.top_k(logits, top_k)
        shape = [len(rows), len(rows[0])]
        available["labels"] = Tensor("labels", "BYTES", shape, [p["label"].encode() for r in rows for p in r])
        scores = np.array([[p["score"] for p in r] for r in rows], dtype=np.float32)
        available["scores"] = Tensor("scores", "FP32", shape, scores)
    chosen = []
    for name, params in (request.outputs or dict.fromkeys(available, {})).items():
        if name not in available:
            hint = " (pass parameters.top_k)" if name in TOP_K_OUTPUTS else ""
            raise ServeError(400, f"unknown output {name!r}{hint}; the model has {sorted(available)}")
        tensor = available[name]
        k = params.get("classification")
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1 or tensor.datatype != "FP32":
                raise ServeError(400, f"output {name!r}: classification must be a positive integer on an FP32 output")
            tensor = classification(tensor.data, k, model.labels)
            tensor.name = name
        chosen.append(tensor)
    return chosen


@_endpoint("/v2/models/{name}/infer")
async def infer(request: Request) -> Response:
    """The protocol's infer: images in (FP32 or encoded BYTES, JSON or binary), logits (and top-k) out."""
    model = _model(request)
    body = await read_body(request)
    try:
        parsed = await run_in_threadpool(parse_v2, body, request.headers.get(HEADER_LENGTH))
    except ProtocolError as err:
        raise ServeError(400, str(err)) from None
    logits = await _run_model(request, await _input_images(model, parsed))
    outputs = _outputs(model, parsed, logits)
    default = bool(parsed.parameters.get("binary_data_output", False))
    binary = {t.name for t in outputs if parsed.outputs.get(t.name, {}).get("binary_data", default)}
    content, header_length = encode_infer_response(model.name, outputs, binary, parsed.id)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


async def _image_from(request: Request) -> bytes:
    """The image of a /predict or /attention request: the body, or the first file of a multipart form."""
    body = await read_body(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not body:
            raise ServeError(400, "empty body; send an image file as the body or as a multipart form file")
        return body

    async def replay() -> dict:  # the form parser reads the body we already read (and size-checked)
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as err:  # noqa: BLE001 - the multipart parser raises several types for a broken form
        raise ServeError(400, f"the multipart form does not parse ({err})") from None
    files = [value for value in form.values() if hasattr(value, "read")]
    if not files:
        raise ServeError(400, "the multipart form has no file; send the image as a file field")
    return await files[0].read()


@_endpoint("/predict")
async def predict(request: Request) -> Response:
    """An image -> its top_k classes as [{"label", "score"}] (transformers' image-classification format)."""
    model = request.app.state.model
    raw = request.query_params.get("top_k", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise ServeError(400, f"top_k must be a positive integer, not {raw!r}")
    images = await _decode_images(model, [await _image_from(request)])
    logits = await _run_model(request, images)
    return JSONResponse(model.top_k(logits, int(raw))[0])


@_endpoint("/attention")
async def attention(request: Request) -> Response:
    """An image -> PNG of the class token's last-block attention (mean of heads) over it."""
    model = request.app.state.model
    image = await _image_from(request)
    try:
        png = await run_in_threadpool(model.attention_png, image)
    except UnreadableImageError as err:
        raise ServeError(400, err.reason) from None
    return Response(png, media_type="image/png")


@_endpoint("/")
async def page(request: Request) -> Response:
    """The web page."""
    return HTMLResponse(request.app.state.page)


@_endpoint("/metrics")
async def metrics(request: Request) -> Response:
    """The Prometheus metrics."""
    state = request.app.state
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


def create_app(model: ServedModel, settings: ServeSettings | None = None) -> Starlette:
    """The ASGI application serving `model` (run it with uvicorn; `cvt serve` does).

    The batcher starts with the application (its lifespan) and stops after the server has answered what it had
    taken: readiness is true in between.
    """
    settings = settings or ServeSettings()
    batcher = DynamicBatcher(
        model.logits, max_batch=settings.max_batch, max_delay=settings.max_delay_ms / 1000, max_queue=settings.max_queue
    )
    serve_metrics = ServeMetrics(lambda: batcher.depth)
    batcher.on_batch = serve_metrics.observe_batch

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        app.state.ready = True
        logger.info("serving %s (%s backend) at /v2/models/%s", model.name, model.backend, model.name)
        try:
            yield
        finally:
            app.state.ready = False
            await batcher.stop()

    get = {
        "/v2/health/live": live,
        "/v2/health/ready": ready,
        "/v2": server_metadata,
        "/v2/models/{name}": model_metadata,
        "/v2/models/{name}/versions/{version}": model_metadata,
        "/v2/models/{name}/ready": model_ready,
        "/v2/models/{name}/versions/{version}/ready": model_ready,
        "/": page,
        "/metrics": metrics,
    }
    routes = [Route(path, handler, methods=["GET"]) for path, handler in get.items()]
    routes += [
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/attention", attention, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.model, app.state.settings, app.state.batcher = model, settings, batcher
    app.state.metrics, app.state.ready = serve_metrics, False
    app.state.page = render_page(
        model.name, classes=model.num_classes, input_size=model.input_shape[1:], backend=model.backend
    )
    return app
