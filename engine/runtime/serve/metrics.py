"""Prometheus metrics under vLLM's names, in a registry of the app's own (so one process may
run several servers, as the tests do). Latencies are on the engine's clock, per token as
each step ends; request histograms are observed when a request finishes."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    exposition,
    generate_latest,
)

from engine.runtime.llm import LLMEngine
from engine.runtime.serve.engine_loop import LoopStats, StepTokens

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST
# vLLM's buckets (v1/metrics/loggers.py), seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        disable_created_metrics()  # as vLLM does: no `_created` series beside each counter
        self.registry = CollectorRegistry()
        self._queries = self._hits = 0
        r, label = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, label, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, label, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100%.")
        self.gpu_usage = gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (vLLM < 0.10).")
        self.queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up.")
        self.hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the cache.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens admitted.")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self._success = Counter("vllm:request_success", "Finished requests.",
                                ["model_name", "finished_reason"], registry=r)
        self._model = model_name
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency.",
                             ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Time per output token (vLLM < 0.11: the inter-token latency).",
                              ITL_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Per request: (e2e - ttft) / (output tokens - 1).",
                                      ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end latency.",
                             REQUEST_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Time waiting.",
                               REQUEST_BUCKETS)

    # -- the engine loop's observer (loop thread) --------------------------------------------

    def on_step(self, engine: LLMEngine, tokens: StepTokens) -> None:
        for value in tokens.ttft_s:
            self.ttft.observe(value)
        for value in tokens.itl_s:
            self.itl.observe(value)
            self.tpot.observe(value)
        self.generation_tokens.inc(len(tokens.ttft_s) + len(tokens.itl_s))
        for seq in tokens.finished:
            self._finished(seq)
        self._prefix_cache(engine)

    def on_abort(self) -> None:
        self._success.labels(self._model, "abort").inc()

    def _finished(self, seq) -> None:
        t = seq.times
        self._success.labels(self._model, seq.finish_reason or "unknown").inc()
        if t.finish is None or t.first_token is None:
            return
        self.e2e.observe(t.finish - t.arrival)
        if t.first_scheduled is not None:
            self.queue.observe(t.first_scheduled - t.arrival)
        if seq.num_output_tokens > 1:
            self.request_tpot.observe((t.finish - t.first_token) / (seq.num_output_tokens - 1))

    def _prefix_cache(self, engine: LLMEngine) -> None:
        stats = engine.scheduler.block_manager.stats
        self.queries.inc(stats.queries - self._queries)
        self.prompt_tokens.inc(stats.queries - self._queries)
        self.hits.inc(stats.hits - self._hits)
        self._queries, self._hits = stats.queries, stats.hits

    # -- scrape (event-loop thread) ------------------------------------------------------------

    def render(self, stats: LoopStats, num_pending: int) -> bytes:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting + num_pending)
        self.kv_usage.set(stats.kv_cache_usage)
        self.gpu_usage.set(stats.kv_cache_usage)
        return generate_latest(self.registry)
