"""Prometheus metrics, one registry per app so several servers (and tests) never share counters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from omniserve.engines.base import Engine
from omniserve.server.drain import Drain

if TYPE_CHECKING:
    from omniserve.lora.registry import LoraRegistry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, engine: Engine, model_name: str, drain: Drain | None = None) -> None:
        self.registry = CollectorRegistry()
        self._engine = engine
        self._drain = drain
        labels = {"model_name": model_name}
        # per-request metrics carry `adapter`: the base's served name or a served LoRA adapter's (never a raw
        # request string: an unknown model is a 404 before anything is recorded), so the series stay bounded
        self.loras: LoraRegistry | None = None  # set at start-up when the server serves adapters
        self._series: set[tuple[str, str]] = set()  # (endpoint, adapter) pairs of ``latency`` observed
        self.requests = Counter(
            "omniserve_requests",
            "Finished HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "omniserve_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "omniserve_completion_tokens", "Completion tokens generated.", ["adapter"], registry=self.registry
        )
        self.ttft = Histogram(
            "omniserve_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "omniserve_request_latency_seconds",
            "Time from request arrival to the last byte of the answer.",
            ["endpoint", "adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gateway_overhead = Histogram(
            "omniserve_gateway_overhead_seconds",
            "Time a generation request spent in the gateway outside the engine (parsing, media, template, "
            "serialisation).",
            buckets=_OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        # Sequences (choices: a request with n=4 is four), as every engine's admission counts them and
        # --max-queue bounds them; the names stay for the dashboards and autoscalers that read them.
        self.queue_depth = Gauge(
            "omniserve_queue_depth", "Sequences (choices) waiting for a batch slot.", registry=self.registry
        )
        self.running = Gauge(
            "omniserve_running_requests", "Sequences (choices) being generated.", registry=self.registry
        )
        # what inference-gateway endpoint pickers route on besides the queue (vLLM: vllm:kv_cache_usage_perc)
        self.registry.register(_KvCacheUsage(engine))
        # prefix-cache hit rate (vLLM: vllm:prefix_cache_queries / vllm:prefix_cache_hits, in tokens)
        self.registry.register(_PrefixCache(engine))
        # ... and the LoRA adapters in use (vLLM: vllm:lora_requests_info), for LoRA-affinity routing
        self.registry.register(_LoraInfo(self))
        # why /health is red, for alerts: a stalled engine pages someone, a draining pod does not
        self.stalled = Gauge(
            "omniserve_engine_stalled_seconds",
            "Seconds the engine has had work pending without finishing a step (0 when idle or progressing).",
            registry=self.registry,
        )
        self.draining = Gauge(
            "omniserve_draining", "1 once the server is shutting down (refusing new requests).", registry=self.registry
        )
        self.info = Gauge("omniserve_model_info", "The served model.", list(labels), registry=self.registry)
        self.info.labels(**labels).set(1)

    def latency_of(self, endpoint: str, adapter: str) -> Histogram:
        """``latency``'s series for one endpoint and adapter (remembered, for ``forget_adapter``)."""
        self._series.add((endpoint, adapter))
        return self.latency.labels(endpoint, adapter)

    def forget_adapter(self, name: str) -> None:
        """Drop an unloaded adapter's series, so adapters loaded and unloaded at run time do not pile up."""
        for metric in (self.prompt_tokens, self.completion_tokens, self.ttft):
            with contextlib.suppress(KeyError):
                metric.remove(name)
        for endpoint, adapter in [key for key in self._series if key[1] == name]:
            self._series.discard((endpoint, adapter))
            self.latency.remove(endpoint, adapter)

    def render(self) -> bytes:
        stats = self._engine.stats()
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        self.stalled.set(self._engine.stalled_for())
        self.draining.set(1 if self._drain is not None and self._drain.draining else 0)
        return generate_latest(self.registry)


class _KvCacheUsage(Collector):
    """``omniserve_kv_cache_usage_perc``, exported only by engines that can tell (a 0 would mislead a router)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        usage = self._engine.kv_cache_usage()
        if usage is not None:
            yield GaugeMetricFamily(
                "omniserve_kv_cache_usage_perc", "Fraction (0-1) of the engine's KV-cache capacity in use.", value=usage
            )

    def describe(self) -> Iterator[Metric]:
        return iter(())  # values are read at scrape time; nothing to check at registration


class _PrefixCache(Collector):
    """``omniserve_prefix_cache_queries_total`` / ``..._hits_total``: prompt tokens looked up in the prefix
    cache and those reused from it; exported only by engines that have one."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        counts = self._engine.prefix_cache_counts()
        if counts is None:
            return
        queries, hits = counts
        yield CounterMetricFamily(
            "omniserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", value=queries
        )
        yield CounterMetricFamily(
            "omniserve_prefix_cache_hits", "Prompt tokens whose KV was reused from the prefix cache.", value=hits
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _LoraInfo(Collector):
    """``omniserve_lora_requests_info``: vLLM's ``vllm:lora_requests_info``, the same labels and value.

    ``running_lora_adapters``: adapters that requests hold (comma-separated); ``waiting_lora_adapters``:
    adapters requests wait to have loaded; ``max_lora``: ``--max-loras``. The value is the time of the
    last change, as vLLM's (endpoint pickers read the labels of the newest sample). Exported only by a
    server that serves adapters.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        loras = self._metrics.loras
        if loras is None:
            return
        family = GaugeMetricFamily(
            "omniserve_lora_requests_info",
            "LoRA adapters in use: running and waiting adapter names, and the most resident at once.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        family.add_metric([",".join(loras.running()), ",".join(loras.waiting()), str(loras.max_loras)], loras.updated)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())
