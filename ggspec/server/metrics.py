"""`GET /metrics` in the Prometheus text format: requests by status, tokens, drafts,
acceptance, decode speed, time to first token, and the queue."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from .worker import Worker


class Metrics:
    """One registry per server: the request counter, which the HTTP layer bumps, and the
    engine's figures, read from the worker when scraped."""

    def __init__(self, worker: Worker):
        self.registry = CollectorRegistry()
        self.requests = Counter("ggspec_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=self.registry)
        self.registry.register(_EngineCollector(worker))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, worker: Worker):
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        t = self.worker.totals()
        s = t.stats
        counters = [
            ("ggspec_prompt_tokens", "Prompt tokens of finished generations", s.prefill_tokens + s.cached_tokens),
            ("ggspec_prompt_cached_tokens", "Prompt tokens reused from the KV cache", s.cached_tokens),
            ("ggspec_generated_tokens", "Tokens generated", s.generated_tokens),
            ("ggspec_draft_tokens", "Draft tokens proposed", s.draft_tokens),
            ("ggspec_draft_accepted_tokens", "Draft tokens accepted by the target", s.accepted_tokens),
            ("ggspec_rounds", "Target verification rounds", s.rounds),
            ("ggspec_decode_seconds", "Time spent generating after prefill", s.decode_seconds),
            ("ggspec_generations_cancelled", "Generations stopped because their client disconnected", t.cancelled),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)
        gauges = [
            ("ggspec_draft_acceptance_ratio", "Accepted over proposed draft tokens, all generations",
             s.acceptance_rate),
            ("ggspec_decode_tokens_per_second", "Generated tokens per second of decoding, all generations",
             s.decode_tokens_per_second),
            ("ggspec_queue_length", "Requests waiting for the engine", self.worker.queued),
            ("ggspec_busy", "1 while the engine is generating", int(self.worker.busy)),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield SummaryMetricFamily("ggspec_time_to_first_token_seconds",
                                  "From arrival to the first text: queue, prefill and first round",
                                  count_value=t.first_tokens, sum_value=t.first_token_seconds)
