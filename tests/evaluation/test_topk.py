"""Tests of tlp_jax.evaluation.topk: a predict function's rows, baselines and costliest tasks."""

import numpy as np
import pytest

from tlp_jax.core import metrics
from tlp_jax.evaluation import topk
from tlp_jax.evaluation.data import EvalError, eval_data

from . import toy


def test_rows_match_hand_values_with_random_oracle_and_extra_rows():
  data = eval_data(toy.toy_arrays(), "a", "test")
  extra = np.arange(9, dtype=np.float64)  # ranks later programs first
  report = topk.topk_report(
    data,
    toy.read_feature0,
    model_name="toy",
    ks=(1, 2),
    extra_predictions={"xgb": extra},
    batch_size=4,
  )
  rows = report["rows"]
  assert list(rows) == ["toy", "xgb", topk.RANDOM_ROW, topk.ORACLE_ROW]
  # Hand values (tests/core/test_metrics.py): A 5/10, 5/7; B 14/38, 1; pooled 19/48, 19/21.
  assert rows["toy"]["per_network"]["A"]["top-1"] == pytest.approx(0.5)
  assert rows["toy"]["per_network"]["B"]["top-2"] == pytest.approx(1.0)
  assert rows["toy"]["pooled"]["top-1"] == pytest.approx(19 / 48)
  assert rows["toy"]["mean"]["top-2"] == pytest.approx((5 / 7 + 1) / 2)
  # Extra row: task 0 -> program 6 (lat 4) then 3 (lat 2); task 1 -> 5 (6), 1 (3);
  # task 2 -> 8 (8), 7 (20). A top-1 = 5 / (2*4 + 6); B top-1 = 14 / (3*6 + 8).
  assert rows["xgb"]["per_network"]["A"]["top-1"] == pytest.approx(5 / 14)
  assert rows["xgb"]["per_network"]["B"]["top-1"] == pytest.approx(14 / 26)
  # Random: task 0 E[best_1] = 7/3, task 1 = 4.5 -> A = 5 / (2*7/3 + 4.5).
  assert rows[topk.RANDOM_ROW]["per_network"]["A"]["top-1"] == pytest.approx(5 / (14 / 3 + 4.5))
  assert "task_mean" not in rows[topk.RANDOM_ROW] and "task_mean" in rows["toy"]
  for agg in ("mean", "pooled"):
    assert rows[topk.ORACLE_ROW][agg] == {"top-1": 1.0, "top-2": 1.0}
  assert report["num_programs"] == 9 and report["scatter"]["total"] == 9
  assert report["model"] == {"name": "toy"} and report["num_tasks_with_programs"] == 3


def test_costliest_tasks_by_hand():
  arrays = toy.toy_arrays()
  data = eval_data(arrays, "a")
  pred = toy.read_feature0(arrays.test.features).astype(np.float64)
  costly = topk.costliest_tasks(pred, data)
  # Top-1 picks: task 0 latency 2 (best 1), task 1 6 (3), task 2 20 (5); occurrences over both
  # networks 2, 1 + 3, 1. Excess W * (pick - best) = 2, 12, 15 of 29; best sum 19, pick sum 48.
  assert [t["task"] for t in costly] == [2, 1, 0]
  assert [t["pick_ratio"] for t in costly] == pytest.approx([4.0, 2.0, 2.0])
  assert [t["excess_share"] for t in costly] == pytest.approx([15 / 29, 12 / 29, 2 / 29])
  assert [t["pooled_top1_if_fixed"] for t in costly] == pytest.approx([19 / 33, 19 / 36, 19 / 46])
  assert costly[1]["networks"] == ["A", "B"] and costly[1]["weight"] == 4
  assert costly[0]["best_latency_share"] == pytest.approx(5 / 19)
  assert topk.costliest_tasks(-data.latency, data) == []  # the oracle loses nothing
  assert len(topk.costliest_tasks(pred, data, limit=1)) == 1


def test_invalid_programs_are_not_scored():
  report = topk.topk_report(eval_data(toy.toy_arrays(), "b"), toy.read_feature0, ks=(1,))
  assert report["num_programs"] == 8 and report["num_split_programs"] == 9


