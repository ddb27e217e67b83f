"""train.py: a user error (config field, data dir, dataset, a workdir of another run) is one
line on stderr and a non-zero exit, never a traceback."""

import os

import pytest


@pytest.fixture
def train(tmp_path, run_python, train_argv):
  """``train(*args)``: train.py with configs/test.py and workdir tmp_path/wd, as a user runs it."""
  return lambda *args: run_python(*train_argv(tmp_path / "wd", *args), env={"JAX_PLATFORMS": "cpu"})


def _one_line_error(done):
  assert done.returncode != 0
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("train.py: error:")]
  assert len(errors) == 1, done.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize(
  "args, want",
  [
    (
      ["--config.optim.learnig_rate=1"],
      "unknown config field --config.optim.learnig_rate (did you mean learning_rate?)",
    ),
    (["--config.batch_order=by_net"], "config.batch_order must be one of"),
    ([], "config.data_dir is empty: pass --config.data_dir=DATA_DIR"),
    (["--config.data_dir=/nonexistent/tlp"], "config.data_dir='/nonexistent/tlp' does not exist"),
    (["--config.init_mode=heads"], 'config.init_mode="heads" trains only the heads'),
  ],
)
def test_config_errors_are_one_line(args, want, tmp_path, train):
  assert want in _one_line_error(train(*args))
  assert not os.listdir(tmp_path) or not os.listdir(tmp_path / "wd")


def test_unknown_dataset_and_hardware_are_one_line(built_sample_dataset, train):
  line = _one_line_error(train(f"--config.data_dir={built_sample_dataset}", "--config.dataset=foo"))
  assert "tenset/foo: no such dataset config" in line and "epyc-9004" in line
  line = _one_line_error(
    train(f"--config.data_dir={built_sample_dataset}", "--config.hardware=('foo',)")
  )
  assert "config.hardware ['foo']" in line


def test_a_bad_init_from_source_is_one_line(built_sample_dataset, tmp_path, train):
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip file")
  line = _one_line_error(
    train(f"--config.data_dir={built_sample_dataset}", f"--config.init_from={bad}")
  )
  assert "init_from" in line and "bad.npz" in line
