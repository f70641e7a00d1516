"""run.py's configuration without a run (the module front ends, the validation planner): one
composition over conf/, one EngineConfig and one workload from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from conf.schema import register
from engine.core.config import EngineConfig
from workloads import Trace, load_trace, make_preset

CONF_DIR = Path(__file__).resolve().parent


def compose_config(overrides: list[str]) -> DictConfig:
    """run.py's configuration for `overrides`, Hydra's runtime choices included."""
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def engine_config(cfg: DictConfig) -> EngineConfig:
    return EngineConfig.from_kwargs(**container(cfg.engine))


def load_workload(cfg: DictConfig) -> Trace:
    """The preset, or the trace file `workload.path` (kvtwin's format or an Azure CSV)."""
    w = cfg.workload
    if w.path:
        is_azure = w.get("format") == "azure"
        too_long = w.get("too_long") or (None if is_azure else "keep")
        return load_trace(w.path, w.get("format", "auto"), too_long=too_long,
                          max_model_len=cfg.engine.max_model_len)
    return make_preset(w.name, **container(w.params))


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True)
