"""Running the real `ralign` entry point in a fault test: in this process (`ralign_cli` fixture, conftest.py) or as a
subprocess, and reading its outcome."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def one_line_error(self) -> str:
        """The single stderr line of a refused command, after checking that it is the only line, that it is an error,
        and that the exit code says so."""
        lines = self.err.strip().splitlines()
        assert self.code == 2, (self.code, self.err[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), self.err[-2000:]
        return lines[0]


def ralign_process(*args: str, cwd: Path | None = None, env: dict | None = None) -> Outcome:
    """`python -m jobs.cli ARGS` (what the `ralign` console script runs) as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=env)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def tree(root: Path) -> list[str]:
    """Every path under root: what a refused command must leave as it was."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