def test_extra_predictions_must_align_with_split_and_not_clash():
  data = eval_data(toy.toy_arrays(), "a")
  with pytest.raises(EvalError, match="9 programs"):
    topk.topk_report(data, toy.read_feature0, extra_predictions={"bad": np.zeros(8)})
  with pytest.raises(EvalError, match="clashes"):
    topk.topk_report(data, toy.read_feature0, extra_predictions={topk.ORACLE_ROW: np.zeros(9)})


def test_predict_in_batches_checks_output_length():
  with pytest.raises(ValueError, match="returned 1 values"):
    topk.predict_in_batches(lambda x: np.zeros(1), np.zeros((5, 2, 3)), batch_size=2)
  x = toy.toy_arrays().test.features
  got = topk.predict_in_batches(toy.read_feature0, x, batch_size=2)
  np.testing.assert_allclose(got, x[:, 0, 0])
  rows = np.array([8, 0, 3, 4, 5])
  got = topk.predict_in_batches(toy.read_feature0, x, rows, batch_size=2)
  np.testing.assert_allclose(got, x[rows, 0, 0])
  # Several threads: the same scores in the same order, and a bad batch still raises.
  for workers in (0, 3):
    got = topk.predict_in_batches(toy.read_feature0, x, rows, batch_size=2, workers=workers)
    np.testing.assert_allclose(got, x[rows, 0, 0])
  with pytest.raises(ValueError, match="returned 1 values"):
    topk.predict_in_batches(lambda x: np.zeros(1), np.zeros((5, 2, 3)), batch_size=2, workers=2)
  with pytest.raises(ValueError, match="workers must be >= 0"):
    topk.predict_in_batches(toy.read_feature0, x, workers=-1)


def test_random_row_is_the_metrics_expectation():
  data = eval_data(toy.toy_arrays(), "a")
  r = metrics.random_top_k_scores(data.latency, data.task_index, data.networks, (1, 5))
  report = topk.topk_report(data, toy.read_feature0, ks=(1, 5))
  assert report["rows"][topk.RANDOM_ROW]["pooled"]["top-5"] == pytest.approx(r.pooled[1])


def _with_tokens(arrays):
  """The toy arrays with loop tokens whose row 0, column 1 carries the prediction instead."""
  test = arrays.test
  tokens = np.zeros((9, 4, 21), np.float16)
  tokens[:, 0, 1] = test.features[::-1, 0, 0]  # another ranking than features
  arrays.test = type(test)(**{**vars(test), "loop_tokens": tokens})
  return arrays


def test_loop_tokens_are_passed_aligned_with_the_rows_of_the_valid_programs():
  data = eval_data(_with_tokens(toy.toy_arrays()), "b", "test")  # program 4 is invalid on b
  assert data.loop_tokens.shape == (8, 4, 21)
  seen = []

  def predict(x, tokens):
    seen.append((x.shape, tokens.shape))
    return tokens[:, 0, 1].astype(np.float32)

  report = topk.topk_report(data, predict, model_name="tok", batch_size=3, loop_tokens=True)
  assert seen[0] == ((3, 2, 3), (3, 4, 21)) and len(seen) == 3
  pred = data.loop_tokens[:, 0, 1].astype(np.float64)
  want = metrics.top_k_scores(
    pred, data.latency, data.task_index, data.networks, metrics.DEFAULT_KS, len(data.task_keys)
  ).to_dict()
  assert {k: v for k, v in report["rows"]["tok"].items() if k != "task_mean"} == want
  # Without loop_tokens=True the predict function gets the features alone.
  assert topk.topk_report(data, toy.read_feature0, model_name="f")["rows"]["f"]
  with pytest.raises(EvalError, match="reads loop tokens but the test split has none"):
    topk.topk_report(eval_data(toy.toy_arrays(), "a"), predict, loop_tokens=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_model_predicting_non_finite_scores_is_an_eval_error_naming_it(bad):
  def broken(x):
    out = toy.read_feature0(x).astype(np.float64)
    out[1] = bad
    return out

  with pytest.raises(EvalError, match=r"model 'toy' \(/m/toy.npz\) predicted 1 non-finite"):
    topk.topk_report(
      eval_data(toy.toy_arrays(), "a"),
      broken,
      model_name="toy",
      ks=(1,),
      model_info={"model_file": "/m/toy.npz"},
    )
