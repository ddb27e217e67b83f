"""Tests of tlp_jax.evaluation.data: the evaluated programs of a split on one hardware."""

import numpy as np
import pytest

from tlp_jax.evaluation import data as eval_data_lib

from . import toy


def test_invalid_programs_of_the_hardware_are_dropped():
  data = eval_data_lib.eval_data(toy.toy_arrays(), "b", "test")
  assert data.rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 8] and data.num_split_programs == 9
  # Latency is recovered from hw b's own min_cost and score, as TLP does.
  np.testing.assert_allclose(data.latency[0], 2.0 / 1.0)
  np.testing.assert_array_equal(data.task_index, [0, 1, 2, 0, 1, 0, 2, 2])
  np.testing.assert_array_equal(data.features, toy.toy_arrays().test.features[data.rows])
  assert [n.name for n in data.networks] == ["A", "B"] and data.task_keys == ("w0", "w1", "w2")


def test_latency_of_hardware_a_is_the_measured_one():
  data = eval_data_lib.eval_data(toy.toy_arrays(), "a")
  np.testing.assert_allclose(
    data.latency, [1.0, 3.0, 5.0, 2.0, 10.0, 6.0, 4.0, 20.0, 8.0], rtol=1e-6
  )


def test_unknown_hardware_lists_available():
  with pytest.raises(eval_data_lib.EvalError, match=r"'graviton2'.*available: a, b"):
    eval_data_lib.eval_data(toy.toy_arrays(), "graviton2")


def test_unknown_split_is_an_error():
  with pytest.raises(eval_data_lib.EvalError, match="unknown split 'dev'"):
    eval_data_lib.eval_data(toy.toy_arrays(), "a", "dev")
