"""Every bench script imports and prints its help: ``python -m bench.<script> --help``.

The scripts run on a GPU or for minutes, so this is what CI can check of them: their imports
(the project's public API they call) and flag definitions. All scripts start at once, in their
own processes (absl flags are process-global). A script whose optional dependency (PyTorch,
TVM) is missing is skipped.
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted(
  p.stem for p in (REPO / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text()
)
OPTIONAL = ("torch", "tvm")


@pytest.fixture(scope="module")
def helps():
  """``{script: (returncode, stdout + stderr)}`` of ``--help``, run concurrently."""
  env = dict(
    os.environ,
    PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    JAX_PLATFORMS="cpu",
  )
  procs = {
    s: subprocess.Popen(
      [sys.executable, "-m", f"bench.{s}", "--help"],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for s in SCRIPTS
  }
  return {s: (p.wait(timeout=300), p.stdout.read()) for s, p in procs.items()}


def test_the_scripts_are_found():
  assert {"accuracy_sweep", "full_run", "train_throughput", "host_throughput"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_and_prints_help(helps, script):
  rc, out = helps[script]
  for dep in OPTIONAL:
    if f"No module named '{dep}'" in out:
      pytest.skip(f"{dep} not installed")
  assert "Traceback" not in out, out[-3000:]
  # argparse exits 0 after --help; absl prints the flags and exits 1.
  assert rc == 0 or (rc == 1 and "Try --helpful" in out), out[-3000:]
  assert "--" in out
