"""Run the CLI in-process (fast) or as a subprocess (as a user would)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from prumerge_cli.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys, *args: object) -> Result:
    """Call `prumerge ARGS` in this process through the real entry point."""
    argv = sys.argv
    sys.argv = ["prumerge", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def run_subprocess(*args: object, cwd=None, env: dict[str, str] | None = None) -> Result:
    """Run `python -m prumerge_cli ARGS` in a fresh process (`env` added to this one's environment)."""
    proc = subprocess.run([sys.executable, "-m", "prumerge_cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, **(env or {})})  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)
