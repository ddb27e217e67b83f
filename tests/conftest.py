"""Shared pytest configuration.

XLA_FLAGS must be set before JAX initialises its backends, so it is set here, at import time of
the test session: every test sees 8 CPU devices (the pmap tests need them; single-device tests
pick ``jax.devices()[:1]``).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache for the session, this process and every train.py /
# eval.py subprocess it starts (they inherit the environment): the same small programs are
# compiled in dozens of runs, and a cache hit loads the same executable, so results are
# unchanged. Removed at exit; a JAX_COMPILATION_CACHE_DIR set by the caller is used as is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="tlp_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import functools  # noqa: E402  (XLA_FLAGS must be set before anything imports JAX)
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from data_pipelines import (
  loader,  # noqa: E402
  tenset_tfds,  # noqa: E402
)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLE_TENSET_DIR = REPO_ROOT / "data" / "sample" / "tenset-mini"


@pytest.fixture(scope="session")
def sample_tenset_dir() -> str:
  """The embedded TenSet-layout sample (data/sample/tenset-mini), read-only."""
  return str(SAMPLE_TENSET_DIR)


@pytest.fixture(scope="session")
def built_sample_dataset(tmp_path_factory, sample_tenset_dir) -> str:
  """data_dir of the sample built once per session: configs epyc-9004, xeon-emr-16c, all.

  Shared by every test file: do not modify it (copy it first, as
  tests/data_pipelines/test_tenset_tfds.py does).
  """
  data_dir = str(tmp_path_factory.mktemp("tenset_data"))
  tenset_tfds.build(sample_tenset_dir, data_dir, tenset_tfds.make_configs(sample_tenset_dir))
  return data_dir


@pytest.fixture(scope="session")
def sample_arrays(built_sample_dataset):
  """``sample_arrays(config_name) -> DatasetArrays`` of the built sample (cached per config)."""

  @functools.cache
  def load(config_name: str = "epyc-9004"):
    return loader.load_arrays(built_sample_dataset, config_name)

  return load


def _run_python(*args, env=None, timeout=300):
  """``python ARGS`` run as a user runs a CLI: from the repository root, with it as PYTHONPATH
  (so this checkout is the one imported); ``env`` adds variables to this process's environment.
  Returns the CompletedProcess, stdout and stderr as text."""
  return subprocess.run(
    [sys.executable, *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {})),
  )


@pytest.fixture(scope="session")
def run_python():
  """``run_python(*args, env=None, timeout=300) -> CompletedProcess``: ``python ARGS`` from the
  repository root with it as PYTHONPATH (e.g. ``run_python("-m", "data_pipelines.build", ...)``)."""
  return _run_python


@pytest.fixture(scope="session")
def train_argv():
  """``train_argv(workdir, *args) -> list``: the arguments of ``python`` that run train.py with
  configs/test.py in ``workdir`` (for ``run_python`` or a ``subprocess.Popen``)."""

  def argv(workdir, *args):
    return [
      str(REPO_ROOT / "train.py"),
      "--config",
      str(REPO_ROOT / "configs" / "test.py"),
      "--workdir",
      str(workdir),
      *args,
    ]

  return argv
