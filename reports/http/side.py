"""run.py's `target=http`: replay the run's trace against a server, as the run's `real` side
(summary["real"]["source"] == "http")."""

from __future__ import annotations

from typing import Any

from engine.core.request import Request
from reports.http.replay import HttpReplayResult, replay_http


def http_side(endpoint: str, requests: list[Request], *, model: str | None = None,
              progress: bool = False, slo: dict[str, float | None] | None = None,
              ) -> tuple[dict[str, Any], HttpReplayResult]:
    """(summary["real"], the replay). `slo`: ttft_s / tpot_s / e2e_s limits for goodput."""
    result = replay_http(endpoint, requests, model=model, progress=progress)
    limits = {f"slo_{k}": v for k, v in (slo or {}).items()}
    server = result.server
    info = {"source": "http", "endpoint": server["endpoint"], "model": server["model"],
            "server": "kvtwin" if server["kvtwin"] else "other",
            "memory": server.get("memory") or {"num_blocks": result.num_blocks},
            "wall_s": result.wall_s, "interrupted": result.interrupted,
            "length_mismatches": result.length_mismatches,
            "metrics": result.metrics(**limits)}
    return info, result
