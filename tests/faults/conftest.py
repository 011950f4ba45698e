"""Fixtures of the fault tests (the suite-wide ones, e.g. `ray_local`, come from tests/conftest.py)."""

from __future__ import annotations

import sys

import pytest

from .cli_runs import Outcome


@pytest.fixture
def ralign_cli(capsys, monkeypatch):
    """`ralign ARGS` through `jobs.cli.main`, the console script's own function, in this process (a subprocess per
    case would spend seconds importing torch): exit code, stdout, stderr."""
    from jobs.cli import main

    def run(*args) -> Outcome:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["ralign", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Outcome(code, captured.out, captured.err)

    return run
