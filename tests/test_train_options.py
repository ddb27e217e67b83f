"""Trainer options added on top of TLP's recipe: batch order by task, matmul precision."""
import numpy as np

from tlp_jax.train import train_lib


def test_by_task_order_keeps_tasks_contiguous_and_covers_every_row_once():
  task_index = np.random.default_rng(0).integers(0, 7, size=50)
  order, valid = train_lib.epoch_order(3, 1, 50, steps_per_epoch=4, global_batch=16,
                                       task_index=task_index)
  rows = order[valid]
  assert sorted(rows.tolist()) == list(range(50))
  tasks = task_index[rows]
  # Contiguous runs: the number of task changes is the number of distinct tasks minus one.
  assert np.count_nonzero(np.diff(tasks)) == len(np.unique(task_index)) - 1
  again, _ = train_lib.epoch_order(3, 1, 50, 4, 16, task_index)
  np.testing.assert_array_equal(order, again)
  other_epoch, _ = train_lib.epoch_order(3, 2, 50, 4, 16, task_index)
  assert not np.array_equal(order, other_epoch)


def test_random_order_is_unchanged_by_the_option():
  order, valid = train_lib.epoch_order(5, 0, 30, 2, 16)
  expected = np.random.default_rng([5, train_lib._STREAM_SHUFFLE, 0]).permutation(30)
  np.testing.assert_array_equal(order[valid], expected)
  assert valid.sum() == 30 and not valid[30:].any()


def test_matmul_precision_is_in_force_while_training(monkeypatch, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from configs import test as test_config    # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(train_lib, "_train_and_evaluate",
                      lambda *a: seen.append(jax.config.jax_default_matmul_precision))
  config = test_config.get_config()
  config.matmul_precision = "highest"
  train_lib.train_and_evaluate(config, str(tmp_path))
  assert seen == ["highest"]
  assert jax.config.jax_default_matmul_precision != "highest"  # restored afterwards


def test_unknown_matmul_precision_is_a_clear_error(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from configs import test as test_config    # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.matmul_precision = "fp8"
  with pytest.raises(ValueError, match="matmul_precision"):
    train_lib.train_and_evaluate(config, str(tmp_path))


def test_unknown_batch_order_fails_before_any_work(tmp_path):
  import pytest  # pylint: disable=g-import-not-at-top
  from configs import test as test_config    # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.batch_order = "by_network"
  with pytest.raises(ValueError, match="batch_order"):
    train_lib.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
