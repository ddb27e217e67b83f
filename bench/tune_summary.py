r"""Summarise ``bench.tune_network`` runs over seeds: curves with spread and the issue's numbers.

Reads one ``bench.tune_network`` report per seed (same network and budget, different
``--seed``) and writes, per variant, over the seeds where it finished:

* the estimated network latency (ms) at every trial count: mean, std and each seed;
* the trials and tuning wall time it needs to reach the XGB variant's final estimated latency
  *of the same seed*, and that as a share of the run's trials (the goal: TLP within a third);
* its final estimated latency, relative to XGB's of the same seed (> 1 = ends worse);
* the measured end-to-end latency of the compiled network (``graph_executor`` time_evaluator);
* predict seconds per round.

Writes ``OUT.json`` and ``OUT.png`` (mean +- std against trials and wall time)::

  python -m bench.tune_summary bench/results/tune_mobilenet_240_all_seed{0,1,2}.json \
      --out bench/results/tune_mobilenet_240_all_summary
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench import common

REFERENCE = "xgb"


def compared_tasks(results: list[dict]) -> list[int] | None:
  """Indices of the tasks that every result measured validly by its end (a task no schedule
  can build, for any cost model, drops out of the comparison); None if a result's curve does
  not record per-task bests (then the whole network's estimate is compared)."""
  finals = []
  for r in results:
    curve = r.get("curve") or []
    if not curve or "best_ms_per_task" not in curve[-1]:
      return None
    finals.append(curve[-1]["best_ms_per_task"])
  return [i for i in range(len(finals[0])) if all(f[i] is not None for f in finals)]


def _curve(result: dict, tasks: list[int] | None) -> list[tuple[int, float, float]]:
  """(trials, elapsed_s, estimated latency in ms) of the rounds where every compared task has a
  valid measurement: the weighted sum of their best latencies (``tasks`` None: the tuner's own
  estimate of the whole network)."""
  out = []
  weights = [t["weight"] for t in result.get("tasks", [])]
  for c in result.get("curve", []):
    if tasks is None:
      latency = c.get("estimated_latency_ms")
    else:
      best = c["best_ms_per_task"]
      ok = all(best[i] is not None for i in tasks)
      latency = sum(weights[i] * best[i] for i in tasks) if ok else None
    if latency is not None:
      out.append((c["trials"], c["elapsed_s"], latency))
  return out


def first_reach(
  curve: list[tuple[int, float, float]], target_ms: float
) -> tuple[int | None, float | None]:
  """Trials and wall seconds at which ``curve`` first reaches ``target_ms`` or better; (None,
  None) if it never does."""
  for trials, elapsed, latency in curve:
    if latency <= target_ms * (1 + 1e-9):
      return trials, elapsed
  return None, None


def _stats(values: list) -> dict:
  """Mean and std of the values that exist, with how many there were of how many."""
  have = [float(v) for v in values if v is not None]
  return {
    "mean": float(np.mean(have)) if have else None,
    "std": float(np.std(have)) if have else None,
    "n": len(have),
    "of": len(values),
    "values": values,
  }


def summarise(reports: list[dict]) -> dict:
  """The per-variant summary of ``reports`` (one per seed; see the module docstring)."""
  networks = {r["network"] for r in reports}
  budgets = {json.dumps({k: v for k, v in r["budget"].items() if k != "seed"}) for r in reports}
  if len(networks) != 1 or len(budgets) != 1:
    raise ValueError(f"reports differ in network {networks} or budget {budgets}")
  seeds = [r["budget"]["seed"] for r in reports]
  variants = sorted({v for r in reports for v in r["results"]})
  out = {"network": networks.pop(), "budget": json.loads(budgets.pop()), "seeds": seeds}
  # Per seed: the tasks every finished variant measured, and each variant's curve over them.
  curves, excluded = [], []
  for r in reports:
    done = {k: v for k, v in r["results"].items() if v.get("status") == "done"}
    tasks = compared_tasks(list(done.values())) if done else None
    curves.append({k: _curve(v, tasks) for k, v in done.items()})
    names = [t["desc"] for t in next(iter(done.values()), {}).get("tasks", [])]
    excluded.append(None if tasks is None else [n for i, n in enumerate(names) if i not in tasks])
  out["tasks_left_out_per_seed"] = excluded
  per_variant = {}
  for variant in variants:
    rows = []
    for seed_curves, r in zip(curves, reports):
      result = r["results"].get(variant)
      if not seed_curves.get(variant):
        rows.append(None)
        continue
      curve = seed_curves[variant]
      ref = seed_curves.get(REFERENCE)
      ref_final = ref[-1][2] if ref else None
      trials, wall = first_reach(curve, ref_final) if ref_final is not None else (None, None)
      final = curve[-1][2]
      e2e = result.get("end_to_end") or {}
      rows.append(
        {
          "final_ms": final,
          "final_over_xgb_final": final / ref_final if final and ref_final else None,
          "trials_to_xgb_final": trials,
          "share_of_trials_to_xgb_final": trials / result["trials"] if trials else None,
          "wall_s_to_xgb_final": wall,
          "tuning_wall_s": result.get("tuning_wall_s"),
          "e2e_ms": e2e.get("latency_ms_mean"),
          "predict_s_per_round": result.get("predict_s_per_round_mean"),
          "curve": curve,
        }
      )
    done = [row for row in rows if row is not None]
    entry = {
      key: _stats([row[key] if row else None for row in rows])
      for key in (
        "final_ms",
        "final_over_xgb_final",
        "trials_to_xgb_final",
        "share_of_trials_to_xgb_final",
        "wall_s_to_xgb_final",
        "tuning_wall_s",
        "e2e_ms",
        "predict_s_per_round",
      )
    }
    entry["reached_xgb_final"] = sum(row["trials_to_xgb_final"] is not None for row in done)
    entry["ended_worse_than_xgb"] = sum(
      (row["final_over_xgb_final"] or 0) > 1 + 1e-9 for row in done
    )
    entry["curve"] = _mean_curve([row["curve"] for row in done])
    per_variant[variant] = entry
  out["variants"] = per_variant
  return out


def _mean_curve(curves: list[list[tuple[int, float, float]]]) -> list[dict]:
  """Mean and std of latency (and wall time) at each trial count that every seed reached."""
  if not curves:
    return []
  common_trials = sorted(set.intersection(*[{c[0] for c in cv} for cv in curves]))
  points = []
  for t in common_trials:
    lat = [next(c[2] for c in cv if c[0] == t) for cv in curves]
    wall = [next(c[1] for c in cv if c[0] == t) for cv in curves]
    points.append(
      {
        "trials": t,
        "latency_ms_mean": float(np.mean(lat)),
        "latency_ms_std": float(np.std(lat)),
        "elapsed_s_mean": float(np.mean(wall)),
      }
    )
  return points


def plot(summary: dict, path: str) -> None:
  """Mean +- std of the estimated latency against trials and against wall time."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, entry in summary["variants"].items():
    pts = entry["curve"]
    if not pts:
      continue
    x = np.array([p["trials"] for p in pts])
    w = np.array([p["elapsed_s_mean"] for p in pts])
    m = np.array([p["latency_ms_mean"] for p in pts])
    s = np.array([p["latency_ms_std"] for p in pts])
    for ax, xs in ((axes[0], x), (axes[1], w)):
      ax.plot(xs, m, label=f"{name} (n={entry['final_ms']['n']})")
      ax.fill_between(xs, m - s, m + s, alpha=0.2)
  title = f"{summary['network']}, seeds {summary['seeds']}"
  axes[0].set(xlabel="measurement trials", ylabel="estimated latency (ms)", title=title)
  axes[1].set(xlabel="tuning wall time (s), mean over seeds", ylabel="estimated latency (ms)")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("reports", nargs="+", help="bench.tune_network JSON reports, one per seed")
  parser.add_argument("--out", required=True, help="output path without extension")
  args = parser.parse_args()
  reports = []
  for path in args.reports:
    with open(path, encoding="utf-8") as f:
      reports.append(json.load(f))
  summary = summarise(reports)
  summary["reports"] = args.reports
  common.write_json(args.out + ".json", summary)
  plot(summary, args.out + ".png")
  for name, e in summary["variants"].items():
    f, r = e["final_ms"], e["trials_to_xgb_final"]
    print(
      f"{name:10s} final {f['mean']} +- {f['std']} ms (n={f['n']}), reached xgb's final in "
      f"{e['reached_xgb_final']} seeds at {r['values']} trials, ended worse in "
      f"{e['ended_worse_than_xgb']}"
    )


if __name__ == "__main__":
  main()
