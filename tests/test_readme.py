"""The README's runnable Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(# runnable.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_has_runnable_examples() -> None:
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("code", BLOCKS, ids=[b.splitlines()[0][11:40] for b in BLOCKS])
def test_readme_example_runs(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
