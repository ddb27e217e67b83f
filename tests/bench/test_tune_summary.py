"""bench.tune_summary: reaching XGB's final latency, spread over seeds, mismatched reports."""

import pytest

from bench import tune_summary


def _result(latencies, status="done", step=8, secs=10.0):
  curve = [
    {"trials": step * (i + 1), "elapsed_s": secs * (i + 1), "estimated_latency_ms": lat}
    for i, lat in enumerate(latencies)
  ]
  return {
    "status": status,
    "curve": curve,
    "trials": step * len(latencies),
    "final_estimated_latency_ms": latencies[-1],
    "tuning_wall_s": secs * len(latencies),
    "end_to_end": {"latency_ms_mean": latencies[-1] * 1.5},
    "predict_s_per_round_mean": 0.5,
  }


def _report(seed, results):
  budget = {"num_tasks": 0, "n_trials": 32, "num_measures_per_round": 8, "population": 256}
  return {"network": "mobilenet:1:240", "budget": {**budget, "seed": seed}, "results": results}


def test_trials_to_reach_xgb_final_are_per_seed():
  reports = [
    _report(0, {"xgb": _result([None, 9.0, 7.0, 6.0]), "tlp": _result([None, 6.5, 5.9, 5.5])}),
    _report(1, {"xgb": _result([None, 8.0, 8.0, 5.0]), "tlp": _result([None, 7.0, 6.0, 6.0])}),
  ]
  s = tune_summary.summarise(reports)
  tlp, xgb = s["variants"]["tlp"], s["variants"]["xgb"]
  # seed 0: xgb's final 6.0 is first reached by tlp at 24 trials; seed 1: tlp never gets to 5.0
  assert tlp["trials_to_xgb_final"]["values"] == [24, None]
  assert tlp["reached_xgb_final"] == 1
  assert tlp["ended_worse_than_xgb"] == 1
  assert tlp["final_over_xgb_final"]["values"] == pytest.approx([5.5 / 6.0, 6.0 / 5.0])
  assert xgb["trials_to_xgb_final"]["values"] == [32, 32]
  # curve points before every task was measured (None) are left out; mean and std per trial
  assert [p["trials"] for p in tlp["curve"]] == [16, 24, 32]
  assert tlp["curve"][0]["latency_ms_mean"] == pytest.approx(6.75)
  assert tlp["curve"][0]["latency_ms_std"] == pytest.approx(0.25)


def test_unfinished_variant_counts_as_missing_not_as_a_result():
  reports = [
    _report(0, {"xgb": _result([9.0, 7.0]), "random": _result([9.0, 8.0], status="exit code -6")}),
  ]
  s = tune_summary.summarise(reports)
  assert s["variants"]["random"]["final_ms"] == {
    "mean": None,
    "std": None,
    "n": 0,
    "of": 1,
    "values": [None],
  }


def test_reports_of_different_budgets_are_refused():
  a = _report(0, {"xgb": _result([9.0])})
  b = _report(1, {"xgb": _result([9.0])})
  b["budget"]["n_trials"] = 64
  with pytest.raises(ValueError, match="differ"):
    tune_summary.summarise([a, b])


def test_tune_network_resumes_only_matching_finished_variants(tmp_path, run_python):
  # bench.tune_network defines absl flags at import: checked in its own process.
  code = """
import json, sys
from bench import tune_network as t
path, budget = sys.argv[1], {"n_trials": 32, "seed": 0}
json.dump({"network": "mobilenet:1:240", "budget": budget, "tlp_model_sha256": "abc",
           "results": {"xgb": {"status": "done"}, "tlp-none": {"status": "exit code -6"}}},
          open(path, "w"))
print(sorted(t.finished_variants(path, "mobilenet:1:240", budget, "abc")))
print(sorted(t.finished_variants(path, "mobilenet:1:240", budget, "other model")))
print(sorted(t.finished_variants(path, "mobilenet:1:240", {"n_trials": 64, "seed": 0}, "abc")))
print(sorted(t.finished_variants(path + ".absent", "mobilenet:1:240", budget, "abc")))
"""
  proc = run_python("-c", code, str(tmp_path / "r.json"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split("\n")[:4] == ["['xgb']", "[]", "[]", "[]"]


def _per_task_result(bests, weights=(1, 2, 1)):
  """A finished variant whose curve records each task's best latency per round."""
  curve = [
    {"trials": 8 * (i + 1), "elapsed_s": 10.0 * (i + 1), "best_ms_per_task": list(b)}
    for i, b in enumerate(bests)
  ]
  tasks = [{"desc": f"t{i}", "weight": w} for i, w in enumerate(weights)]
  return {"status": "done", "curve": curve, "trials": 8 * len(bests), "tasks": tasks}


def test_tasks_not_every_variant_measured_are_left_out_of_the_comparison():
  # Task 2 never builds for anyone; task 1 only for tlp: both are left out, and the curves
  # compare task 0 (weight 1) alone -- also in rounds where task 1 had no measurement yet.
  xgb = _per_task_result([[4.0, None, None], [3.0, None, None]])
  tlp = _per_task_result([[5.0, None, None], [2.0, 1.0, None]])
  s = tune_summary.summarise([_report(0, {"xgb": xgb, "tlp": tlp})])
  assert s["tasks_left_out_per_seed"] == [["t1", "t2"]]
  assert s["variants"]["xgb"]["final_ms"]["values"] == [3.0]
  assert s["variants"]["tlp"]["final_ms"]["values"] == [2.0]
  assert s["variants"]["tlp"]["trials_to_xgb_final"]["values"] == [16]
