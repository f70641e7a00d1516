"""Workloads: the trace schema, generators, importers and deterministic prompt tokens.

Pure numpy / pandas / pyarrow (never torch). See workloads/README_SECTION.md.
"""

from workloads.arrivals import Constant, Gamma, Offline, Poisson, Ramp
from workloads.bounds import LengthBounds
from workloads.build import build_trace, regenerate
from workloads.describe import TraceSummary, describe
from workloads.errors import SpecError, TraceError, TraceImportWarning, TraceWarning
from workloads.importers import ImportReport, import_azure, import_csv
from workloads.lengths import Empirical, Fixed, LogNormal, Uniform
from workloads.load import load_trace, trace_source
from workloads.prefix_cache import cacheable_tokens
from workloads.presets import PRESETS, make_preset
from workloads.schema import Trace
from workloads.structure import MultiTurn, SharedPrefix
from workloads.summary_text import format_summary
from workloads.tokens import PromptTokens, TokenSpec, prompt_token_ids
from workloads.tokens_bulk import all_prompt_token_ids
from workloads.trace_io import read_trace, write_trace
from workloads.trace_requests import request_table
from workloads.validate import make_trace

__all__ = [
    "PRESETS", "Constant", "Empirical", "Fixed", "Gamma", "ImportReport", "LengthBounds",
    "LogNormal", "MultiTurn", "Offline", "Poisson", "PromptTokens", "Ramp", "SharedPrefix",
    "SpecError", "TokenSpec", "Trace", "TraceError", "TraceImportWarning", "TraceSummary",
    "TraceWarning", "Uniform", "all_prompt_token_ids", "build_trace", "cacheable_tokens",
    "describe", "format_summary", "import_azure", "import_csv", "load_trace", "make_preset",
    "make_trace", "prompt_token_ids", "read_trace", "regenerate", "request_table",
    "trace_source", "write_trace",
]
