"""Tests of eval_lib / eval.py: report on hand-made arrays, errors, and end-to-end on the sample."""

import json
import os
import types

import numpy as np
import pytest

from tlp_jax.evaluation import eval_lib
from tlp_jax.core import metrics


def _toy_arrays():
  """Two hardware, three tasks, a test split of 9 programs (one invalid on hw 'b')."""
  # Same programs as test_metrics: task 0 latency [1, 2, 4], task 1 [3, 6], task 2 [5,10,20,8].
  task = np.array([0, 1, 2, 0, 2, 1, 0, 2, 2], np.int32)
  lat = np.array([1., 3., 5., 2., 10., 6., 4., 20., 8.])
  min_cost = np.array([[1., 2.], [3., 1.], [5., 1.]])
  scores = np.stack([min_cost[task, 0] / lat, np.linspace(1, 0.2, 9)], 1).astype(np.float32)
  mask = np.ones((9, 2), bool)
  mask[4, 1] = False
  # Feature 0 carries the "prediction" a trivial predictor reads back.
  pred = np.array([0.1, 0.2, 0.3, 0.9, 0.1, 0.8, 0.5, 0.9, 0.2], np.float32)
  features = np.zeros((9, 2, 3), np.float32)
  features[:, 0, 0] = pred
  test = types.SimpleNamespace(features=features, scores=scores, mask=mask, task_index=task)
  empty = types.SimpleNamespace(features=np.zeros((0, 2, 3), np.float32),
                                scores=np.zeros((0, 2), np.float32), mask=np.zeros((0, 2), bool),
                                task_index=np.zeros(0, np.int32))
  nets = [types.SimpleNamespace(label="A", task_indices=np.array([0, 1]), weights=np.array([2, 1])),
          types.SimpleNamespace(label="B", task_indices=np.array([1, 2]), weights=np.array([3, 1]))]
  tasks = types.SimpleNamespace(workload_keys=["w0", "w1", "w2"], min_cost=min_cost)
  return types.SimpleNamespace(train=empty, validation=empty, test=test, hardware=("a", "b"),
                               tasks=tasks, networks=nets)


def _read_feature0(x):
  return x[:, 0, 0]


def test_report_matches_hand_values_with_random_oracle_and_extra_rows(tmp_path):
  arrays = _toy_arrays()
  data = eval_lib.select_split(arrays, "a", "test")
  extra = np.arange(9, dtype=np.float64)  # ranks later programs first
  report = eval_lib.evaluate(data, _read_feature0, model_name="toy", ks=(1, 2),
                             extra_predictions={"xgb": extra}, batch_size=4)
  rows = report["rows"]
  assert list(rows) == ["toy", "xgb", eval_lib.RANDOM_ROW, eval_lib.ORACLE_ROW]
  # Hand values (tests/test_metrics.py): A 5/10, 5/7; B 14/38, 1; pooled 19/48, 19/21.
  assert rows["toy"]["per_network"]["A"]["top-1"] == pytest.approx(0.5)
  assert rows["toy"]["per_network"]["B"]["top-2"] == pytest.approx(1.0)
  assert rows["toy"]["pooled"]["top-1"] == pytest.approx(19 / 48)
  assert rows["toy"]["mean"]["top-2"] == pytest.approx((5 / 7 + 1) / 2)
  # Extra row: task 0 -> program 6 (lat 4) then 3 (lat 2); task 1 -> 5 (6), 1 (3);
  # task 2 -> 8 (8), 7 (20). A top-1 = 5 / (2*4 + 6); B top-1 = 14 / (3*6 + 8).
  assert rows["xgb"]["per_network"]["A"]["top-1"] == pytest.approx(5 / 14)
  assert rows["xgb"]["per_network"]["B"]["top-1"] == pytest.approx(14 / 26)
  # Random: task 0 E[best_1] = 7/3, task 1 = 4.5 -> A = 5 / (2*7/3 + 4.5).
  assert rows[eval_lib.RANDOM_ROW]["per_network"]["A"]["top-1"] == pytest.approx(5 / (14 / 3 + 4.5))
  for agg in ("mean", "pooled"):
    assert rows[eval_lib.ORACLE_ROW][agg] == {"top-1": 1.0, "top-2": 1.0}
  assert report["num_programs"] == 9 and report["scatter"]["total"] == 9
  paths = eval_lib.write_report(report, str(tmp_path))
  with open(paths["json"]) as f:
    assert json.load(f)["rows"]["toy"]["pooled"]["top-2"] == pytest.approx(19 / 21)
  assert os.path.getsize(paths["png"]) > 10_000
  text = eval_lib.format_report(report)
  assert "| toy | **pooled (TLP)** | 0.396 | 0.905 |" in text
  # Top-1 picks: task 0 latency 2 (best 1), task 1 6 (3), task 2 20 (5); occurrences over both
  # networks 2, 1 + 3, 1. Excess W * (pick - best) = 2, 12, 15 of 29; best sum 19, pick sum 48.
  costly = report["costliest_tasks"]
  assert [t["task"] for t in costly] == [2, 1, 0]
  assert [t["pick_ratio"] for t in costly] == pytest.approx([4.0, 2.0, 2.0])
  assert [t["excess_share"] for t in costly] == pytest.approx([15 / 29, 12 / 29, 2 / 29])
  assert [t["pooled_top1_if_fixed"] for t in costly] == pytest.approx([19 / 33, 19 / 36, 19 / 46])
  assert costly[1]["networks"] == ["A", "B"] and costly[1]["weight"] == 4
  assert costly[0]["best_latency_share"] == pytest.approx(5 / 19)
  assert "| 2 w2 | B | 1 | 0.263 | 4.00x | 0.517 | 0.576 |" in text
  assert eval_lib.RANDOM_ROW in text and "oracle" in text


