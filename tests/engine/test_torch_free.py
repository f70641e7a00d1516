"""The pure-Python core, the simulator, workloads and reports import without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TORCH_FREE = ("engine/core", "sim", "workloads", "reports", "conf")


def modules(folders: tuple[str, ...] = TORCH_FREE) -> list[str]:
    """Every module of those packages (their `__main__` entry points run, not import)."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name != "__main__.py":
                parts = path.relative_to(ROOT).with_suffix("").parts
                found.append(".".join(p for p in parts if p != "__init__"))
    return found


CORE = modules()

BLOCK_TORCH = """
import builtins, sys
real_import = builtins.__import__
def guarded(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise ImportError("torch is blocked in this test")
    return real_import(name, *args, **kwargs)
builtins.__import__ = guarded
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
assert "torch" not in sys.modules
print("ok")
"""


def test_every_module_of_the_torch_free_packages_is_listed() -> None:
    assert {"engine.core.scheduler", "engine.core.kv.prefix_cache", "sim.simulator",
            "workloads.tokens", "reports.metrics", "reports.validation.accuracy"} <= set(CORE)


def test_core_imports_with_torch_blocked() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH, *CORE], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_guard_really_blocks_torch() -> None:
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "engine.runtime.llm"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "torch is blocked" in result.stderr
