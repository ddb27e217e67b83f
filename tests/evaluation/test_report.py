"""Tests of tlp_jax.evaluation.report: Markdown, JSON and PNG of a top-k report."""

import io
import json
import os

import pytest

from tlp_jax.evaluation import report as report_lib
from tlp_jax.evaluation import topk
from tlp_jax.evaluation.data import eval_data

from . import toy


@pytest.fixture
def toy_report():
  return topk.topk_report(
    eval_data(toy.toy_arrays(), "a"), toy.read_feature0, model_name="toy", ks=(1, 2), batch_size=4
  )


def test_markdown_has_every_row_and_the_costliest_tasks(toy_report):
  text = report_lib.format_report(toy_report)
  assert text.startswith(
    "hardware a, split test: 9 programs with a valid measurement (of 9), 3 tasks\n"
  )
  assert "| ranking | network | top-1 | top-2 | tasks used/skipped |" in text
  assert "| toy | A | 0.500 | 0.714 | 2/0 |" in text
  assert "| toy | **pooled (TLP)** | 0.396 | 0.905 | |" in text
  assert f"| {topk.RANDOM_ROW} | **mean (TenSet)** |" in text
  # Only ranked rows have the unweighted all-task mean.
  assert "| toy | **all tasks, unweighted** |" in text
  assert f"| {topk.RANDOM_ROW} | **all tasks, unweighted** |" not in text
  assert "Tasks costing toy the most pooled top-1" in text
  assert "| 2 w2 | B | 1 | 0.263 | 4.00x | 0.517 | 0.576 |" in text


def test_write_report_writes_json_markdown_and_png(toy_report, tmp_path):
  paths = report_lib.write_report(toy_report, str(tmp_path / "out"))
  assert paths == {
    ext: str(tmp_path / "out" / f"eval_a_test.{ext}") for ext in ("json", "md", "png")
  }
  with open(paths["json"]) as f:
    back = json.load(f)
  assert back == json.loads(json.dumps(toy_report))
  assert back["rows"]["toy"]["pooled"]["top-2"] == pytest.approx(19 / 21)
  with open(paths["md"]) as f:
    assert f.read() == report_lib.format_report(toy_report)
  assert os.path.getsize(paths["png"]) > 10_000


def test_default_out_dir():
  assert report_lib.default_out_dir("o", "w", None) == "o"
  assert report_lib.default_out_dir(None, "w", None) == os.path.join("w", "eval")
  assert report_lib.default_out_dir(None, None, "/m/x.npz") == "/m"


def _listing(path):
  return sorted(os.listdir(path))


def test_a_report_that_cannot_be_written_leaves_the_previous_one(toy_report, tmp_path):
  out = str(tmp_path / "out")
  paths = report_lib.write_report(toy_report, out)
  before = {p: open(p, "rb").read() for p in paths.values()}
  bad = json.loads(json.dumps(toy_report))
  bad["scatter"]["pred"][0] = float("nan")  # not valid JSON
  with pytest.raises(ValueError, match="not JSON compliant"):
    report_lib.write_report(bad, out)
  assert {p: open(p, "rb").read() for p in paths.values()} == before
  assert _listing(out) == sorted(os.path.basename(p) for p in paths.values())  # no leftovers


def test_a_failing_plot_replaces_none_of_the_files(toy_report, tmp_path, monkeypatch):
  out = str(tmp_path / "out")
  paths = report_lib.write_report(toy_report, out)
  before = {p: open(p, "rb").read() for p in paths.values()}
  newer = dict(toy_report, split="test")
  newer["num_programs"] = 8

  def broken_plot(report, path):
    raise RuntimeError("matplotlib died")

  monkeypatch.setattr(report_lib, "plot_report", broken_plot)
  with pytest.raises(RuntimeError, match="matplotlib died"):
    report_lib.write_report(newer, out)
  assert {p: open(p, "rb").read() for p in paths.values()} == before
  assert len(_listing(out)) == 3


def test_reports_get_the_umask_mode(toy_report, tmp_path):
  old = os.umask(0o027)
  try:
    paths = report_lib.write_report(toy_report, str(tmp_path / "out"))
  finally:
    os.umask(old)
  assert {os.stat(p).st_mode & 0o777 for p in paths.values()} == {0o640}


def test_markdown_names_the_model_and_partial_network_coverage():
  arrays = toy.toy_arrays()
  arrays.networks[0].missing_workload_keys = ("w7", "w8")  # network A: 2 of its 4 tasks recorded
  report = topk.topk_report(
    eval_data(arrays, "a"),
    toy.read_feature0,
    model_name="toy",
    ks=(1, 2),
    batch_size=4,
    model_info={"model_file": "/models/toy.npz", "step": 84, "heads": ["a", "b"]},
  )
  text = report_lib.format_report(report)
  assert "Model: toy (model file /models/toy.npz, step 84, heads a, b)\n" in text
  assert (
    "Partial coverage (tasks without programs in the split are skipped): A covers 2 of 4 " in text
  )
  assert "B covers" not in text  # B has all its tasks
  workdir = dict(report, model={"name": "TLP (workdir)", "workdir": "/w", "checkpoint": "best"})
  assert "Model: TLP (workdir) (workdir /w, checkpoint best)\n" in report_lib.format_report(workdir)


def _drawn_figure(report, monkeypatch):
  """The matplotlib figure plot_report draws (captured when it is closed)."""
  import matplotlib.pyplot as plt

  figures = []
  real_close = plt.close
  monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or real_close(fig))
  report_lib.plot_report(report, io.BytesIO())
  (fig,) = figures
  return fig


def test_plot_leaves_out_the_oracle_and_ks_that_cannot_differ(monkeypatch):
  report = topk.topk_report(
    eval_data(toy.toy_arrays(), "a"), toy.read_feature0, model_name="toy", ks=(1, 2, 4, 10)
  )
  assert report["max_task_programs"] == 4  # task 2 has 4 programs: top-4 and top-10 are all 1.0
  assert report_lib.informative_ks(report) == [1, 2]
  fig = _drawn_figure(report, monkeypatch)
  titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
  assert [t.split(" ")[0] for t in titles] == ["top-1", "top-2", "toy:"]
  legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
  assert [t.get_text() for t in legend.get_texts()] == ["toy", topk.RANDOM_ROW]
  assert "top-4, 10: 1.0 for every ranking" in legend.get_title().get_text()
  top1 = fig.axes[0]
  assert top1.get_ylabel().startswith("top-1: best latency") and top1.get_xlabel()
  ticks = [t.get_text() for t in top1.get_xticklabels()]
  assert ticks == ["A\n2/2 tasks", "B\n2/2 tasks", "mean (TenSet)", "pooled (TLP)"]
