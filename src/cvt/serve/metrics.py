"""The server's Prometheus metrics (`prometheus_client`), in a registry of their own rather than the global one."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Requests and errors by route, request latency, batch sizes and run time, queue depth.

    Routes are the route templates ("/v2/models/{name}/infer"), never raw paths, so a client cannot make new series.

    Args:
        queue_depth: returns the requests waiting for a batch, read at each scrape.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cvt_requests", "HTTP requests by route", ["route"], registry=self.registry)
        self.errors = Counter(
            "cvt_request_errors", "HTTP requests answered 4xx or 5xx, by route and status", ["route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "cvt_request_duration_seconds", "Time from request to response, by route", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "cvt_batch_size", "Images per model run", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.batch_duration = Histogram(
            "cvt_batch_duration_seconds", "Time the model took per batch", buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.queue_depth = Gauge("cvt_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.queue_depth.set_function(queue_depth)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        self.requests.labels(route).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        """Count one model run of `size` images."""
        self.batch_size.observe(size)
        self.batch_duration.observe(seconds)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
