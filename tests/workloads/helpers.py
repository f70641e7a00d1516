"""Small builders shared by the workloads tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def good_frame(n: int = 6) -> pd.DataFrame:
    """A valid raw table (ids 10.., arrivals 0, 0.5, ...)."""
    return pd.DataFrame({"request_id": np.arange(10, 10 + n), "arrival_s": np.arange(n) * 0.5,
                         "prompt_len": np.full(n, 40), "output_len": np.full(n, 8)})
