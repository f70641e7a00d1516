"""Fixtures the engine tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def torch_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    """The `torch` backend; on the CPU with the SDPA stand-in for varlen flash attention."""
    # torch is an extra: this conftest loads wherever tests/engine is collected
    import torch

    from engine.layers import attention_backends

    if not torch.cuda.is_available():
        monkeypatch.setattr(attention_backends, "torch_varlen",
                            lambda: attention_backends.sdpa_varlen)
        monkeypatch.setattr("engine.runtime.model_runner.resolve_backend", lambda *a: "torch")
    return "torch"
