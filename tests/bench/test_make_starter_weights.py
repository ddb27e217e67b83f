"""Tests of bench/make_starter_weights.py's data and file handling (training is the trainer's)."""

import numpy as np
import pytest

from bench import make_starter_weights
from tlp_jax.core import predictor as npred


@pytest.mark.parametrize("config_name", ["epyc-9004", "all"])
def test_all_in_train_joins_every_split_and_leaves_none(sample_arrays, config_name):
  arrays = sample_arrays(config_name)
  joined = make_starter_weights.all_in_train(arrays)
  splits = (arrays.train, arrays.validation, arrays.test)
  assert len(joined.train) == sum(len(s) for s in splits)
  assert len(joined.validation) == 0 and len(joined.test) == 0
  for name in ("features", "scores", "mask", "task_index", "loop_tokens"):
    np.testing.assert_array_equal(
      getattr(joined.train, name), np.concatenate([getattr(s, name) for s in splits])
    )
  assert joined.validation.features.shape[1:] == arrays.train.features.shape[1:]


def test_write_npz_is_compressed_and_readable(trained_export, tmp_path):
  path = str(tmp_path / "m.npz")
  info = make_starter_weights.write_npz(path, trained_export)
  assert info["bytes"] < sum(a.nbytes for a in trained_export.values()) / 2
  npred.Predictor.load(path)


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory, built_sample_dataset):
  """The export of a one-epoch tiny run on the sample (configs/test.py)."""
  from configs import test as test_config
  from tlp_jax.train import export, loop

  config = test_config.get_config()
  config.data_dir = built_sample_dataset
  config.num_epochs = 1
  workdir = str(tmp_path_factory.mktemp("starter") / "run")
  loop.train_and_evaluate(config, workdir)
  params, model_config, meta = export.restore_for_export(workdir, "latest")
  return export.export_params(params, model_config, **export.meta_kwargs(meta))
