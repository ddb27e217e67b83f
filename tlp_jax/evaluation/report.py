"""A top-k report (:func:`tlp_jax.evaluation.topk.topk_report`) as Markdown, PNG and JSON.

matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def _fmt(v) -> str:
  return "  n/a" if v is None else f"{v:.3f}"


def format_report(report: Mapping[str, Any]) -> str:
  """Markdown tables of a report: one row per (ranking, network / aggregate), one column per k."""
  ks = report["ks"]
  head = [f"top-{k}" for k in ks]
  out = io.StringIO()
  out.write(
    f"hardware {report['hardware']}, split {report['split']}: "
    f"{report['num_programs']} programs with a valid measurement "
    f"(of {report['num_split_programs']}), "
    f"{report['num_tasks_with_programs']} tasks\n\n"
  )
  out.write("| ranking | network | " + " | ".join(head) + " | tasks used/skipped |\n")
  out.write("|---|---|" + "---|" * len(head) + "---|\n")
  for name, row in report["rows"].items():
    for net, vals in row["per_network"].items():
      cells = " | ".join(_fmt(vals[h]) for h in head)
      out.write(f"| {name} | {net} | {cells} | {vals['tasks_used']}/{vals['tasks_skipped']} |\n")
    for agg, label in (
      ("mean", "mean (TenSet)"),
      ("pooled", "pooled (TLP)"),
      ("task_mean", "all tasks, unweighted"),
    ):
      if agg in row:
        cells = " | ".join(_fmt(row[agg][h]) for h in head)
        out.write(f"| {name} | **{label}** | {cells} | |\n")
  costly = report.get("costliest_tasks")
  if costly:
    out.write(
      f"\nTasks costing {report['model']['name']} the most pooled top-1 (its pick vs the "
      "task's best):\n\n| task | networks | weight | share of best latency | pick / best "
      "| share of the loss | pooled top-1 if fixed |\n|---|---|---|---|---|---|---|\n"
    )
    for t in costly:
      out.write(
        f"| {t['task']} {t['workload_key'][:60]} | {', '.join(t['networks'])} | "
        f"{t['weight']:g} | {t['best_latency_share']:.3f} | {t['pick_ratio']:.2f}x | "
        f"{t['excess_share']:.3f} | {t['pooled_top1_if_fixed']:.3f} |\n"
      )
  return out.getvalue()


def plot_report(report: Mapping[str, Any], path: str) -> None:
  """PNG: per-network grouped bars for each k, and predicted vs measured score of the model."""
  import matplotlib  # optional heavy dependency, only for the plot

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ks = report["ks"]
  rows = report["rows"]
  groups = list(next(iter(rows.values()))["per_network"]) + ["mean (TenSet)", "pooled (TLP)"]
  panels = len(ks) + 2  # one per k, the scatter, the legend
  ncols = min(3, panels)
  nrows = -(-panels // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.2 * nrows), squeeze=False)
  axes = axes.reshape(-1)
  width = 0.8 / len(rows)
  x = np.arange(len(groups))
  handles = []
  for ax, k in zip(axes, ks):
    key = f"top-{k}"
    handles = []
    for i, (name, row) in enumerate(rows.items()):
      vals = [row["per_network"][g][key] for g in groups[:-2]]
      vals += [row["mean"][key], row["pooled"][key]]
      vals = [np.nan if v is None else v for v in vals]
      handles.append(ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=name))
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{key} ({report['hardware']}, {report['split']})", fontsize=9)
  for ax in axes[len(ks) + 1 :]:
    ax.axis("off")
  axes[len(ks) + 1].legend(handles, list(rows), loc="center", fontsize=9)
  sc = report["scatter"]
  ax = axes[len(ks)]
  ax.scatter(sc["pred"], sc["score"], s=3, alpha=0.4)
  ax.set_xlabel("predicted score")
  ax.set_ylabel("measured score (min_cost / cost)")
  ax.set_title(
    f"{report['model']['name']}: {len(sc['pred'])} of {sc['total']} programs", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def default_out_dir(out: str | None, workdir: str | None, model_path: str | None) -> str:
  """Where ``eval.py`` writes: ``out``, else ``WORKDIR/eval``, else the model file's folder."""
  if out:
    return out
  if workdir:
    return os.path.join(workdir, "eval")
  return os.path.dirname(os.path.abspath(model_path))


def write_report(report: Mapping[str, Any], out_dir: str) -> dict[str, str]:
  """Writes ``report.json``, ``report.md`` and ``report.png`` under ``out_dir``; returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  stem = f"eval_{report['hardware']}_{report['split']}"
  paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
  with open(paths["json"], "w") as f:
    json.dump(report, f, indent=1, allow_nan=False)
  with open(paths["md"], "w") as f:
    f.write(format_report(report))
  plot_report(report, paths["png"])
  return paths