def test_invalid_programs_of_the_hardware_are_dropped():
  data = eval_lib.select_split(_toy_arrays(), "b", "test")
  assert data.rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 8] and data.num_split_programs == 9
  # Latency is recovered from hw b's own min_cost and score, as TLP does.
  np.testing.assert_allclose(data.latency[0], 2.0 / 1.0)
  report = eval_lib.evaluate(data, _read_feature0, ks=(1,))
  assert report["num_programs"] == 8


def test_unknown_hardware_lists_available():
  with pytest.raises(eval_lib.EvalError, match=r"'graviton2'.*available: a, b"):
    eval_lib.select_split(_toy_arrays(), "graviton2")


def test_extra_predictions_must_align_with_split():
  data = eval_lib.select_split(_toy_arrays(), "a")
  with pytest.raises(eval_lib.EvalError, match="9 programs"):
    eval_lib.evaluate(data, _read_feature0, extra_predictions={"bad": np.zeros(8)})


def test_predict_in_batches_checks_output_length():
  with pytest.raises(ValueError, match="returned 1 values"):
    eval_lib.predict_in_batches(lambda x: np.zeros(1), np.zeros((5, 2, 3)), batch_size=2)
  x = _toy_arrays().test.features
  got = eval_lib.predict_in_batches(_read_feature0, x, batch_size=2)
  np.testing.assert_allclose(got, x[:, 0, 0])
  rows = np.array([8, 0, 3, 4, 5])
  got = eval_lib.predict_in_batches(_read_feature0, x, rows, batch_size=2)
  np.testing.assert_allclose(got, x[rows, 0, 0])


def test_metrics_and_eval_agree_on_random_ranking():
  # evaluate()'s random row is metrics.random_top_k_scores on the same programs.
  data = eval_lib.select_split(_toy_arrays(), "a")
  r = metrics.random_top_k_scores(data.latency, data.task_index, data.networks, (1, 5))
  report = eval_lib.evaluate(data, _read_feature0, ks=(1, 5))
  assert report["rows"][eval_lib.RANDOM_ROW]["pooled"]["top-5"] == pytest.approx(r.pooled[1])


# ---- end to end on the embedded sample (built dataset + exported NumPy model) ----------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDOUT_FILES = ("(resnet_50,[(1,224)]).json", "(bert_base,[(1,128)]).json",
                 "(mobilenet,[(1,240)]).json")


