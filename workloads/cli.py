"""`python -m workloads describe | generate | presets` (see README_SECTION.md)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from workloads.describe import describe
from workloads.errors import SpecError, TraceError
from workloads.load import FILE_FORMATS, READERS, load_trace
from workloads.models import catalog_models, model_kv_bytes_per_token
from workloads.presets import PRESETS, make_preset
from workloads.summary_text import format_summary
from workloads.trace_io import write_trace

FORMATS = READERS + FILE_FORMATS
AZURE_OPTIONS = ("start_s", "duration_s", "rate_scale")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workloads", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="summarise a trace (or an Azure CSV)")
    d.add_argument("trace")
    d.add_argument("--format", choices=FORMATS, default="auto")
    d.add_argument("--block-size", type=int, default=16)
    kv = d.add_mutually_exclusive_group()
    kv.add_argument("--kv-bytes-per-token", type=int)
    kv.add_argument("--model", help=f"{', '.join(catalog_models())} or an HF config.json path")
    d.add_argument("--dtype", default="bfloat16")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.add_argument("--exact-cache", action="store_true",
                   help="count cacheable tokens from every generated token id (slow, memory "
                        "per token) instead of the trace's structure")
    d.add_argument("--max-model-len", type=int,
                   help="bound prompt_len + output_len (see --too-long)")
    d.add_argument("--too-long", choices=("error", "keep", "cap", "drop"),
                   help="a request over the bounds: error (kvtwin default), keep, or for an "
                        "Azure trace cap (its default) / drop")
    for flag in ("--start-s", "--duration-s", "--rate-scale"):
        d.add_argument(flag, type=float, help="Azure import option")
    g = sub.add_parser("generate", help="write a preset workload to a trace file")
    g.add_argument("preset", choices=sorted(PRESETS))
    g.add_argument("-o", "--output", required=True, help=".parquet, .csv or .jsonl")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset parameter (value parsed as JSON if it can be)")
    sub.add_parser("presets", help="list the presets")
    return parser


def _describe(args: argparse.Namespace) -> str:
    options = {k: v for k in AZURE_OPTIONS if (v := getattr(args, k)) is not None}
    trace = load_trace(args.trace, args.format, max_model_len=args.max_model_len,
                       too_long=args.too_long, **options)
    per_token, model = args.kv_bytes_per_token, None
    if args.model:
        per_token, model = model_kv_bytes_per_token(args.model, args.dtype), \
            f"{args.model} {args.dtype}"
    summary = describe(trace, block_size=args.block_size, kv_bytes_per_token=per_token,
                       kv_model=model, exact_cache=args.exact_cache)
    return json.dumps(summary.to_dict(), indent=2) if args.json else format_summary(summary)


def _generate(args: argparse.Namespace) -> str:
    overrides = dict(_key_value(item) for item in args.set)
    trace = make_preset(args.preset, **overrides)
    path = write_trace(trace, args.output)
    return f"wrote {len(trace):,} requests ({args.preset}) to {path}"


def _key_value(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise SpecError("--set", item, "KEY=VALUE")
    try:
        return key, json.loads(text)
    except json.JSONDecodeError:
        return key, text


def _presets() -> str:
    return "\n".join(f"{name:<16}{(fn.__doc__ or '').strip().splitlines()[0]}"
                     for name, fn in PRESETS.items())


def main(argv: list[str] | None = None) -> int:
    """Errors are one line on stderr (exit 2); warnings one line each ("warning: ...")."""
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            if args.command == "describe":
                print(_describe(args))
            elif args.command == "generate":
                print(_generate(args))
            else:
                print(_presets())
        except (SpecError, TraceError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


def _one_line_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)
