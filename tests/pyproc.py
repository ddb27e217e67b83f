"""Running a Python snippet in a fresh process, for tests that need one (module-level state
such as absl flags, or a check that an import pulls in nothing else)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_python(
  code: str,
  *args: str,
  cwd: str,
  env: dict[str, str] | None = None,
  timeout: float = 120,
) -> subprocess.CompletedProcess:
  """``python -c CODE ARGS`` (``CODE`` dedented) in ``cwd``; output captured as text. ``env``:
  the child's whole environment (default: this process's)."""
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code), *args],
    cwd=cwd,
    env=dict(os.environ) if env is None else env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
