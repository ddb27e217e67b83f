"""Tests of the tune command (tlp_jax/tvm/tune.py) on a tiny network with a few trials."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.tvm.test_cost_model import _tiny_step_model
from tlp_jax.tvm import collect, tune

HAS_TVM = importlib.util.find_spec("tvm") is not None
needs_tvm = pytest.mark.skipif(not HAS_TVM, reason="TVM not installed (pip install -e '.[tvm]')")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp_path, model, **kw):
  base = dict(
    network=collect.NetworkSpec("mlp", 1, 8),
    out_dir=str(tmp_path / "out"),
    n_trials=2,
    cost_model="tlp",
    load_model=model,
    update="online",
    num_measures_per_round=2,
    population=16,
    num_tasks=1,
    runner_repeat=1,
    e2e_repeat=2,
    progress=False,
  )
  base.update(kw)
  return tune.TuneConfig(**base)


@needs_tvm
def test_tune_writes_the_log_curve_plot_and_end_to_end_latency_and_resumes(tmp_path):
  cfg = _config(tmp_path, _tiny_step_model(tmp_path))
  report = tune.run(cfg)
  out = tmp_path / "out"
  with open(out / "records.json") as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 2 == report["trials"]
  assert {r["i"][0][0] for r in records} == {report["tasks"][0]["workload_key"]}
  assert len(report["tasks"]) == 1 and report["network_tasks_total"] == 4
  (point,) = report["curve"]
  assert point["trials"] == 2 and point["elapsed_s"] > 0
  valid = [r for r in records if r["r"][1] == 0]
  if valid:  # the estimated latency is the best measured one (weight 1 for this task)
    best = min(sum(r["r"][0]) / len(r["r"][0]) for r in valid) * 1e3
    assert point["estimated_latency_ms"] == pytest.approx(best * report["tasks"][0]["weight"])
    assert point["best_ms_per_task"] == [pytest.approx(best)]
    assert point["estimated_latency_measured_ms"] == point["estimated_latency_ms"]
  else:
    assert point["estimated_latency_ms"] is None
    assert point["best_ms_per_task"] == [None] and point["estimated_latency_measured_ms"] == 0
  e2e = report["end_to_end"]
  assert (
    e2e["status"] == "measured" and e2e["latency_ms_mean"] > 0 and len(e2e["latency_ms_all"]) == 2
  )
  assert "only 1 of 4 tasks" in e2e["note"]
  timing = report["tlp_timing"]
  assert (
    timing["update_calls"] >= 1 and timing["update_errors"] == 0 and timing["predict_calls"] > 0
  )
  assert os.path.getsize(out / "tune.png") > 1000
  with open(out / "tune.json") as f:
    assert json.load(f)["status"] == "done"
  # The same command again resumes: the log already holds the trials, nothing is re-measured.
  again = tune.run(dataclasses_replace(cfg, e2e_repeat=0))
  assert again["resumed_from_trials"] == 2 and again["curve"] == report["curve"]
  # Other settings into the same --out would mix two runs' curves: refused, before any work.
  with pytest.raises(tune.TuneError, match=r"other settings \(seed: 0 -> 1\)"):
    tune.run(dataclasses_replace(cfg, seed=1))
  with open(out / "records.json") as f:
    assert len(f.readlines()) == 2


def dataclasses_replace(cfg, **kw):
  import dataclasses

  return dataclasses.replace(cfg, **kw)


def _cli(*args, env=None):
  return subprocess.run(
    [sys.executable, "-m", "tlp_jax.tvm.tune", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO, **(env or {})),
    check=False,
  )


@pytest.mark.parametrize(
  "kw, message",
  [
    (
      dict(network=collect.NetworkSpec("alexnet", 1, 8)),
      "unknown network 'alexnet'; available: dcgan",
    ),
    (dict(load_model=None), "--cost_model tlp needs --load_model"),
    (dict(layout="NHWC", cost_model="xgb", load_model=None, update="none"), "built NCHW"),
    (dict(cost_model="xgb", load_model=None), "options of --cost_model tlp"),
    (dict(update="always"), "unknown --update 'always'"),
    (dict(n_trials=0), "--n_trials must be >= 1"),
  ],
)
def test_bad_flags_are_tune_errors(kw, message, tmp_path):
  with pytest.raises(tune.TuneError, match=message.replace("(", r"\(")):
    tune.check_config(_config(tmp_path, "m.npz", **kw))


def test_a_user_error_prints_one_line_and_exits_2(tmp_path):
  proc = _cli("--network", "alexnet", "--out", str(tmp_path / "o"))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and lines == [
    f"error: unknown network 'alexnet'; available: {', '.join(sorted(collect.NETWORKS))}"
  ], proc.stderr


@needs_tvm
def test_a_bad_model_fails_before_tuning_in_one_line(tmp_path):
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  for spec, message in (
    (str(bad), "not a readable .npz"),
    ("pretrained:nope", "unknown pretrained"),
  ):
    proc = _cli(
      "--network", "mlp", "--size", "8", "--out", str(tmp_path / "o"), "--load_model", spec
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
  assert not (tmp_path / "o" / "records.json").exists()


@needs_tvm
def test_a_head_the_model_lacks_fails_before_task_extraction(tmp_path, monkeypatch):
  model = _tiny_step_model(tmp_path)  # one head, "hw"
  extracted = []
  monkeypatch.setattr(collect, "extract_network_tasks", lambda *a, **k: extracted.append(a))
  with pytest.raises(tune.TuneError, match="no head for hardware 'xeon-emr-16c'"):
    tune.run(_config(tmp_path, model, hardware="xeon-emr-16c"))
  assert extracted == []


@needs_tvm
def test_the_random_model_reaches_ansor_as_its_own_type():
  """Ansor's C++ treats a RandomModel node specially (TVM's random baseline); a Python wrapper
  would turn it into a full evolutionary search on random scores."""
  from tvm import auto_scheduler

  cfg = tune.TuneConfig(
    network=collect.NetworkSpec("mlp", 1, 8), out_dir="unused", n_trials=2, cost_model="random"
  )
  model = tune.make_cost_model(cfg, num_tasks=1, per_round=2)
  assert isinstance(model.tvm_model, auto_scheduler.RandomModel)
  assert model.predict_calls == [] and model.update_calls == []
