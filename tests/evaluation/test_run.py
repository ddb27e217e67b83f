"""Tests of tlp_jax.evaluation.run and eval.py, end to end on the embedded sample.

The sample is built once per session (tests/conftest.py); models are exported .npz files or a
short training run's workdir.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from data_pipelines import schema
from tlp_jax.core import features, metrics
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import predictor as npred
from tlp_jax.evaluation import run, topk
from tlp_jax.evaluation.data import EvalError, eval_data
from tlp_jax.train import export, loop
from tlp_jax.train.model import TLPConfig, init_params

from . import toy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOLDOUT_FILES = (
  "(resnet_50,[(1,224)]).json",
  "(bert_base,[(1,128)]).json",
  "(mobilenet,[(1,240)]).json",
)


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
  networks = [
    metrics.NetworkTasks(
      n["network"],
      [index[t["workload_key"]] for t in n["tasks"]],
      [t["weight"] for t in n["tasks"]],
    )
    for n in nets
  ]
  return np.array(lat), np.array(task), networks, len(keys)


@pytest.fixture(scope="module")
def two_head_model(tmp_path_factory, sample_arrays):
  """A randomly initialised 2-head (MTL) model exported to .npz, with the dataset's features."""
  arrays = sample_arrays("all")
  cfg = TLPConfig(
    num_hardware_heads=2,
    encoder_dims=(16, 32),
    attention_heads=4,
    decoder_dims=(16, 8, 1),
    seq_len=arrays.crop[0],
    feature_dim=arrays.crop[1],
  )
  path = str(tmp_path_factory.mktemp("model") / "mtl.npz")
  export.save_npz(
    path,
    init_params(cfg, jax.random.PRNGKey(0)),
    cfg,
    hardware=arrays.hardware,
    platform=arrays.platform,
    crop=arrays.crop,
    vocab_json=arrays.vocab_json,
    step=0,
  )
  return path


@pytest.mark.parametrize("hw", ["epyc-9004", "xeon-emr-16c"])
def test_end_to_end_on_sample(
  built_sample_dataset, sample_tenset_dir, sample_arrays, two_head_model, hw
):
  report = run.evaluate_model(
    hw=hw, data_dir=built_sample_dataset, model_path=two_head_model, batch_size=300
  )
  # Default config for --hw is the per-hardware one.
  assert report["model"]["dataset"] == hw and report["model"]["heads"] == [
    "epyc-9004",
    "xeon-emr-16c",
  ]
  rows = report["rows"]
  assert list(rows) == ["mtl", topk.RANDOM_ROW, topk.ORACLE_ROW]
  assert rows[topk.ORACLE_ROW]["pooled"] == {f"top-{k}": 1.0 for k in (1, 5, 10, 20)}
  # The random row equals the exact expectation computed from the raw records, which checks the
  # whole data path (valid records, min costs, task indices, weights, skipped tasks).
  lat, task, nets, num_tasks = _raw_holdout_latencies(sample_tenset_dir, hw)
  assert report["num_programs"] == lat.size
  want = metrics.random_top_k_scores(lat, task, nets, num_tasks=num_tasks)
  got = rows[topk.RANDOM_ROW]
  np.testing.assert_allclose(
    [got["pooled"][f"top-{k}"] for k in (1, 5, 10, 20)], want.pooled, rtol=1e-5
  )
  np.testing.assert_allclose(
    [got["mean"][f"top-{k}"] for k in (1, 5, 10, 20)], want.mean, rtol=1e-5
  )
  for net, skipped in zip(want.networks, want.tasks_skipped):
    (label,) = [k for k in got["per_network"] if k.startswith(net + " ")]
    assert got["per_network"][label]["tasks_skipped"] == skipped
  # The model row is the predictor's head for hw on the split's valid programs.
  arrays = sample_arrays(hw)
  valid = arrays.test.mask[:, 0]
  pred = npred.Predictor.load(two_head_model).predict(arrays.test.features[valid], hw=hw)
  data = eval_data(arrays, hw, "test")
  want_model = metrics.top_k_scores(
    pred, data.latency, data.task_index, data.networks, num_tasks=len(data.task_keys)
  )
  np.testing.assert_allclose(
    [rows["mtl"]["pooled"][f"top-{k}"] for k in (1, 5, 10, 20)], want_model.pooled, rtol=1e-6
  )
  for v in rows["mtl"]["pooled"].values():
    assert 0.0 < v <= 1.0


