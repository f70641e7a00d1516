"""Token sampling: greedy, or temperature + top-k + top-p, reproducible under seeds.

Random rows draw by the exponential race: argmax_j p_j / E_j with E_j ~ Exp(1) picks j with
probability p_j. Rows whose request has its own generator draw from it, so a seeded request
samples the same tokens whatever batch it runs in; the other rows share the engine generator.
On CUDA, steps without top-k / top-p take one fused pass instead (Gumbel-max, the same law:
argmax_j logit_j / T + G_j with G_j ~ Gumbel), its Philox noise keyed by one seed per row
drawn from the same generators.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core.sequence import SamplingParams
from engine.layers.host import to_device
from engine.layers.kernels import dispatch

SEED_RANGE = 1 << 31


class Sampler:
    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
        """logits: [N, vocab] (any float dtype) -> sampled token ids [N]. Host lists reach
        the device through pinned copies, so a call queues work without waiting for it."""
        greedy_rows = [p.greedy for p in params]
        if all(greedy_rows):
            return logits.argmax(dim=-1)
        generators = generators or [None] * len(params)
        if dispatch.use_triton(logits) and not any(_filters(p, logits.shape[-1]) for p in params):
            return self._gumbel(logits, params, generators)
        probs = self._probs(logits, params)
        noise = self._exponential(probs, greedy_rows, generators)
        sampled = probs.div_(noise).argmax(dim=-1)
        if not any(greedy_rows):
            return sampled
        is_greedy = to_device(np.asarray(greedy_rows), logits.device)
        return torch.where(is_greedy, logits.argmax(dim=-1), sampled)

    def _gumbel(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        """Greedy rows take the same pass with no noise and temperature 1."""
        # Triton compiles at import: only the GPU path loads its kernels
        from engine.layers.kernels.elementwise import gumbel_argmax

        device = logits.device
        seeds = torch.randint(SEED_RANGE, (len(params),), device=device,
                              generator=self.generator)
        for i, gen in enumerate(generators):
            if gen is not None:
                seeds[i] = torch.randint(SEED_RANGE, (1,), device=device, generator=gen)[0]
        scale = np.array([[1.0 / (p.temperature or 1.0), 0.0 if p.greedy else 1.0]
                          for p in params], dtype=np.float32)
        scale = to_device(np.ascontiguousarray(scale.T), device)
        return gumbel_argmax(logits, scale[0], seeds, noise=scale[1])

    def _probs(self, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[-1]
        temps = to_device(np.array([p.temperature or 1.0 for p in params],
                                   dtype=np.float32), device)
        logits = logits.float() / temps[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1 for p in top_p):
            logits = apply_top_k_top_p(logits, to_device(np.array(top_k), device),
                                       to_device(np.array(top_p, np.float32), device))
        return logits.softmax(dim=-1)

    def _exponential(self, probs: torch.Tensor, greedy_rows: list[bool],
                     generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exp(1) noise; greedy rows draw nothing, so they never shift other rows' streams."""
        random_rows = [i for i, greedy in enumerate(greedy_rows) if not greedy]
        shared = [i for i in random_rows if generators[i] is None]
        if len(shared) == len(probs):  # the common case: the same draws, with no scatter
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            return noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        noise = torch.ones_like(probs)
        if shared:
            draws = torch.empty(len(shared), probs.shape[-1], device=probs.device)
            rows = to_device(np.array(shared), probs.device)
            noise[rows] = draws.exponential_(generator=self.generator)
        for i in random_rows:
            if generators[i] is not None:
                noise[i].exponential_(generator=generators[i])
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _filters(params: SamplingParams, vocab: int) -> bool:
    return 0 < params.top_k < vocab or params.top_p < 1


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) all but each row's top_k logits, then all outside its top_p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability (after top-k)
    reaches top_p; the most likely token always stays.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits.masked_fill_(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    outside = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    sorted_logits.masked_fill_(outside, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)
