"""Suite-wide settings: deterministic hypothesis examples in CI, one torch thread on 2 cores,
Triton kernels interpreted when there is no GPU."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _interpret_triton_without_a_gpu() -> None:
    """Triton reads TRITON_INTERPRET when it is imported, and other libraries may import it
    first: set it before any test module loads, so kernel tests run on the CPU."""
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_a_gpu()
