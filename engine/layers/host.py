"""Host-to-device copies that never wait for the device's queue."""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`. On CUDA it goes through pinned memory with a non-blocking
    copy: a plain copy from pageable memory would wait for every queued kernel first."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
