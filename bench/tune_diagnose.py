r"""Why a TLP-guided search ends where it does: the model's ranking on the programs a tuning
run measured, against the programs another cost model's run found (no TVM needed).

For each task with at least ``--min_programs`` valid measurements in both Ansor record logs
(``--tlp_log``: a ``--cost_model tlp`` run; ``--reference_log``: e.g. the ``xgb`` run of the
same seed), the model (an exported ``.npz`` of loop tokens, whose embedded skeletons replay the
programs) scores the programs of each log and of both pooled. Reported per log and pooled:

* Spearman correlation between the model's score and measured speed, per task (mean, median);
* the cost of the model's top-1 pick over the best measured (1.0 = it picks the best);
* pooled: in how many tasks the best program of either run is in the model's top 3, whether the
  model scores the TLP run's programs above the reference run's (the search climbing the model
  where the machine disagrees), and the geometric mean of best-cost ratios between the runs.

Usage::

  python -m bench.tune_diagnose --model M.npz --tlp_log RUN/tlp-none/records.json \
      --reference_log RUN/xgb/records.json --out bench/results/tune_diagnose_seed0.json
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np

from bench import common
from tlp_jax.core import predictor as npred


def valid_programs(path: str) -> dict[str, list[tuple[list, float]]]:
  """``{workload_key: [(steps, mean cost in s), ...]}`` of a record log's valid measurements,
  in log order."""
  out: dict[str, list] = collections.defaultdict(list)
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        key, steps, (costs, err) = r["i"][0][0], r["i"][1][1], r["r"][:2]
      except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{path}:{n}: not an Ansor measure record ({e})") from None
      if err == 0:
        out[key].append((steps, float(np.mean(costs))))
  return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation (ties broken by position)."""
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def _ranking(scores: np.ndarray, costs: np.ndarray) -> dict:
  return {
    "spearman_score_speed": spearman(scores, -costs),
    "top1_cost_over_best": float(costs[np.argmax(scores)] / costs.min()),
  }


def diagnose(model: npred.Predictor, tlp: dict, ref: dict, min_programs: int) -> dict:
  """The numbers of the module docstring for two runs' valid programs (``valid_programs``)."""
  per_task = []
  for key in sorted(set(tlp) & set(ref)):
    a, b = tlp[key], ref[key]
    if len(a) < min_programs or len(b) < min_programs:
      continue
    pooled = a + b
    scores = model.predict_steps([p[0] for p in pooled], workload_key=key)
    costs = np.array([p[1] for p in pooled])
    n = len(a)
    best = int(np.argmin(costs))
    per_task.append(
      {
        "workload_key": key,
        "programs": [len(a), len(b)],
        "tlp_run": _ranking(scores[:n], costs[:n]),
        "reference_run": _ranking(scores[n:], costs[n:]),
        "pooled": {
          **_ranking(scores, costs),
          "best_in_model_top3": bool(scores[best] >= np.sort(scores)[-min(3, len(scores))]),
          "model_prefers_tlp_run": bool(scores[:n].max() > scores[n:].max()),
          "best_cost_tlp_over_reference": float(costs[:n].min() / costs[n:].min()),
        },
      }
    )

  def mean(path: list[str]) -> float:
    vals = []
    for t in per_task:
      node = t
      for p in path:
        node = node[p]
      vals.append(float(node))
    return float(np.mean(vals)) if vals else float("nan")

  ratios = [t["pooled"]["best_cost_tlp_over_reference"] for t in per_task]
  return {
    "tasks": len(per_task),
    "summary": {
      "tlp_run_spearman_mean": mean(["tlp_run", "spearman_score_speed"]),
      "reference_run_spearman_mean": mean(["reference_run", "spearman_score_speed"]),
      "pooled_spearman_mean": mean(["pooled", "spearman_score_speed"]),
      "tlp_run_top1_cost_over_best_mean": mean(["tlp_run", "top1_cost_over_best"]),
      "reference_run_top1_cost_over_best_mean": mean(["reference_run", "top1_cost_over_best"]),
      "pooled_top1_cost_over_best_mean": mean(["pooled", "top1_cost_over_best"]),
      "pooled_best_in_model_top3": sum(t["pooled"]["best_in_model_top3"] for t in per_task),
      "pooled_model_prefers_tlp_run": sum(t["pooled"]["model_prefers_tlp_run"] for t in per_task),
      "best_cost_tlp_over_reference_geomean": float(np.exp(np.mean(np.log(ratios))))
      if ratios
      else None,
    },
    "per_task": per_task,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="exported TLP model (.npz, loop tokens)")
  parser.add_argument("--tlp_log", required=True, help="Ansor record log of a TLP-guided run")
  parser.add_argument("--reference_log", required=True, help="record log of the reference run")
  parser.add_argument("--min_programs", type=int, default=8)
  parser.add_argument("--out", required=True, help="JSON to write")
  args = parser.parse_args()
  model = npred.Predictor.load(args.model)
  result = diagnose(
    model,
    valid_programs(args.tlp_log),
    valid_programs(args.reference_log),
    args.min_programs,
  )
  result.update(
    model=args.model,
    tlp_log=args.tlp_log,
    reference_log=args.reference_log,
    machine=common.machine_info(),
  )
  common.write_json(args.out, result)
  for k, v in result["summary"].items():
    print(f"{k:45s} {v}")


if __name__ == "__main__":
  main()
