"""Prometheus metrics of ``ubc-serve``, in a registry of the app's own (several apps in one
process, as in tests, do not collide).

- ``ubc_requests_total{endpoint, status}``: answered requests by HTTP status (499: the
  client went away before its answer);
- ``ubc_request_seconds{endpoint}``: latency histogram of the scoring endpoints;
- ``ubc_engine_batch_size``: histogram of the slices per engine call (its mean is the
  figure that shows batching at work: sum / count);
- ``ubc_queue_slices``: slices waiting for the engine now;
- ``ubc_engine_busy_seconds_total``: time spent in ``Engine.infer``;
- ``ubc_overloaded_total``: requests refused with 503 because the queue was full;
- ``ubc_decode_bytes``: memory reserved now by the volumes being decoded and scored (the
  decode budget in use).
The last five are read from the predictor's and the budget's own counters when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ubc.scoring.predictor import BatcherStats

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _PredictorCollector(Collector):
    def __init__(self, stats: Callable[[], BatcherStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:  # the engine is still loading
            return
        counts, total = [], 0
        for bound in _BATCH_BUCKETS:
            total = sum(n for size, n in stats.batch_sizes.items() if size <= bound)
            counts.append((str(bound), total))
        counts.append(("+Inf", stats.batches))
        yield HistogramMetricFamily("ubc_engine_batch_size", "slices per engine call",
                                    buckets=counts, sum_value=stats.slices)
        yield GaugeMetricFamily("ubc_queue_slices", "slices waiting for the engine",
                                value=stats.queue_slices)
        yield CounterMetricFamily("ubc_engine_busy_seconds", "time spent in Engine.infer",
                                  value=stats.engine_seconds)
        yield CounterMetricFamily("ubc_overloaded", "requests refused: queue full",
                                  value=stats.overloaded)


class Metrics:
    """The service's metrics; ``stats`` gives the predictor's counters (None while
    loading), ``decoding`` the bytes of the decode budget in use."""

    def __init__(self, stats: Callable[[], BatcherStats | None],
                 decoding: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ubc_requests", "answered requests", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("ubc_request_seconds", "request latency of the scoring "
                                 "endpoints", ["endpoint"], buckets=_LATENCY_BUCKETS,
                                 registry=self.registry)
        self.registry.register(_PredictorCollector(stats))
        Gauge("ubc_decode_bytes", "memory reserved by the volumes being decoded and scored",
              registry=self.registry).set_function(decoding)

    def observe(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        """Count one answered request (and its latency, when given)."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if seconds is not None:
            self.latency.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
