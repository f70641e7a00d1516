"""The README's and docs' examples run as written: `# runnable` Python blocks run, and each
`console` block's command prints the lines shown under it (its figures included)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TEXT = {page: page.read_text() for page in PAGES}
BLOCKS = [(p.relative_to(ROOT), code) for p, text in TEXT.items()
          for code in re.findall(r"```python\n(# runnable.*?)```", text, re.S)]
CONSOLE = [(p.relative_to(ROOT), block) for p, text in TEXT.items()
           for block in re.findall(r"```console\n(.*?)```", text, re.S)]


def test_the_pages_have_examples() -> None:
    assert BLOCKS and CONSOLE


@pytest.mark.parametrize(("page", "code"), BLOCKS, ids=[f"{p}:{c[11:40]}" for p, c in BLOCKS])
def test_a_runnable_example_runs(page: Path, code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def commands(block: str) -> list[tuple[str, list[str]]]:
    """($ command, the lines shown under it) for each command of a console block; a line
    ending in a backslash continues the command."""
    out: list[tuple[str, list[str]]] = []
    lines = iter(block.splitlines())
    for line in lines:
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\"):
                cmd = cmd[:-1] + next(lines).strip()
            out.append((cmd, []))
        elif out and line.strip():
            out[-1][1].append(line.strip())
    return out


@pytest.mark.parametrize(("page", "block"), CONSOLE, ids=[str(p) for p, _ in CONSOLE])
def test_a_console_example_prints_what_the_page_shows(page: Path, block: str) -> None:
    for cmd, shown in commands(block):
        argv = shlex.split(cmd)
        assert argv[0] == "python", f"{page}: only python commands are checked: {cmd}"
        result = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)
        printed = {" ".join(line.split()) for line in result.stdout.splitlines()}
        for line in shown:
            assert " ".join(line.split()) in printed, f"{page}: {cmd!r} no longer prints {line!r}"