def test_model_without_the_head_says_so(built_sample_dataset, sample_arrays, tmp_path):
  arrays = sample_arrays("epyc-9004")
  cfg = TLPConfig(encoder_dims=(8, 16), attention_heads=2, decoder_dims=(8, 1))
  path = str(tmp_path / "one.npz")
  export.save_npz(
    path,
    init_params(cfg, jax.random.PRNGKey(1)),
    cfg,
    hardware=["epyc-9004"],
    platform=arrays.platform,
    crop=arrays.crop,
    vocab_json=arrays.vocab_json,
    step=0,
  )
  with pytest.raises(
    EvalError,
    match=r"'xeon-emr-16c' is not in the model's heads.*"
    r"available: epyc-9004",
  ):
    run.evaluate_model(hw="xeon-emr-16c", data_dir=built_sample_dataset, model_path=path)


def _eval_cli(*args, unset=()):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for name in unset:
    env.pop(name, None)
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "eval.py"), *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_writes_report_and_rejects_unknown_hardware(
  built_sample_dataset, two_head_model, tmp_path
):
  out = tmp_path / "out"
  ok = _eval_cli(
    "--hw",
    "xeon-emr-16c",
    "--data_dir",
    built_sample_dataset,
    "--dataset",
    "all",
    "--model",
    two_head_model,
    "--out",
    str(out),
  )
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "| random (exact expectation) | **pooled (TLP)** |" in ok.stdout
  with open(out / "eval_xeon-emr-16c_test.json") as f:
    report = json.load(f)
  assert report["model"]["dataset"] == "all" and report["hardware"] == "xeon-emr-16c"
  assert (out / "eval_xeon-emr-16c_test.png").stat().st_size > 10_000
  bad = _eval_cli(
    "--hw",
    "graviton2",
    "--data_dir",
    built_sample_dataset,
    "--model",
    two_head_model,
    "--out",
    str(out),
  )
  assert bad.returncode != 0
  assert "'graviton2'" in bad.stderr and "available: epyc-9004, xeon-emr-16c" in bad.stderr


def test_workdir_is_evaluated_through_the_exported_predictor(
  built_sample_dataset, sample_arrays, tmp_path
):
  config = importlib.import_module("configs.test").get_config()
  config.data_dir = built_sample_dataset
  config.dataset = "epyc-9004"
  config.hardware = ("epyc-9004",)
  config.num_epochs = 1
  config.checkpoint_every_steps = 0  # one checkpoint, at the end of the epoch
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(
    config, workdir, dataset=sample_arrays("epyc-9004"), devices=jax.devices()[:1]
  )
  from_workdir = run.evaluate_model(
    hw="epyc-9004", data_dir=built_sample_dataset, workdir=workdir, which="latest"
  )
  npz = str(tmp_path / "model.npz")
  export.export_workdir(workdir, npz, which="latest")
  from_file = run.evaluate_model(hw="epyc-9004", data_dir=built_sample_dataset, model_path=npz)
  assert from_workdir["model"]["workdir"] == os.path.abspath(workdir)
  assert from_workdir["rows"][run.WORKDIR_ROW] == from_file["rows"]["model"]
  with pytest.raises(EvalError, match="not a training workdir"):
    run.evaluate_model(hw="epyc-9004", data_dir=built_sample_dataset, workdir=str(tmp_path))
  # The CLI on a workdir starts JAX (the in-memory export). Without JAX_PLATFORMS (the tests'
  # "cpu") JAX probes for a TPU and logs "Unable to initialize backend 'tpu'" at INFO: normal,
  # not news, silenced as in train.py.
  cli = _eval_cli(
    "--hw",
    "epyc-9004",
    "--data_dir",
    built_sample_dataset,
    "--workdir",
    workdir,
    "--checkpoint",
    "latest",
    unset=("JAX_PLATFORMS",),
  )
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert "Unable to initialize backend" not in cli.stderr, cli.stderr[-3000:]


