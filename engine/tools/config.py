"""The tools' configuration: an EngineConfig composed by run.py's Hydra configuration
(conf.compose: built one way, validated one way), from `engine.*` overrides or a tool's own
flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conf.compose import compose_config, engine_config
from engine.core.catalog import load_model
from engine.core.config import EngineConfig


def compose_engine(overrides: list[str] | tuple[str, ...] = (), preset: str | None = None,
                   **fields: Any) -> EngineConfig:
    """run.py's engine config for `engine=<preset>`, the overrides (`K=V` or `engine.K=V`)
    and the fields given (None: not given); a bad key or value names it."""
    given = [o if o.lstrip("+").startswith("engine") else f"engine.{o}" for o in overrides]
    given += [f"engine.{k}={_value(v)}" for k, v in fields.items() if v is not None]
    try:
        cfg = compose_config(([f"engine={preset}"] if preset else []) + given)
    except Exception as err:  # Hydra's: a key or a preset that does not exist, a bad type
        raise ValueError(" ".join(str(err).split("\n")[:1])) from err
    return engine_config(cfg)


def _value(v: Any) -> str:
    """A Python value as a Hydra override writes it."""
    return json.dumps(v) if isinstance(v, bool) or v is None else str(v)


def model_source(name: str) -> tuple[Any, str]:
    """A local HF folder, or a catalog entry (random weights) with its catalog name."""
    if Path(name).is_dir():
        return name, name
    return load_model(name), name
