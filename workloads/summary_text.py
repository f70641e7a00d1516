"""The readable form of a TraceSummary (what `python -m workloads describe` prints)."""

from __future__ import annotations

from workloads.describe import MiB, TraceSummary

COLUMNS = ("p50", "p90", "p99", "max", "mean")


def format_summary(s: TraceSummary) -> str:
    lines = [
        f"trace           {s.source}",
        f"requests        {s.requests:,} over {s.duration_s:,.1f} s",
        f"arrival rate    {_rate_text(s)}",
        f"tokens          prompt {s.prompt_tokens:,} / output {s.output_tokens:,}",
        "lengths         " + "".join(f"{c:>10}" for c in COLUMNS),
        *(_row(f"  {name}", stats, "{:,.0f}") for name, stats in
          (("prompt", s.prompt_len), ("output", s.output_len), ("total", s.total_len))),
        f"sharing         {s.prefix_groups:,} prefix groups, {s.conversations:,} conversations;"
        f" {s.shared_prompt_tokens:,} prompt tokens ({s.prefix_sharing_ratio:.1%}) repeat an"
        " earlier prompt",
        f"prefix cache    block {s.block_size}: {s.cacheable_prompt_tokens:,} prompt tokens"
        f" ({s.cacheable_ratio:.1%}) cacheable (full blocks, infinite cache; from the"
        f" {s.cacheable_from})",
    ]
    if s.kv_bytes_per_token is not None:
        model = f"{s.kv_model}, " if s.kv_model else ""
        lines.append(f"KV per request  {model}{s.kv_bytes_per_token:,} B/token"
                     " (prompt + output - 1 tokens)")
        lines.append(_row("  MiB", {k: v / MiB for k, v in s.kv_bytes_per_request.items()},
                          "{:,.1f}"))
        lines.append(_row("  blocks", s.kv_blocks_per_request, "{:,.0f}"))
    return "\n".join(lines)


def _rate_text(s: TraceSummary) -> str:
    mean = "all at t=0 (offline)" if s.mean_rate is None else f"mean {s.mean_rate:,.2f} req/s"
    return (f"{mean}; peak {s.peak_rate_1s:,.0f} req/s in 1 s,"
            f" {s.peak_rate_60s:,.2f} req/s in 60 s windows")


def _row(label: str, stats: dict[str, float] | None, fmt: str) -> str:
    stats = stats or {}
    return f"{label:<16}" + "".join(f"{fmt.format(stats[c]):>10}" for c in COLUMNS)
