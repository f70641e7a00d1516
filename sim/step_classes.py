"""Step compositions in classes, to find where a step-time fit is biased.

Every step falls in exactly one class, the first rule that matches, in this order:

- `eager`: more tokens than the mixed-step graphs serve (launched from Python);
- `host-bound`: the fit's host overhead is at least half the step (engine steps with many
  short sequences: schedule, records, sampling);
- `prefill only`: no decodes beside the chunk;
- `mixed long chunk`: a prefill chunk of more than LONG_CHUNK tokens beside decodes;
- `mixed short chunk`: the other mixed steps;
- `decode small, long ctx`: at most SMALL_BATCH decodes, mean context at least LONG_CTX;
- `decode small`, `decode mid` (up to MID_BATCH), `decode large`.

Signed errors per class (`class_errors`) show a bias a median over all steps hides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from engine.core.features import StepFeatures

SMALL_BATCH, MID_BATCH = 16, 64
LONG_CTX = 4096
LONG_CHUNK = 1024
HOST_SHARE = 0.5
CLASSES = ("eager", "host-bound", "prefill only", "mixed long chunk", "mixed short chunk",
           "decode small, long ctx", "decode small", "decode mid", "decode large")


def classify(f: StepFeatures, token_limit: int | None = None,
             host_share: np.ndarray | None = None) -> np.ndarray:
    """The class of every step (an array of CLASSES names). `token_limit`: the graphs'
    (None or 0: no eager class); `host_share`: the fit's host time / step time."""
    decode = f.is_decode_only
    n = f.decode_seqs
    mean_ctx = f.decode_ctx / np.maximum(n, 1)
    eager = f.num_tokens > token_limit if token_limit else np.zeros(len(f), dtype=bool)
    host = host_share >= HOST_SHARE if host_share is not None else np.zeros(len(f), bool)
    rules = [
        (eager, "eager"), (host, "host-bound"),
        (~decode & (n == 0), "prefill only"),
        (~decode & (f.prefill_tokens > LONG_CHUNK), "mixed long chunk"),
        (~decode, "mixed short chunk"),
        ((n <= SMALL_BATCH) & (mean_ctx >= LONG_CTX), "decode small, long ctx"),
        (n <= SMALL_BATCH, "decode small"), (n <= MID_BATCH, "decode mid"),
    ]
    return np.select([r for r, _ in rules], [name for _, name in rules], "decode large")


def class_errors(predicted: np.ndarray, measured: np.ndarray, classes: np.ndarray,
                 errors: Callable[[np.ndarray, np.ndarray], dict[str, Any]]
                 ) -> dict[str, dict[str, Any]]:
    """`errors(predicted, measured)` of each class present, in CLASSES order."""
    return {name: errors(predicted[classes == name], measured[classes == name])
            for name in CLASSES if (classes == name).any()}