def test_resolve_config_prefers_the_per_hardware_config(built_sample_dataset):
  assert run.built_hardware(built_sample_dataset) == {
    "all": ("epyc-9004", "xeon-emr-16c"),
    "epyc-9004": ("epyc-9004",),
    "xeon-emr-16c": ("xeon-emr-16c",),
  }
  assert run.resolve_config(built_sample_dataset, "xeon-emr-16c") == "xeon-emr-16c"
  assert run.resolve_config(built_sample_dataset, "xeon-emr-16c", "all") == "all"
  with pytest.raises(EvalError, match=r"'graviton2'.*available: epyc-9004, xeon-emr-16c"):
    run.resolve_config(built_sample_dataset, "graviton2")


def test_resolve_config_falls_back_to_a_joined_config(built_sample_dataset, tmp_path):
  # Only the joined config is built: --hw finds it there.
  root = tmp_path / "data"
  src = os.path.join(built_sample_dataset, schema.BUILDER_NAME, "all")
  shutil.copytree(src, root / schema.BUILDER_NAME / "all")
  assert run.resolve_config(str(root), "epyc-9004") == "all"
  with pytest.raises(EvalError, match="none"):
    run.resolve_config(str(tmp_path / "empty"), "epyc-9004")


def test_load_predictor_wants_exactly_one_existing_source(two_head_model, tmp_path):
  for kwargs in ({}, {"model_path": two_head_model, "workdir": str(tmp_path)}):
    with pytest.raises(EvalError, match="exactly one"):
      run.load_predictor(**kwargs)
  with pytest.raises(EvalError, match="no such model file"):
    run.load_predictor(str(tmp_path / "missing.npz"))
  predictor, info = run.load_predictor(two_head_model)
  assert info == {
    "model_file": two_head_model,
    "heads": ["epyc-9004", "xeon-emr-16c"],
    "step": 0,
    "vocab_version": predictor.vocab_version,
  }


def test_a_loop_token_model_is_evaluated_on_assembled_batches(tmp_path):
  """predictor_fn of a model of loop tokens takes (steps, tokens); the dataset must match."""
  step_crop, layout = (
    (2, 3),
    {"layout_version": lt.LAYOUT_VERSION, "max_tokens": 4, "width": lt.WIDTH},
  )
  crop = npred.input_shape(step_crop, (4, lt.WIDTH))
  cfg = TLPConfig(
    encoder_dims=(8, 8),
    attention_heads=2,
    decoder_dims=(8, 1),
    seq_len=crop[0],
    feature_dim=crop[1],
    num_hardware_heads=2,
  )
  path = str(tmp_path / "tok.npz")
  export.save_npz(
    path,
    init_params(cfg, jax.random.PRNGKey(0)),
    cfg,
    hardware=["a", "b"],
    platform="llvm",
    crop=crop,
    vocab_json=features.Vocabulary.original("llvm").to_json(),
    step=0,
    loop_tokens=layout,
  )
  pred = npred.Predictor.load(path)
  arrays = toy.toy_arrays()
  tokens = np.random.default_rng(0).uniform(0, 4, (9, 4, lt.WIDTH)).astype(np.float16)
  arrays.test = types.SimpleNamespace(**vars(arrays.test), loop_tokens=tokens)
  arrays.platform, arrays.crop, arrays.vocab_json = "llvm", step_crop, pred.vocab_json
  arrays.metadata = {"loop_tokens": layout}
  predict = run.predictor_fn(pred, "b", arrays)
  data = eval_data(arrays, "b")
  report = topk.topk_report(data, predict, model_name="tok", batch_size=3, loop_tokens=True)
  got = topk.predict_in_batches(
    predict, data.split_features, data.rows, 3, loop_tokens=data.split_loop_tokens
  )
  want = pred.predict(data.features, hw="b", loop_tokens=data.loop_tokens, batch_size=3)
  np.testing.assert_array_equal(got, want)
  threaded = topk.predict_in_batches(
    predict, data.split_features, data.rows, 3, loop_tokens=data.split_loop_tokens, workers=3
  )
  np.testing.assert_array_equal(threaded, want)  # batches in threads: the very same scores
  assert report["num_programs"] == 8
  arrays.metadata = {}
  with pytest.raises(EvalError, match="reads loop tokens; dataset"):
    run.predictor_fn(pred, "b", arrays)
  arrays.metadata = {"loop_tokens": {**layout, "max_tokens": 3}}
  with pytest.raises(EvalError, match=f"the dataset has 3 of layout {lt.LAYOUT_VERSION}"):
    run.predictor_fn(pred, "b", arrays)
  arrays.crop = (25, 22)
  with pytest.raises(EvalError, match=r"cropped to \(2, 3\)"):
    run.predictor_fn(pred, "b", arrays)


