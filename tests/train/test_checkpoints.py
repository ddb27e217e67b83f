"""tlp_jax.train.checkpoints: corrupted, incomplete and foreign checkpoints are clear errors."""

import os
import shutil

import pytest

from tlp_jax.train import checkpoints, export, loop


def _copy_run(trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  return workdir


def test_corrupted_checkpoint_is_a_clear_error(
  new_test_config, trained, sample_arrays, built_sample_dataset, tmp_path
):
  workdir = _copy_run(trained, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "latest")
  step_dir = os.path.join(latest, max(os.listdir(latest), key=int))
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  config = new_test_config()
  with pytest.raises(checkpoints.CheckpointError, match="cannot restore checkpoint .*latest"):
    loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  with pytest.raises(checkpoints.CheckpointError, match=step_dir):
    export.restore_for_export(workdir, "latest")


def test_incomplete_checkpoint_dir_is_not_a_fresh_start(
  new_test_config, trained, sample_arrays, built_sample_dataset, tmp_path
):
  workdir = _copy_run(trained, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "latest")
  for step in os.listdir(latest):
    shutil.rmtree(os.path.join(latest, step))
  os.makedirs(os.path.join(latest, "20.orbax-checkpoint-tmp-1700000000"))
  with pytest.raises(checkpoints.CheckpointError, match=f"{latest} has entries .* no complete"):
    loop.train_and_evaluate(new_test_config(), workdir, dataset=sample_arrays("epyc-9004"))


def test_workdir_of_another_run_is_refused(
  new_test_config, trained, sample_arrays, built_sample_dataset, tmp_path
):
  workdir = _copy_run(trained, tmp_path)
  config = new_test_config()
  config.model.res_blocks = 2
  with pytest.raises(checkpoints.CheckpointError, match="different model config"):
    loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  config = new_test_config()
  config.batch_size = 128
  with pytest.raises(checkpoints.CheckpointError, match="incompatible run"):
    loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
