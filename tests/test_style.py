"""One formatter and linter for the whole tree: ruff, configured in pyproject.toml."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff(*args):
  exe = shutil.which("ruff")
  cmd = [exe] if exe else [sys.executable, "-m", "ruff"]
  return subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module", autouse=True)
def _needs_ruff():
  if _ruff("--version").returncode != 0:
    pytest.skip("ruff is not installed (pip install -e '.[dev]')")


def test_tree_is_formatted():
  res = _ruff("format", "--check", ".")
  assert res.returncode == 0, res.stdout + res.stderr


def test_tree_passes_lint():
  res = _ruff("check", ".")
  assert res.returncode == 0, res.stdout + res.stderr