def _raw_holdout_latencies(tenset_dir, hw):
  """Straight from the measure-record JSON lines, independent of the dataset pipeline."""
  nets = []
  for name in HOLDOUT_FILES:
    with open(os.path.join(tenset_dir, "network_info", name)) as f:
      nets.append(json.load(f))
  keys = sorted({t["workload_key"] for n in nets for t in n["tasks"]})
  index = {k: i for i, k in enumerate(keys)}
  lat, task = [], []
  folder = os.path.join(tenset_dir, "measure_records", hw)
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name)) as f:
      for line in f:
        rec = json.loads(line)
        key = rec["i"][0][0]
        if key in index and rec["r"][1] == 0:
          lat.append(np.mean(rec["r"][0]))
          task.append(index[key])
  networks = [metrics.NetworkTasks(n["network"], [index[t["workload_key"]] for t in n["tasks"]],
                                   [t["weight"] for t in n["tasks"]]) for n in nets]
  return np.array(lat), np.array(task), networks, len(keys)


@pytest.fixture(scope="module")
def two_head_model(tmp_path_factory, sample_arrays):
  """A randomly initialised 2-head (MTL) model exported to .npz, with the dataset's features."""
  import jax  # pylint: disable=g-import-not-at-top
  from tlp_jax.train import export  # pylint: disable=g-import-not-at-top
  from tlp_jax.train.model import TLPConfig, init_params    # pylint: disable=g-import-not-at-top
  arrays = sample_arrays("all")
  cfg = TLPConfig(num_hardware_heads=2, encoder_dims=(16, 32), attention_heads=4, decoder_dims=(16, 8, 1),
                  seq_len=arrays.crop[0], feature_dim=arrays.crop[1])
  path = str(tmp_path_factory.mktemp("model") / "mtl.npz")
  export.save_npz(path, init_params(cfg, jax.random.PRNGKey(0)), cfg,
                  hardware=arrays.hardware, platform=arrays.platform, crop=arrays.crop,
                  vocab_json=arrays.vocab_json, step=0)
  return path


@pytest.mark.parametrize("hw", ["epyc-9004", "xeon-emr-16c"])
def test_end_to_end_on_sample(built_sample_dataset, sample_tenset_dir, sample_arrays,
                              two_head_model, hw):
  from tlp_jax.core import predictor as npred  # pylint: disable=g-import-not-at-top
  report = eval_lib.run(hw=hw, data_dir=built_sample_dataset, model_path=two_head_model,
                        batch_size=300)
  # Default config for --hw is the per-hardware one.
  assert report["model"]["dataset"] == hw and report["model"]["heads"] == ["epyc-9004",
                                                                          "xeon-emr-16c"]
  rows = report["rows"]
  assert list(rows) == ["mtl", eval_lib.RANDOM_ROW, eval_lib.ORACLE_ROW]
  assert rows[eval_lib.ORACLE_ROW]["pooled"] == {f"top-{k}": 1.0 for k in (1, 5, 10, 20)}
  # The random row equals the exact expectation computed from the raw records, which checks the
  # whole data path (valid records, min costs, task indices, weights, skipped tasks).
  lat, task, nets, num_tasks = _raw_holdout_latencies(sample_tenset_dir, hw)
  assert report["num_programs"] == lat.size
  want = metrics.random_top_k_scores(lat, task, nets, num_tasks=num_tasks)
  got = rows[eval_lib.RANDOM_ROW]
  np.testing.assert_allclose([got["pooled"][f"top-{k}"] for k in (1, 5, 10, 20)], want.pooled,
                             rtol=1e-5)
  np.testing.assert_allclose([got["mean"][f"top-{k}"] for k in (1, 5, 10, 20)], want.mean,
                             rtol=1e-5)
  for net, skipped in zip(want.networks, want.tasks_skipped):
    (label,) = [k for k in got["per_network"] if k.startswith(net + " ")]
    assert got["per_network"][label]["tasks_skipped"] == skipped
  # The model row is the predictor's head for hw on the split's valid programs.
  arrays = sample_arrays(hw)
  valid = arrays.test.mask[:, 0]
  pred = npred.Predictor.load(two_head_model).predict(arrays.test.features[valid], hw=hw)
  data = eval_lib.select_split(arrays, hw, "test")
  want_model = metrics.top_k_scores(pred, data.latency, data.task_index, data.networks,
                                    num_tasks=len(data.task_keys))
  np.testing.assert_allclose([rows["mtl"]["pooled"][f"top-{k}"] for k in (1, 5, 10, 20)],
                             want_model.pooled, rtol=1e-6)
  for v in rows["mtl"]["pooled"].values():
    assert 0.0 < v <= 1.0


