"""`python -m engine.runtime.serve`: serve a model over HTTP until Ctrl-C.

    python -m engine.runtime.serve --model qwen3_0_6b                # catalog model, random weights
    python -m engine.runtime.serve --model /models/Qwen3-0.6B --port 8000 --max-queue 1024
    python -m engine.runtime.serve --model tiny_qwen3 --set dtype=float32 --set device=cpu

--set takes EngineConfig fields (block_size, max_model_len, gpu_memory_utilization, ...);
values are read as JSON where they parse (16, 0.5, true, null), as text otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engine.core.catalog import list_models, load_model
from engine.core.config import EngineConfig
from engine.runtime.serve.runner import ServeOptions, serve


def engine_config(pairs: list[str]) -> EngineConfig:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r} is invalid: must be key=value")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return EngineConfig.from_kwargs(**values)


def model_source(name: str) -> tuple[Any, str]:
    """A local HF folder, or a catalog entry (random weights) with its catalog name."""
    if Path(name).is_dir():
        return name, name
    return load_model(name), name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine.runtime.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=f"a model folder or a catalog model: {', '.join(list_models())}")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the name clients send (default: --model)")
    parser.add_argument("--max-queue", type=int, help="503 once this many requests wait")
    parser.add_argument("--set", action="append", default=[], metavar="K=V",
                        help="an EngineConfig field, e.g. max_model_len=8192")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--log-level", default="warning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, name = model_source(args.model)
    options = ServeOptions(args.host, args.port, args.served_model_name, args.max_queue,
                           args.log_level, args.torch_threads)
    serve(model, engine_config(args.set), options, name=name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
