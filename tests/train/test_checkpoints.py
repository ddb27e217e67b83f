"""tlp_jax.train.checkpoints: corrupted, incomplete and foreign checkpoints are clear errors."""

import json
import logging
import math
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from tlp_jax.train import checkpoints, export, loop
from tlp_jax.train import model as model_lib
from tlp_jax.train import step as step_lib


def _copy_run(trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  return workdir


def _garble(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")


def _steps(directory):
  return sorted(int(s) for s in os.listdir(directory) if s.isdigit())


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(
  new_test_config, trained, sample_arrays, built_sample_dataset, tmp_path, caplog
):
  unbroken_workdir, unbroken = trained
  workdir = _copy_run(trained, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "latest")
  newest, previous = _steps(latest)[-1], _steps(latest)[-2]
  _garble(os.path.join(latest, str(newest)))
  with caplog.at_level(logging.INFO):
    result = loop.train_and_evaluate(new_test_config(), workdir, dataset=sample_arrays())
  assert "cannot restore checkpoint" in caplog.text
  assert f"resuming from step {previous}" in caplog.text
  spe = math.ceil(len(sample_arrays().train) / 64)  # 1-based epoch in the log, as in the bar
  epoch, done = divmod(previous, spe)
  assert f"at step {previous} (epoch {epoch + 1}, after {done} of its {spe} steps)" in caplog.text
  # The unreadable one was moved aside (not deleted) and the run redid its steps: same end.
  moved = os.listdir(os.path.join(workdir, "checkpoints", "unreadable"))
  assert len(moved) == 1 and moved[0].startswith(f"latest-{newest}-")
  assert _steps(latest)[-1] == newest == int(result.state.step)
  for a, b in zip(
    jax.tree_util.tree_leaves(result.state.params), jax.tree_util.tree_leaves(unbroken.state.params)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_readable_checkpoint_is_a_clear_error_not_a_fresh_start(
  new_test_config, trained, sample_arrays, built_sample_dataset, tmp_path
):
  workdir = _copy_run(trained, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "latest")
  step_dir = os.path.join(latest, str(_steps(latest)[-1]))
  for step in _steps(latest):
    _garble(os.path.join(latest, str(step)))
  with pytest.raises(checkpoints.CheckpointError, match=step_dir):
    export.restore_for_export(workdir, "latest")
  with pytest.raises(checkpoints.CheckpointError, match=f"no checkpoint in {latest} can be"):
    loop.train_and_evaluate(new_test_config(), workdir, dataset=sample_arrays("epyc-9004"))
  assert len(os.listdir(os.path.join(workdir, "checkpoints", "unreadable"))) == 2  # kept


def test_a_save_killed_before_the_first_checkpoint_is_removed_and_the_run_proceeds(
  new_test_config, sample_arrays, tmp_path, caplog
):
  """SIGKILL during the first save leaves only Orbax's temporary folder: nothing to resume."""
  workdir = str(tmp_path / "killed")
  config = new_test_config()
  config.num_epochs = 1
  tmp_dir = os.path.join(workdir, "checkpoints", "latest", "10.orbax-checkpoint-tmp-1700000000")
  os.makedirs(os.path.join(tmp_dir, "state"))
  with caplog.at_level(logging.WARNING):
    result = loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  assert f"removed {tmp_dir}" in caplog.text
  assert not os.path.exists(tmp_dir)
  assert int(result.state.step) == math.ceil(len(sample_arrays("epyc-9004").train) / 64)


def test_unknown_entries_without_a_checkpoint_are_not_a_fresh_start(
  new_test_config, trained, sample_arrays, built_sample_dataset, tmp_path
):
  workdir = _copy_run(trained, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "latest")
  for step in os.listdir(latest):
    shutil.rmtree(os.path.join(latest, step))
  os.makedirs(os.path.join(latest, "notes"))
  with pytest.raises(checkpoints.CheckpointError, match=f"{latest} has entries .* no complete"):
    loop.train_and_evaluate(new_test_config(), workdir, dataset=sample_arrays("epyc-9004"))


def test_workdir_of_another_run_is_refused(
  new_test_config, trained, sample_arrays, built_sample_dataset, tmp_path
):
  workdir = _copy_run(trained, tmp_path)
  config = new_test_config()
  config.model.res_blocks = 2
  with pytest.raises(checkpoints.CheckpointError, match="model.res_blocks: 1 -> 2"):
    loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  # A workdir of an older version (no train_config.json) is still guarded by the model config
  # and the checkpoints' run identity; a refused run records nothing.
  os.remove(os.path.join(workdir, checkpoints.TRAIN_CONFIG_FILE))
  with pytest.raises(checkpoints.CheckpointError, match="different model config"):
    loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  assert not os.path.exists(os.path.join(workdir, checkpoints.TRAIN_CONFIG_FILE))
  config = new_test_config()
  config.batch_size = 128
  with pytest.raises(checkpoints.CheckpointError, match="incompatible run"):
    loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  assert not os.path.exists(os.path.join(workdir, checkpoints.TRAIN_CONFIG_FILE))


def test_a_rerun_with_other_settings_is_refused_naming_every_field(
  new_test_config, trained, sample_arrays, tmp_path
):
  workdir = _copy_run(trained, tmp_path)
  recorded = open(os.path.join(workdir, checkpoints.TRAIN_CONFIG_FILE)).read()
  config = new_test_config()
  config.optim.learning_rate = 0.01
  config.loss.name = "mse"
  config.num_epochs = 5
  with pytest.raises(checkpoints.CheckpointError) as e:
    loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  msg = str(e.value)
  assert "optim.learning_rate: 0.001 -> 0.01" in msg
  assert "loss.name: 'pairwise_log' -> 'mse'" in msg and "num_epochs: 3 -> 5" in msg
  assert "another --workdir" in msg and "--allow_config_change" not in msg  # lr is not
  # Nothing was written: eval.py still finds the run's own config and checkpoints.
  assert open(os.path.join(workdir, checkpoints.TRAIN_CONFIG_FILE)).read() == recorded


def test_extending_num_epochs_is_allowed_only_explicitly_and_recorded(
  new_test_config, trained, sample_arrays, tmp_path
):
  workdir = _copy_run(trained, tmp_path)
  config = new_test_config()
  config.num_epochs = 4
  with pytest.raises(checkpoints.CheckpointError, match="--allow_config_change=num_epochs"):
    loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  result = loop.train_and_evaluate(
    config, workdir, dataset=sample_arrays("epyc-9004"), allow_changes=("num_epochs",)
  )
  assert result.validation["epoch"] == 4
  recorded = checkpoints.read_json(os.path.join(workdir, checkpoints.TRAIN_CONFIG_FILE))
  assert recorded["num_epochs"] == 4
  history = checkpoints.read_json(os.path.join(workdir, checkpoints.TRAIN_CONFIG_HISTORY_FILE))
  assert history[-1]["event"] == "changed"
  assert history[-1]["changes"] == {"num_epochs": [3, 4]}


def test_reconcile_train_config(tmp_path):
  workdir = str(tmp_path)
  base = {"num_epochs": 3, "data_dir": "/a", "optim": {"learning_rate": 1e-3}, "eval_top_k": (1, 5)}
  assert checkpoints.reconcile_train_config(workdir, base) == {}
  assert json.load(open(tmp_path / checkpoints.TRAIN_CONFIG_HISTORY_FILE))[0]["event"] == "created"
  # Same run (tuples vs JSON lists), and a runtime field (where the data is) may differ.
  assert checkpoints.reconcile_train_config(workdir, dict(base, data_dir="/b")) == {}
  with pytest.raises(checkpoints.CheckpointError, match="cannot be changed .*'seed'"):
    checkpoints.reconcile_train_config(workdir, base, allow_changes=("seed",))
  changed = dict(base, num_epochs=6, optim={"learning_rate": 1e-2})
  with pytest.raises(checkpoints.CheckpointError, match="optim.learning_rate: 0.001 -> 0.01"):
    checkpoints.reconcile_train_config(workdir, changed, allow_changes=("num_epochs",))
  # A process that does not write only checks.
  assert checkpoints.reconcile_train_config(
    workdir, dict(base, num_epochs=6), ("num_epochs",), write=False
  ) == {"num_epochs": (3, 6)}
  assert checkpoints.read_json(str(tmp_path / checkpoints.TRAIN_CONFIG_FILE))["num_epochs"] == 3
  # A field the recorded config lacks (a field added to the code since) is not the user's
  # change: accepted, recorded.
  assert checkpoints.reconcile_train_config(workdir, dict(base, init_from="")) == {
    "init_from": (None, "")
  }
  history = json.load(open(tmp_path / checkpoints.TRAIN_CONFIG_HISTORY_FILE))
  assert history[-1]["changes"] == {"init_from": [None, ""]}
  assert checkpoints.read_json(str(tmp_path / checkpoints.TRAIN_CONFIG_FILE))["init_from"] == ""
  # A field added with a value that reproduces the old code (config.ADDED_FIELDS): a run
  # recorded before it resumes under that value, and another value is refused by name.
  with pytest.raises(checkpoints.CheckpointError, match="max_loop_tokens: 0 -> 39"):
    checkpoints.reconcile_train_config(workdir, dict(base, init_from="", max_loop_tokens=39))
  assert checkpoints.reconcile_train_config(
    workdir, dict(base, init_from="", max_loop_tokens=0)
  ) == {"max_loop_tokens": (None, 0)}


def test_workdir_files_are_written_whole_with_the_umask_mode(tmp_path):
  path = str(tmp_path / "config.json")
  checkpoints.write_json(path, {"a": 1})
  circular = {"a": 2}
  circular["self"] = circular
  with pytest.raises(ValueError, match="Circular reference"):
    checkpoints.write_json(path, circular)  # fails half-way through the file
  assert checkpoints.read_json(path) == {"a": 1}
  assert os.listdir(tmp_path) == ["config.json"]
  src = tmp_path / "data" / "skeletons.json"
  src.parent.mkdir()
  src.write_text('{"format": "x"}')
  workdir = tmp_path / "run"
  workdir.mkdir()
  old = os.umask(0o027)
  try:
    checkpoints.copy_skeletons(str(src), str(workdir))
  finally:
    os.umask(old)
  assert checkpoints.read_skeletons_json(str(workdir)) == '{"format": "x"}'
  assert os.listdir(workdir) == [checkpoints.SKELETONS_FILE]
  assert os.stat(workdir / checkpoints.SKELETONS_FILE).st_mode & 0o777 == 0o640


def _small_state():
  cfg = model_lib.TLPConfig(
    feature_dim=4,
    seq_len=3,
    encoder_dims=(8,),
    attention_heads=2,
    res_blocks=1,
    decoder_dims=(8, 1),
    num_hardware_heads=1,
  )
  return step_lib.create_train_state(cfg, optax.sgd(0.1), seed=0)


def test_orbax_info_and_warnings_are_silenced(tmp_path, caplog):
  state = _small_state()
  with caplog.at_level(logging.DEBUG):
    latest, _ = checkpoints.checkpoint_managers(str(tmp_path), keep=1)
    checkpoints.save_checkpoint(latest, state, {"step": 0})
    latest.wait_until_finished()
    checkpoints.restore_checkpoint(checkpoints.open_for_reading(str(tmp_path), "latest"), state)
  orbax = [r for r in caplog.records if "/orbax/" in r.pathname]
  assert not [r for r in orbax if r.levelno < logging.ERROR], orbax[:3]
  # Errors still get through.
  record = logging.LogRecord("absl", logging.ERROR, "/x/orbax/y.py", 1, "boom", None, None)
  assert logging.getLogger("absl").filter(record)
