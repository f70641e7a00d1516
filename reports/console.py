"""What a run prints in the terminal: its metrics in a few lines."""

from __future__ import annotations

from typing import Any


def format_metrics(m: dict[str, Any], predictor: dict[str, str], simulated_s: float,
                   wall_s: float) -> str:
    """Requests, latency percentiles, throughput, KV usage and the simulation's speed."""
    lines = [f"predictor      {predictor['kind']}: {predictor['source']}",
             f"requests       {m['completed']} completed, {m['rejected']} rejected, "
             f"{m['unfinished']} unfinished, {m['total_preemptions']} preemptions"]
    for name in ("ttft", "tpot", "itl", "e2e"):
        values = [(p, m.get(f"{name}_{p}_s")) for p in ("p50", "p90", "p99")]
        lines.append(f"{name.upper():<14} " + "  ".join(f"{p} {_ms(v)}" for p, v in values))
    speed = simulated_s / wall_s if wall_s else 0.0
    lines += [
        f"throughput     {_num(m.get('request_throughput_req_s'))} req/s, "
        f"{_num(m.get('output_throughput_tok_s'))} output tok/s",
        f"KV usage       peak {_num(m.get('kv_usage_peak'), 3)}, max concurrency "
        f"{m.get('max_concurrency')}, prefix hit rate {_num(m.get('prefix_cache_hit_rate'), 3)}",
        f"simulated      {simulated_s:,.1f} s in {wall_s:,.2f} s wall ({speed:,.0f}x real "
        f"time), {m.get('num_steps', 0):,} steps",
    ]
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{1000 * v:,.1f} ms"


def _num(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"
