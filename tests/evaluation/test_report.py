"""Tests of tlp_jax.evaluation.report: Markdown, JSON and PNG of a top-k report."""

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
