"""GET /metrics parses as Prometheus text and carries vLLM's metric names."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import call, prompt

NAMES = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
         "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
         "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
         "vllm:time_to_first_token_seconds": "histogram",
         "vllm:inter_token_latency_seconds": "histogram",
         "vllm:e2e_request_latency_seconds": "histogram"}


def families(url: str) -> dict:
    status, text = call(url, "/metrics")
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(family, suffix: str = "") -> float:
    return sum(s.value for s in family.samples if s.name == family.name + suffix)


def test_metrics_parse_and_count_the_requests(server) -> None:
    before = families(server.url)
    shared = prompt(4, 64)
    for i in range(3):  # the same 64-token prompt: the second and third hit the prefix cache
        status, _ = call(server.url, "/v1/completions",
                         {"prompt": shared, "max_tokens": 5, "ignore_eos": True, "seed": i})
        assert status == 200
    after = families(server.url)
    for name, kind in NAMES.items():
        assert after[name].type == kind, name
    e2e = after["vllm:e2e_request_latency_seconds"]
    assert value(e2e, "_count") - value(before["vllm:e2e_request_latency_seconds"],
                                         "_count") == 3
    itl = after["vllm:inter_token_latency_seconds"]
    assert value(itl, "_count") - value(before["vllm:inter_token_latency_seconds"],
                                        "_count") == 3 * 4
    hits = value(after["vllm:prefix_cache_hits"], "_total") - \
        value(before["vllm:prefix_cache_hits"], "_total")
    assert hits >= 2 * 48
    assert value(after["vllm:num_requests_running"]) == 0
