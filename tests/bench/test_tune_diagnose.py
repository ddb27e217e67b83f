"""bench.tune_diagnose: record logs read per task, rankings of a model over two runs' programs."""

import json

import numpy as np
import pytest

from bench import tune_diagnose


def _log(path, rows):
  with open(path, "w") as f:
    for key, steps, costs, err in rows:
      f.write(json.dumps({"i": [[key, "llvm"], [[], steps]], "r": [costs, err, 0.1, 0]}) + "\n")
  return str(path)


class _Model:
  """Scores a program by its one step's number: the model of these tests."""

  def predict_steps(self, steps_list, workload_key=None):
    assert workload_key == "k"
    return np.array([float(s[0]) for s in steps_list])


def test_valid_programs_keep_order_and_drop_errors_and_bad_lines_are_named(tmp_path):
  path = _log(tmp_path / "a.json", [("k", [1], [0.2, 0.4], 0), ("k", [2], [1.0], 4)])
  assert tune_diagnose.valid_programs(path) == {"k": [([1], pytest.approx(0.3))]}
  with open(path, "a") as f:
    f.write("{not json\n")
  with pytest.raises(ValueError, match=r"a.json:3: not an Ansor measure record"):
    tune_diagnose.valid_programs(path)


def test_rankings_over_each_run_and_pooled(tmp_path):
  # The model scores higher = faster. In the TLP run it ranks perfectly; the reference run found
  # a faster program (cost 0.5) that the model scores lowest of all.
  tlp = {"k": [([3], 1.0), ([2], 2.0), ([1], 3.0)]}
  ref = {"k": [([0], 0.5), ([2.5], 4.0), ([0.5], 5.0)]}
  out = tune_diagnose.diagnose(_Model(), tlp, ref, min_programs=3)
  (task,) = out["per_task"]
  assert task["tlp_run"] == {"spearman_score_speed": pytest.approx(1.0), "top1_cost_over_best": 1.0}
  assert task["reference_run"]["top1_cost_over_best"] == pytest.approx(4.0 / 0.5)
  pooled = task["pooled"]
  assert pooled["top1_cost_over_best"] == pytest.approx(1.0 / 0.5)
  assert pooled["best_in_model_top3"] is False and pooled["model_prefers_tlp_run"] is True
  assert pooled["best_cost_tlp_over_reference"] == pytest.approx(2.0)
  assert out["summary"]["best_cost_tlp_over_reference_geomean"] == pytest.approx(2.0)
  # Tasks with too few programs in either run are left out.
  assert tune_diagnose.diagnose(_Model(), tlp, ref, min_programs=4)["tasks"] == 0
