"""Tests of eval_lib / eval.py: report on hand-made arrays, errors, and end-to-end on the sample."""

import json
import os
import types

import numpy as np
import pytest

from tlp_jax import eval_lib
from tlp_jax import metrics


def _toy_arrays():
  """Two hardware, three tasks, a test split of 9 programs (one invalid on hw 'b')."""
  # Same programs as test_metrics: task 0 latency [1, 2, 4], task 1 [3, 6], task 2 [5,10,20,8].
  task = np.array([0, 1, 2, 0, 2, 1, 0, 2, 2], np.int32)
  lat = np.array([1., 3., 5., 2., 10., 6., 4., 20., 8.])
  min_cost = np.array([[1., 2.], [3., 1.], [5., 1.]])
  scores = np.stack([min_cost[task, 0] / lat, np.linspace(1, 0.2, 9)], 1).astype(np.float32)
  mask = np.ones((9, 2), bool)
  mask[4, 1] = False
  # Feature 0 carries the "prediction" a trivial predictor reads back.
  pred = np.array([0.1, 0.2, 0.3, 0.9, 0.1, 0.8, 0.5, 0.9, 0.2], np.float32)
  features = np.zeros((9, 2, 3), np.float32)
  features[:, 0, 0] = pred
  test = types.SimpleNamespace(features=features, scores=scores, mask=mask, task_index=task)
  empty = types.SimpleNamespace(features=np.zeros((0, 2, 3), np.float32),
                                scores=np.zeros((0, 2), np.float32), mask=np.zeros((0, 2), bool),
                                task_index=np.zeros(0, np.int32))
  nets = [types.SimpleNamespace(label="A", task_indices=np.array([0, 1]), weights=np.array([2, 1])),
          types.SimpleNamespace(label="B", task_indices=np.array([1, 2]), weights=np.array([3, 1]))]
  tasks = types.SimpleNamespace(workload_keys=["w0", "w1", "w2"], min_cost=min_cost)
  return types.SimpleNamespace(train=empty, validation=empty, test=test, hardware=("a", "b"),
                               tasks=tasks, networks=nets)


def _read_feature0(x):
  return x[:, 0, 0]


def test_report_matches_hand_values_with_random_oracle_and_extra_rows(tmp_path):
  arrays = _toy_arrays()
  data = eval_lib.select_split(arrays, "a", "test")
  extra = np.arange(9, dtype=np.float64)  # ranks later programs first
  report = eval_lib.evaluate(data, _read_feature0, model_name="toy", ks=(1, 2),
                             extra_predictions={"xgb": extra}, batch_size=4)
  rows = report["rows"]
  assert list(rows) == ["toy", "xgb", eval_lib.RANDOM_ROW, eval_lib.ORACLE_ROW]
  # Hand values (tests/test_metrics.py): A 5/10, 5/7; B 14/38, 1; pooled 19/48, 19/21.
  assert rows["toy"]["per_network"]["A"]["top-1"] == pytest.approx(0.5)
  assert rows["toy"]["per_network"]["B"]["top-2"] == pytest.approx(1.0)
  assert rows["toy"]["pooled"]["top-1"] == pytest.approx(19 / 48)
  assert rows["toy"]["mean"]["top-2"] == pytest.approx((5 / 7 + 1) / 2)
  # Extra row: task 0 -> program 6 (lat 4) then 3 (lat 2); task 1 -> 5 (6), 1 (3);
  # task 2 -> 8 (8), 7 (20). A top-1 = 5 / (2*4 + 6); B top-1 = 14 / (3*6 + 8).
  assert rows["xgb"]["per_network"]["A"]["top-1"] == pytest.approx(5 / 14)
  assert rows["xgb"]["per_network"]["B"]["top-1"] == pytest.approx(14 / 26)
  # Random: task 0 E[best_1] = 7/3, task 1 = 4.5 -> A = 5 / (2*7/3 + 4.5).
  assert rows[eval_lib.RANDOM_ROW]["per_network"]["A"]["top-1"] == pytest.approx(5 / (14 / 3 + 4.5))
  for agg in ("mean", "pooled"):
    assert rows[eval_lib.ORACLE_ROW][agg] == {"top-1": 1.0, "top-2": 1.0}
  assert report["num_programs"] == 9 and report["scatter"]["total"] == 9
  paths = eval_lib.write_report(report, str(tmp_path))
  with open(paths["json"]) as f:
    assert json.load(f)["rows"]["toy"]["pooled"]["top-2"] == pytest.approx(19 / 21)
  assert os.path.getsize(paths["png"]) > 10_000
  text = eval_lib.format_report(report)
  assert "| toy | **pooled (TLP)** | 0.396 | 0.905 |" in text
  assert eval_lib.RANDOM_ROW in text and "oracle" in text


def test_invalid_programs_of_the_hardware_are_dropped():
  data = eval_lib.select_split(_toy_arrays(), "b", "test")
  assert data.rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 8] and data.num_split_programs == 9
  # Latency is recovered from hw b's own min_cost and score, as TLP does.
  np.testing.assert_allclose(data.latency[0], 2.0 / 1.0)
  report = eval_lib.evaluate(data, _read_feature0, ks=(1,))
  assert report["num_programs"] == 8


def test_unknown_hardware_lists_available():
  with pytest.raises(eval_lib.EvalError, match=r"'graviton2'.*available: a, b"):
    eval_lib.select_split(_toy_arrays(), "graviton2")


def test_extra_predictions_must_align_with_split():
  data = eval_lib.select_split(_toy_arrays(), "a")
  with pytest.raises(eval_lib.EvalError, match="9 programs"):
    eval_lib.evaluate(data, _read_feature0, extra_predictions={"bad": np.zeros(8)})


def test_predict_in_batches_checks_output_length():
  with pytest.raises(ValueError, match="returned 1 values"):
    eval_lib.predict_in_batches(lambda x: np.zeros(1), np.zeros((5, 2, 3)), batch_size=2)
  got = eval_lib.predict_in_batches(_read_feature0, _toy_arrays().test.features, batch_size=2)
  np.testing.assert_allclose(got, _toy_arrays().test.features[:, 0, 0])


def test_metrics_and_eval_agree_on_random_ranking():
  # evaluate()'s random row is metrics.random_top_k_scores on the same programs.
  data = eval_lib.select_split(_toy_arrays(), "a")
  r = metrics.random_top_k_scores(data.latency, data.task_index, data.networks, (1, 5))
  report = eval_lib.evaluate(data, _read_feature0, ks=(1, 5))
  assert report["rows"][eval_lib.RANDOM_ROW]["pooled"]["top-5"] == pytest.approx(r.pooled[1])
