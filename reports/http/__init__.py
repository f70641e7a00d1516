"""Replay a trace over HTTP against any OpenAI-compatible server (torch-free).

    sse.py      server-sent events from a byte stream
    client.py   one streamed completion, timed as `vllm bench serve` times it
    replay.py   the trace at its arrival times, from one event loop
    records.py  streams -> RequestRecord rows; a kvtwin server's own records joined in
    side.py     run.py's `target=http`: the replay as a run's `real` side
"""

from reports.http.replay import HttpReplayResult, replay_http

__all__ = ["HttpReplayResult", "replay_http"]
