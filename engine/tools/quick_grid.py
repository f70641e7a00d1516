"""The quick calibration's grid: the full grid's shapes that carry the fit.

A quick calibration (`calibrate --quick`, ~60 s of measuring on a GPU) times a subset of
`CalibrationGrid.shapes()`, chosen by the terms the fit has (`sim.step_terms`), so each
coefficient keeps the points that determine it:

- decode batches at the fit's batch knots (each knot's value is a measured batch, else it
  is dropped) and contexts at its context hinge knots and both ends;
- prefill chunks at the token hinge knots, the graphs' token limit and the token budget,
  over no prefix, a middle and the longest prefix, one and four sequences;
- mixed steps with 1, 16 and 128 decodes; skewed batches at 4, 32 and 128; and the steps
  just past the graphs' token limit (eager).

Torch-free, so `engine.tools.quick_eval` can replay the choice on committed profiles' samples
(a shape is recognised by its features) and report the held-out error of the reduced fit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from sim.step_terms import BATCH_KNOTS, CTX_KNOTS

TOKEN_KNOTS = (16, 64, 256, 1024, 4096)  # mixed_terms' hinges (and the smallest chunk)
QUICK_MIXED_DECODES = (1, 16, 128)
QUICK_SKEWED_BATCHES = (4, 32, 128)
QUICK_PREFILL_SEQS = (1, 4)
QUICK_PASSES, QUICK_REPEATS = 2, 2
QUICK_ENGINE_PASSES = 1
QUICK_ENGINE_SHARE = 0.4  # one pass over the engine workloads: ~20-25 s on an H100 / H200
# Measuring, start-up included (~90 s with the interpreter's imports). `quick_eval` on the
# committed profiles: 166 shapes, estimated 44 s (H200) / 57 s (H100) of it used, held-out
# step-time error 2.2 / 4.8 % median against 2.4 / 4.8 % for the full fit.
QUICK_BUDGET_S = 75.0


class Shape(Protocol):
    prefills: tuple[tuple[int, int], ...]
    decodes: tuple[int, ...]


@dataclass(frozen=True)
class QuickRule:
    """Which of a grid's shapes a quick calibration keeps (see the module docstring)."""

    decode_contexts: frozenset[int]
    prefill_chunks: frozenset[int]
    prefill_contexts: frozenset[int]
    eager_above: int  # the graphs' token limit: every shape past it is kept (0: none)

    @classmethod
    def of(cls, decode_contexts: Iterable[int], prefill_chunks: Iterable[int],
           prefill_contexts: Iterable[int], token_limit: int = 0,
           token_budget: int = 0) -> QuickRule:
        """From the full grid's ladders: the knots each ladder crosses and its ends."""
        ctx = sorted(decode_contexts)
        chunks = sorted(prefill_chunks)
        prefixes = sorted(prefill_contexts)
        return cls(frozenset(_at_knots(ctx, CTX_KNOTS)),
                   frozenset(_at_knots(chunks, (*TOKEN_KNOTS, token_limit, token_budget))),
                   frozenset({prefixes[0], prefixes[len(prefixes) // 2], prefixes[-1]}
                             if prefixes else ()),
                   token_limit)

    def keeps(self, shape: Shape) -> bool:
        decodes, prefills = shape.decodes, shape.prefills
        tokens = sum(q for _, q in prefills) + len(decodes)
        if prefills and self.eager_above and tokens > self.eager_above:
            return True
        if not prefills:
            return self._decode(decodes)
        if not decodes:
            (c, q), k = prefills[0], len(prefills)
            return q in self.prefill_chunks and c in self.prefill_contexts and \
                k in QUICK_PREFILL_SEQS
        return len(decodes) in QUICK_MIXED_DECODES and decodes[0] in self.decode_contexts \
            and prefills[0][1] in self.prefill_chunks

    def _decode(self, decodes: tuple[int, ...]) -> bool:
        if len(set(decodes)) > 1:  # one long sequence among short ones
            return len(decodes) in QUICK_SKEWED_BATCHES
        return len(decodes) in BATCH_KNOTS and decodes[0] in self.decode_contexts


def _at_knots(ladder: list[int], knots: Iterable[int]) -> set[int]:
    """Both ends of a ladder and, per knot inside it, the ladder's value nearest it."""
    if not ladder:
        return set()
    keep = {ladder[0], ladder[-1]}
    for k in knots:
        if ladder[0] < k < ladder[-1]:
            keep.add(min(ladder, key=lambda v: (abs(v - k), v)))
    return keep


def quick_shapes(shapes: list, rule: QuickRule) -> list:
    return [s for s in shapes if rule.keeps(s)]