def test_model_without_the_head_says_so(built_sample_dataset, sample_arrays, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from tlp_jax.train import export  # pylint: disable=g-import-not-at-top
  from tlp_jax.train.model import TLPConfig, init_params    # pylint: disable=g-import-not-at-top
  arrays = sample_arrays("epyc-9004")
  cfg = TLPConfig(encoder_dims=(8, 16), attention_heads=2, decoder_dims=(8, 1))
  path = str(tmp_path / "one.npz")
  export.save_npz(path, init_params(cfg, jax.random.PRNGKey(1)), cfg, hardware=["epyc-9004"],
                  platform=arrays.platform, crop=arrays.crop, vocab_json=arrays.vocab_json,
                  step=0)
  with pytest.raises(eval_lib.EvalError, match=r"'xeon-emr-16c' is not in the model's heads.*"
                     r"available: epyc-9004"):
    eval_lib.run(hw="xeon-emr-16c", data_dir=built_sample_dataset, model_path=path)


def _eval_cli(*args):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_cli_writes_report_and_rejects_unknown_hardware(built_sample_dataset, two_head_model,
                                                        tmp_path):
  out = tmp_path / "out"
  ok = _eval_cli("--hw", "xeon-emr-16c", "--data_dir", built_sample_dataset, "--dataset", "all",
                 "--model", two_head_model, "--out", str(out))
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "| random (exact expectation) | **pooled (TLP)** |" in ok.stdout
  with open(out / "eval_xeon-emr-16c_test.json") as f:
    report = json.load(f)
  assert report["model"]["dataset"] == "all" and report["hardware"] == "xeon-emr-16c"
  assert (out / "eval_xeon-emr-16c_test.png").stat().st_size > 10_000
  bad = _eval_cli("--hw", "graviton2", "--data_dir", built_sample_dataset, "--model",
                  two_head_model, "--out", str(out))
  assert bad.returncode != 0
  assert "'graviton2'" in bad.stderr and "available: epyc-9004, xeon-emr-16c" in bad.stderr


def test_workdir_is_evaluated_through_the_exported_predictor(built_sample_dataset, sample_arrays,
                                                             tmp_path):
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from tlp_jax.train import export  # pylint: disable=g-import-not-at-top
  from tlp_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = importlib.import_module("configs.test").get_config()
  config.data_dir = built_sample_dataset
  config.dataset = "epyc-9004"
  config.hardware = ("epyc-9004",)
  config.num_epochs = 1
  config.checkpoint_every_steps = 0  # one checkpoint, at the end of the epoch
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"),
                          devices=jax.devices()[:1])
  from_workdir = eval_lib.run(hw="epyc-9004", data_dir=built_sample_dataset, workdir=workdir,
                              which="latest")
  npz = str(tmp_path / "model.npz")
  export.export_workdir(workdir, npz, which="latest")
  from_file = eval_lib.run(hw="epyc-9004", data_dir=built_sample_dataset, model_path=npz)
  assert from_workdir["model"]["workdir"] == os.path.abspath(workdir)
  assert from_workdir["rows"]["TLP (workdir)"] == from_file["rows"]["model"]
  with pytest.raises(eval_lib.EvalError, match="not a training workdir"):
    eval_lib.run(hw="epyc-9004", data_dir=built_sample_dataset, workdir=str(tmp_path))
