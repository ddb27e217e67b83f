"""A top-k report (:func:`tlp_jax.evaluation.topk.topk_report`) as Markdown, PNG and JSON.

matplotlib is imported only when a plot is drawn. The files of one report are written together
and atomically (:func:`write_report`).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from tlp_jax.core import atomic_file
from tlp_jax.evaluation import topk


def _fmt(v) -> str:
  return "  n/a" if v is None else f"{v:.3f}"


def describe_model(model: Mapping[str, Any]) -> str:
  """One line naming the evaluated model: its file or workdir and checkpoint, and its step."""
  if model.get("model_file"):
    where = f"model file {model['model_file']}"
  elif model.get("workdir"):
    where = f"workdir {model['workdir']}, checkpoint {model.get('checkpoint', '?')}"
  else:
    where = "in-memory model"
  step = f", step {model['step']}" if model.get("step") is not None else ""
  heads = f", heads {', '.join(model['heads'])}" if model.get("heads") else ""
  return f"{model.get('name', 'model')} ({where}{step}{heads})"


def network_coverage(report: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
  """``{network: (tasks with programs in the split, tasks of the network)}``.

  A network whose tasks are mostly missing from the records (e.g. one of 22) scores on the few
  it has: its top-k says little about the whole network.
  """
  first = next(iter(report["rows"].values()))["per_network"]
  return {
    net: (int(v["tasks_used"]), int(v["tasks_used"]) + int(v["tasks_skipped"]))
    for net, v in first.items()
  }


def informative_ks(report: Mapping[str, Any]) -> list[int]:
  """The k values whose top-k can differ between rankings: ``k`` below the most programs of
  any task (at ``k >=`` every task's count, every ranking scores 1.0)."""
  most = report.get("max_task_programs")
  if most is None:  # a report written before the count was stored
    return list(report["ks"])
  return [k for k in report["ks"] if k < most]


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
  if report.get("model"):
    out.write(f"Model: {describe_model(report['model'])}\n\n")
  partial = [
    f"{net} covers {used} of {total} tasks"
    for net, (used, total) in network_coverage(report).items()
    if used < total
  ]
  if partial:
    out.write(
      "Partial coverage (tasks without programs in the split are skipped): "
      + "; ".join(partial)
      + ".\n\n"
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


def plot_report(report: Mapping[str, Any], path: str | IO[bytes]) -> None:
  """PNG: per-network grouped bars for each informative k, and predicted vs measured score.

  The oracle (1.0 everywhere) and the k at which no ranking can differ (:func:`informative_ks`)
  are left out; each network's tick says how many of its tasks the split covers.
  """
  import matplotlib  # optional heavy dependency, only for the plot

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ks = informative_ks(report)
  # The oracle is 1.0 by definition: the tables keep it, the plot leaves it out.
  rows = {name: row for name, row in report["rows"].items() if name != topk.ORACLE_ROW}
  coverage = network_coverage(report)
  nets = list(coverage)
  labels = [f"{net}\n{used}/{total} tasks" for net, (used, total) in coverage.items()]
  labels += ["mean (TenSet)", "pooled (TLP)"]
  panels = len(ks) + 2  # one per k, the scatter, the legend
  ncols = min(3, panels)
  nrows = -(-panels // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.4 * nrows), squeeze=False)
  axes = axes.reshape(-1)
  width = 0.8 / len(rows)
  x = np.arange(len(labels))
  handles = []
  for ax, k in zip(axes, ks):
    key = f"top-{k}"
    handles = []
    for i, (name, row) in enumerate(rows.items()):
      vals = [row["per_network"][g][key] for g in nets]
      vals += [row["mean"][key], row["pooled"][key]]
      vals = [np.nan if v is None else v for v in vals]
      handles.append(ax.bar(x + (i - (len(rows) - 1) / 2) * width, vals, width, label=name))
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("network (tasks with programs / its tasks)", fontsize=8)
    ax.set_ylabel(f"{key}: best latency / best of the top {k}", fontsize=8)
    ax.set_title(f"{key} ({report['hardware']}, {report['split']}; oracle = 1)", fontsize=9)
  for ax in axes[len(ks) + 1 :]:
    ax.axis("off")
  legend = axes[len(ks) + 1]
  dropped = [k for k in report["ks"] if k not in ks]
  note = (
    f"\n(top-{', '.join(map(str, dropped))}: 1.0 for every ranking, not drawn)" if dropped else ""
  )
  if handles:
    legend.legend(handles, list(rows), loc="center", fontsize=9, title=f"ranking{note}")
  else:
    legend.text(0.5, 0.5, f"no informative k{note}", ha="center", va="center", fontsize=9)
  sc = report["scatter"]
  ax = axes[len(ks)]
  ax.scatter(sc["pred"], sc["score"], s=3, alpha=0.4)
  ax.set_xlabel("predicted score")
  ax.set_ylabel("measured score (min_cost / cost)")
  ax.set_title(
    f"{report['model']['name']}: {len(sc['pred'])} of {sc['total']} programs", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110, format="png")
  plt.close(fig)


def default_out_dir(out: str | None, workdir: str | None, model_path: str | None) -> str:
  """Where ``eval.py`` writes: ``out``, else ``WORKDIR/eval``, else the model file's folder."""
  if out:
    return out
  if workdir:
    return os.path.join(workdir, "eval")
  return os.path.dirname(os.path.abspath(model_path))


def write_report(report: Mapping[str, Any], out_dir: str) -> dict[str, str]:
  """Writes ``report.json``, ``report.md`` and ``report.png`` under ``out_dir``; returns paths.

  All three are rendered first and then swapped in together (:mod:`tlp_jax.core.atomic_file`):
  a report that cannot be written (e.g. a non-finite number in it) leaves the previous files
  of ``out_dir`` as they were.

  Raises:
    ValueError: the report holds a non-finite number (not valid JSON).
  """
  stem = f"eval_{report['hardware']}_{report['split']}"
  paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
  text = json.dumps(report, indent=1, allow_nan=False)  # raises before any file is touched
  markdown = format_report(report)
  png = io.BytesIO()
  plot_report(report, png)
  atomic_file.replace_all(
    {
      paths["json"]: (lambda f: f.write(text), False),
      paths["md"]: (lambda f: f.write(markdown), False),
      paths["png"]: (lambda f: f.write(png.getvalue()), True),
    }
  )
  return paths
