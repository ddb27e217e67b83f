"""Tests of the Ansor-XGBoost baseline (tlp_jax/tvm/xgb_baseline.py)."""

import importlib.util
import os
import types

import numpy as np
import pytest

from tlp_jax.core import network_info
from tlp_jax.tvm import collect, xgb_baseline

HAS_TVM = (
  importlib.util.find_spec("tvm") is not None and importlib.util.find_spec("xgboost") is not None
)
needs_tvm = pytest.mark.skipif(
  not HAS_TVM, reason="TVM/xgboost not installed (pip install -e '.[tvm]')"
)


def test_align_predictions_by_program_key():
  saved = {
    "workload_keys": np.array(["a", "a", "b"]),
    "program_keys": np.array([1, 2, 1], dtype=np.uint64),
    "pred": np.array([0.5, 0.7, 0.9]),
  }
  out = xgb_baseline.align_predictions(
    saved, ["b", "a", "a", "c"], np.array([1, 2, 1, 1], dtype=np.uint64)
  )
  np.testing.assert_array_equal(out[:3], [0.9, 0.7, 0.5])
  assert np.isnan(out[3])


def _fake_arrays(scores, task_index, mask, keys):
  split = types.SimpleNamespace(
    scores=np.asarray(scores, np.float32)[:, None],
    task_index=np.asarray(task_index, np.int32),
    mask=np.asarray(mask, bool)[:, None],
  )
  return types.SimpleNamespace(
    hardware=("hw",), test=split, tasks=types.SimpleNamespace(workload_keys=tuple(keys))
  )


def test_align_to_split_matches_by_score_within_task():
  # Task "a": latencies 1, 2, 4 -> scores 1, .5, .25; task "b": 3, 3 (a tie) -> 1, 1.
  saved = {
    "workload_keys": np.array(["a", "a", "a", "b", "b"]),
    "latency": np.array([2.0, 1.0, 4.0, 3.0, 3.0]),
    "pred": np.array([20.0, 10.0, 40.0, 30.0, 31.0]),
  }
  arrays = _fake_arrays(
    scores=[0.25, 1.0, 0.0, 1.0, 0.5, 1.0],
    task_index=[0, 1, 0, 0, 0, 1],
    mask=[1, 1, 0, 1, 1, 1],
    keys=["a", "b"],
  )
  out = xgb_baseline.align_to_split(saved, arrays, "hw")
  assert np.isnan(out[2])  # not valid on this hardware
  np.testing.assert_array_equal(out[[0, 3, 4]], [40.0, 10.0, 20.0])
  assert sorted(out[[1, 5]].tolist()) == [30.0, 31.0]


def test_align_to_split_rejects_other_records():
  saved = {
    "workload_keys": np.array(["a", "a"]),
    "latency": np.array([1.0, 3.0]),
    "pred": np.array([1.0, 2.0]),
  }
  arrays = _fake_arrays(scores=[1.0, 0.5], task_index=[0, 0], mask=[1, 1], keys=["a"])
  with pytest.raises(ValueError, match="not the same records"):
    xgb_baseline.align_to_split(saved, arrays, "hw")


@needs_tvm
def test_xgb_baseline_end_to_end_on_freshly_collected_records(tmp_path):
  """Collect a tiny TenSet dir (two mlp sizes), hold one out, train XGBModel, score top-k."""
  out = str(tmp_path / "tenset")
  specs = (collect.NetworkSpec.parse("mlp:1:28"), collect.NetworkSpec.parse("mlp:1:20"))
  cfg = collect.CollectConfig(
    out_dir=out,
    networks=specs,
    hardware="testhw",
    target="llvm",
    programs_per_task=3,
    seed=5,
    build_n_parallel=2,
  )
  summary = collect.collect(cfg, progress=False)
  assert summary["measured_programs"] > 0

  config = xgb_baseline.XGBBaselineConfig(
    holdout=("mlp@20",), num_warmup_sample=0, train_on_failed=True, ks=(1, 2, 20)
  )
  report = xgb_baseline.run(
    out, ["testhw"], config, out_dir=str(tmp_path), repeats=1, progress=False
  )
  entry = report["testhw"]
  info = entry["info"]
  assert info["train_records"] > 0 and info["test_programs"] > 0
  assert info["read"]["malformed"] == {}
  assert info["read"]["lines"] == info["read"]["kept"] + sum(info["read"]["failed"].values())
  pooled = entry["runs"][0]["xgb"]["pooled"]
  assert 0.0 < pooled["top-1"] <= pooled["top-2"] <= 1.0
  assert pooled["top-20"] == pytest.approx(1.0)  # <= 3 programs per task: top-20 sees all
  with np.load(entry["predictions_npz"], allow_pickle=False) as z:
    assert z["pred"].shape == z["latency"].shape == (info["test_programs"],)
    assert np.all(np.isfinite(z["latency"])) and np.all(z["latency"] > 0)
    # Every hold-out prediction belongs to a workload of the held-out network.
    held = network_info.read_network_info(
      os.path.join(out, "network_info", "(mlp,[(1,20)]).json")
    ).workload_keys
    assert set(z["workload_keys"].tolist()) <= held


def _predictions(pred):
  return xgb_baseline.HardwarePredictions(
    hardware="hw",
    task_keys=("a", "b"),
    task_index=np.array([0, 1, 1]),
    program_keys=np.array([1, 2, 3], np.uint64),
    line_numbers=np.array([1, 2, 3]),
    latency=np.array([1.0, 2.0, 3.0]),
    pred=np.asarray(pred, np.float64),
    networks=(),
    info={},
  )


def test_predictions_npz_is_replaced_atomically(tmp_path, monkeypatch):
  path = str(tmp_path / "xgb_predictions_hw.npz")
  _predictions([0.1, 0.2, 0.3]).save_npz(path)
  before = open(path, "rb").read()
  real_savez = np.savez

  def disk_full(target, **arrays):  # writes part of the archive, then fails
    if isinstance(target, str):
      target = open(target, "wb")
    target.write(b"PK\x03\x04 partial")
    raise OSError("No space left on device")

  monkeypatch.setattr(np, "savez", disk_full)
  with pytest.raises(OSError, match="No space left"):
    _predictions([0.4, 0.5, 0.6]).save_npz(path)
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == ["xgb_predictions_hw.npz"]
  monkeypatch.setattr(np, "savez", real_savez)
  _predictions([0.4, 0.5, 0.6]).save_npz(path)
  with np.load(path, allow_pickle=False) as z:
    np.testing.assert_array_equal(z["pred"], [0.4, 0.5, 0.6])
    assert list(z["workload_keys"]) == ["a", "b", "b"]


def test_summary_is_replaced_atomically(tmp_path):
  path = str(tmp_path / "sub" / "summary.json")
  xgb_baseline.write_summary(path, {"hardware": {"hw": {"top-1": 0.5}}})
  before = open(path).read()
  with pytest.raises(TypeError):
    xgb_baseline.write_summary(path, {"hardware": {"hw": {"top-1": object()}}})
  assert open(path).read() == before
  assert os.listdir(tmp_path / "sub") == ["summary.json"]
