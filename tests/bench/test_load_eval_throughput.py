"""bench/load_eval_throughput.py on the built sample: 1 and 2 workers, the same outputs."""

import json
import shutil
import sys

from bench import load_eval_throughput
from tlp_jax.core import pretrained


def test_one_and_two_workers_give_the_same_arrays_and_scores(
  built_sample_dataset, tmp_path, monkeypatch
):
  data_dir = tmp_path / "data"
  shutil.copytree(built_sample_dataset, data_dir)  # the bench remakes the array cache
  out = tmp_path / "out.json"
  with pretrained.as_path("epyc-9004") as model:
    argv = ["x", "--data_dir", str(data_dir), "--dataset", "epyc-9004", "--model", str(model)]
    argv += ["--workers", "1,2", "--batch_size", "128", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    load_eval_throughput.main()
  results = json.loads(out.read_text())["results"]
  assert [r["workers"] for r in results] == [1, 2]
  assert all(r["same_arrays_as_1"] and r["same_scores_as_1"] for r in results)
  assert results[0]["predicted"] > 128 and results[0]["examples"] > results[0]["predicted"]
