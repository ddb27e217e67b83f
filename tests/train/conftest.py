"""Fixtures of the trainer tests: one run of configs/test.py on the sample, shared."""

import pytest

from configs import test as test_config
from tlp_jax.train import loop


@pytest.fixture(scope="session")
def new_test_config(built_sample_dataset):
  """``new_test_config()``: a fresh configs/test.py ConfigDict reading the built sample."""

  def make():
    config = test_config.get_config()
    config.data_dir = built_sample_dataset
    return config

  return make


@pytest.fixture(scope="session")
def trained(tmp_path_factory, new_test_config):
  """``(workdir, TrainResult)`` of configs/test.py trained on the sample (read-only: copy it)."""
  workdir = str(tmp_path_factory.mktemp("train") / "run")
  result = loop.train_and_evaluate(new_test_config(), workdir)
  return workdir, result