@pytest.mark.parametrize(
  "args, message",
  [
    (["--ks", "a,b"], "eval.py: error: --ks must be positive integers like 1,5,10,20, got 'a,b'"),
    (["--ks", "0"], "eval.py: error: --ks must be positive integers like 1,5,10,20, got '0'"),
    (["--ks=-1,5"], "eval.py: error: --ks must be positive integers like 1,5,10,20, got '-1,5'"),
    (["--batch_size", "0"], "eval.py: error: --batch_size must be >= 1, got 0"),
  ],
)
def test_cli_bad_flags_are_one_line(built_sample_dataset, two_head_model, tmp_path, args, message):
  res = _eval_cli(
    "--hw", "epyc-9004", "--data_dir", built_sample_dataset, "--model", two_head_model,
    "--out", str(tmp_path), *args,
  )  # fmt: skip
  assert res.returncode != 0
  assert res.stderr.strip().splitlines()[-1] == message
  assert "Traceback" not in res.stderr
  assert os.listdir(tmp_path) == []


def test_cli_a_broken_model_keeps_the_previous_report(
  built_sample_dataset, two_head_model, tmp_path
):
  """A truncated model, then one predicting NaN: one line each, the good report stays whole."""
  out = tmp_path / "out"
  common = ["--hw", "epyc-9004", "--data_dir", built_sample_dataset, "--out", str(out)]
  assert _eval_cli(*common, "--model", two_head_model).returncode == 0
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  assert len(before) == 3
  truncated = tmp_path / "trunc.npz"
  data = open(two_head_model, "rb").read()
  truncated.write_bytes(data[: len(data) // 2])
  arrays = dict(np.load(two_head_model, allow_pickle=False))
  # Finite weights whose activations overflow float32: NaN/inf scores.
  key = npred.PARAMS_PREFIX + "encoder_0/kernel"
  arrays[key] = arrays[key] * np.float32(1e36)
  overflow = tmp_path / "overflow.npz"
  np.savez(overflow, **arrays)
  for model, message in (
    (truncated, f"eval.py: error: {truncated}: not a readable .npz model export"),
    (overflow, f"eval.py: error: model 'overflow' ({overflow}) predicted 846 non-finite"),
  ):
    res = _eval_cli(*common, "--model", str(model))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(message)
    assert "RuntimeWarning" not in res.stderr  # the one error line says it all
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_evaluate_model_checks_ks_and_batch_size(built_sample_dataset, two_head_model):
  for kwargs, match in (
    (dict(ks=[0, 5]), "ks must be positive"),
    (dict(batch_size=-1), "batch_size"),
  ):
    with pytest.raises(EvalError, match=match):
      run.evaluate_model(
        hw="epyc-9004", data_dir=built_sample_dataset, model_path=two_head_model, **kwargs
      )
  assert run.parse_ks("1, 5,10") == [1, 5, 10]
  assert run.parse_ks(["20"]) == [20]
  for bad in ("", "1,x", "5,-2"):
    with pytest.raises(EvalError, match="--ks must be positive integers"):
      run.parse_ks(bad)
