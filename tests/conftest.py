"""Suite-wide settings: deterministic hypothesis examples in CI, one torch thread on 2 cores."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
os.environ.setdefault("OMP_NUM_THREADS", "1")
