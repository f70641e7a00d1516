"""Start the server: `serve` blocks until Ctrl-C (the command line, run.py's mode=serve);
`ServerThread` runs one in a background thread (tests, benches) on a port of its own."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn

from engine.core.config import EngineConfig
from engine.runtime.llm import LLMEngine, ModelSource
from engine.runtime.serve.app import build_app, records_snapshot
from engine.runtime.serve.engine_loop import EngineLoop
from engine.runtime.serve.metrics import ServerMetrics
from engine.runtime.serve.state import Limits, ServerState
from engine.runtime.serve.tokenizer import load_tokenizer


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    served_model_name: str | None = None
    max_queue: int | None = None  # 503 once this many requests wait (None: no limit)
    log_level: str = "warning"
    torch_threads: int | None = None  # torch.set_num_threads for the engine (None: leave)


def build_state(engine: LLMEngine, options: ServeOptions, model: ModelSource,
                name: str | None = None) -> ServerState:
    path = str(model) if isinstance(model, str | Path) else None
    model_name = options.served_model_name or name or path or \
        engine.model_config.name or "kvtwin"
    tokenizer = load_tokenizer(path)
    metrics = ServerMetrics(model_name)
    state_box: list[ServerState] = []
    loop = EngineLoop(engine, lambda outputs: state_box[0].deliver(outputs), metrics)
    limits = Limits(engine.config.max_model_len, engine.model_config.vocab_size,
                    options.max_queue)
    state = ServerState(loop, metrics, model_name, limits, tokenizer, path)
    state_box.append(state)
    return state


def make_engine(model: ModelSource, config: EngineConfig, options: ServeOptions) -> LLMEngine:
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    return LLMEngine(model, config)


def serve(model: ModelSource, config: EngineConfig, options: ServeOptions | None = None,
          name: str | None = None) -> dict[str, Any]:
    """Serve until Ctrl-C; returns the records of everything served (records_snapshot)."""
    options = options or ServeOptions()
    engine = make_engine(model, config, options)
    state = build_state(engine, options, model, name)
    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    print(f"kvtwin serving {state.model_name} on http://{host}:{port} "
          f"({engine.num_blocks} KV blocks of {config.block_size} tokens); Ctrl-C stops",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level=options.log_level))
    with suppress(KeyboardInterrupt):  # uvicorn re-raises the signal it shut down on
        server.run(sockets=[sock])
    state.stop()
    return records_snapshot(engine)


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """A server on 127.0.0.1 and a free port, in a background thread:

        with ServerThread(engine) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, engine: LLMEngine, options: ServeOptions | None = None,
                 model: ModelSource | None = None, name: str | None = None):
        self.options = options or ServeOptions(port=0)
        self.state = build_state(engine, self.options, model or engine.model_config, name)
        self.sock = bind(self.options.host, self.options.port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{self.options.host}:{self.port}"
        config = uvicorn.Config(build_app(self.state), log_level=self.options.log_level)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="uvicorn", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
