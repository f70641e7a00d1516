"""kvtwin's engine behind an OpenAI-compatible HTTP API (`python -m engine.runtime.serve`).

    app.py          routes: /v1/completions, /v1/chat/completions, /v1/models, /health,
                    /metrics, /kvtwin/records
    protocol.py     request and response bodies
    state.py        what the routes share; request checks (400, 404, 503)
    responses.py    streamed (SSE) and whole answers; a client that leaves aborts its request
    engine_loop.py  the one thread that owns the engine
    metrics.py      Prometheus, under vLLM's metric names
    tokenizer.py    text in and out, when the model folder has a tokenizer
    runner.py       serve() (blocking) and ServerThread (tests, benches)
"""

from engine.runtime.serve.runner import ServeOptions, ServerThread, serve

__all__ = ["ServeOptions", "ServerThread", "serve"]
