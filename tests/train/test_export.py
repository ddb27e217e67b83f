"""Export round trip, NumPy-predictor parity with the Flax model, errors, NumPy-only import."""

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test as test_config
from tests.pyproc import run_python
from tlp_jax.core import features, loop_tokens
from tlp_jax.core import predictor as npred
from tlp_jax.train import export
from tlp_jax.train import model as model_lib
from tlp_jax.train.model import TLPConfig, TLPModel

# Jitted: eager op-by-op initialisation of the full-size model is slow on 2 cores.
init_params = jax.jit(model_lib.init_params, static_argnums=0)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "data", "sample", "tenset-mini", "measure_records", "epyc-9004")
VOCAB_JSON = features.Vocabulary.original("llvm").to_json()
SMALL = dict(encoder_dims=(16, 32), attention_heads=4, decoder_dims=(16, 8, 1))


def _export(cfg, seed=0, hardware=None):
  params = init_params(cfg, jax.random.PRNGKey(seed))
  hardware = hardware or [f"hw{i}" for i in range(cfg.num_hardware_heads)]
  arrays = export.export_params(
    params, cfg, hardware=hardware, platform="llvm", crop=None, vocab_json=VOCAB_JSON, step=7
  )
  return params, arrays


def _flax(cfg, params, x):
  return np.asarray(jax.jit(lambda a: TLPModel(cfg).apply({"params": params}, a))(x))


def _random_features(n, cfg, seed=0, scale=5.0):
  """Random programs with ragged lengths, zero rows mid-sequence and repeated rows."""
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(n, cfg.seq_len, cfg.feature_dim)) * scale).astype(np.float32)
  lengths = rng.integers(0, cfg.seq_len + 1, size=n)
  x[np.arange(cfg.seq_len)[None, :] >= lengths[:, None]] = 0.0
  x[::7, 1] = 0.0  # a zero row between real rows
  x[::5, 2] = x[::5, 0]  # a repeated row inside a program
  x[1::3, 3] = x[0, 0]  # the same row in many programs
  return x


def _sample_steps(max_files=6):
  steps = []
  for path in sorted(glob.glob(os.path.join(SAMPLE, "*.json")))[:max_files]:
    with open(path) as f:
      steps += [json.loads(line)["i"][1][1] for line in f if line.strip()]
  return steps


@pytest.fixture(scope="module")
def real_features():
  steps = _sample_steps()
  assert len(steps) > 100
  return features.Featurizer("llvm").featurize_many(steps)


OPTIONS = [dict(), dict(input_norm="log1p")]


@pytest.mark.parametrize("num_heads", [1, 3])
@pytest.mark.parametrize(
  "opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "original"
)
def test_parity_random_inputs(num_heads, opts):
  cfg = TLPConfig(num_hardware_heads=num_heads, **SMALL, **opts)
  params, arrays = _export(cfg, seed=num_heads)
  pred = npred.Predictor.from_arrays(arrays)
  x = _random_features(200, cfg)
  ref = _flax(cfg, params, x)
  got = pred.predict(x, hw="all", batch_size=64)
  assert got.shape == (200, num_heads) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("opts", OPTIONS)
def test_parity_real_inputs_original_dims(real_features, opts):
  cfg = TLPConfig(num_hardware_heads=2, **opts)
  params, arrays = _export(cfg, seed=3)
  pred = npred.Predictor.from_arrays(arrays)
  ref = _flax(cfg, params, real_features)
  got = pred.predict(real_features, hw="all")
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
  assert np.abs(ref).max() > 1e-2  # not a trivially-zero comparison


@pytest.mark.parametrize("opts", OPTIONS)
def test_ensemble_parity_and_format_version(tmp_path, opts):
  cfg = TLPConfig(num_hardware_heads=2, ensemble_size=3, **SMALL, **opts)
  params, arrays = _export(cfg, seed=5)
  assert int(arrays[npred.META_FORMAT_VERSION]) == npred.FORMAT_VERSION
  assert arrays["params/members/encoder_0/kernel"].shape[0] == 3
  path = str(tmp_path / "ens.npz")
  np.savez(path, **arrays)
  pred = npred.Predictor.load(path)
  assert pred.ensemble_size == 3
  x = _random_features(150, cfg, seed=2)
  ref = _flax(cfg, params, x)
  np.testing.assert_allclose(pred.predict(x, hw="all", batch_size=32), ref, rtol=0, atol=1e-5)
  np.testing.assert_allclose(pred.predict(x, hw="hw1"), ref[:, 1], rtol=0, atol=1e-5)
  # An ensemble claiming an older format, or missing its member axis, is refused.
  old = dict(arrays)
  old[npred.META_FORMAT_VERSION] = np.array(1, np.int64)
  with pytest.raises(npred.PredictorError, match="ensemble_size 3 needs format_version"):
    npred.Predictor.from_arrays(old)
  flat = dict(arrays)
  flat["params/members/encoder_0/kernel"] = arrays["params/members/encoder_0/kernel"][0]
  with pytest.raises(npred.PredictorError, match="members/encoder_0/kernel has shape"):
    npred.Predictor.from_arrays(flat)


def _as_format_1(arrays, **removed_options):
  """``arrays`` as a format-1 export wrote them (before commit 4fe3f70's options were removed)."""
  cfg = json.loads(str(arrays[npred.META_MODEL_CONFIG]))
  cfg["num_heads"] = cfg.pop("num_hardware_heads")
  cfg.update({"padding_mask": False, "pool": "sum", "input_norm_columns": None}, **removed_options)
  old = dict(arrays)
  old[npred.META_MODEL_CONFIG] = np.array(json.dumps(cfg, sort_keys=True))
  old[npred.META_FORMAT_VERSION] = np.array(1, np.int64)
  return old


def test_exports_of_earlier_formats_predict_the_same():
  cfg = TLPConfig(num_hardware_heads=2, input_norm="log1p", **SMALL)
  _, arrays = _export(cfg)
  x = _random_features(40, cfg)
  want = npred.Predictor.from_arrays(arrays).predict(x, hw="all")
  old = npred.Predictor.from_arrays(_as_format_1(arrays))
  assert old.format_version == 1
  np.testing.assert_array_equal(old.predict(x, hw="all"), want)
  assert TLPConfig.from_dict(old.config) == cfg


@pytest.mark.parametrize(
  "removed", [dict(padding_mask=True), dict(pool="mean_valid"), dict(input_norm_columns=[0, 1])]
)
def test_an_export_using_a_removed_option_is_refused(removed):
  _, arrays = _export(TLPConfig(**SMALL))
  name = next(iter(removed))
  with pytest.raises(npred.PredictorError, match=f"{name}=.* was removed .*4fe3f70"):
    npred.Predictor.from_arrays(_as_format_1(arrays, **removed))


def test_an_export_of_the_removed_store_version_is_refused():
  """The TVM store version's exports (format 2, or its meta keys in any later format) describe
  an input this predictor cannot build: refused, naming the commits that still serve them."""
  _, arrays = _export(TLPConfig(**SMALL))
  format_2 = dict(arrays, **{npred.META_FORMAT_VERSION: np.array(2, np.int64)})
  with pytest.raises(
    npred.PredictorError, match=r"TVM store feature version \(format_version 2.*commit 4fe3f70"
  ):
    npred.Predictor.from_arrays(format_2)
  # Meta keys this predictor does not know (as the store version's) are refused by name.
  extra = dict(arrays, **{"meta/extra_tokens": np.array(10, np.int64)})
  with pytest.raises(npred.PredictorError, match=r"\['meta/extra_tokens'\].*5c84946"):
    npred.Predictor.from_arrays(extra)


def test_head_selection():
  cfg = TLPConfig(num_hardware_heads=3, **SMALL)
  params, arrays = _export(cfg, hardware=["epyc", "xeon", "gpu"])
  pred = npred.Predictor.from_arrays(arrays)
  x = _random_features(20, cfg)
  ref = _flax(cfg, params, x)
  np.testing.assert_allclose(pred.predict(x), ref[:, 0], atol=1e-5)
  np.testing.assert_allclose(pred.predict(x, hw="xeon"), ref[:, 1], atol=1e-5)
  assert pred.predict(x, hw="gpu").shape == (20,)
  assert pred.predict(x, hw="all").shape == (20, 3)
  assert pred.hardware == ("epyc", "xeon", "gpu")
  with pytest.raises(npred.PredictorError, match="epyc, xeon, gpu"):
    pred.predict(x, hw="a100")


def test_batch_size_does_not_change_results():
  cfg = TLPConfig(**SMALL)
  _, arrays = _export(cfg)
  pred = npred.Predictor.from_arrays(arrays)
  x = _random_features(101, cfg)
  np.testing.assert_allclose(
    pred.predict(x, batch_size=7), pred.predict(x, batch_size=1000), atol=1e-6
  )


def test_round_trip_npz(tmp_path):
  cfg = TLPConfig(num_hardware_heads=2, **SMALL)
  params = init_params(cfg, jax.random.PRNGKey(0))
  path = str(tmp_path / "sub" / "model.npz")
  arrays = export.save_npz(
    path,
    params,
    cfg,
    hardware=["a", "b"],
    platform="llvm",
    crop=(25, 22),
    vocab_json=VOCAB_JSON,
    step=1234,
  )
  with np.load(path, allow_pickle=False) as npz:
    loaded = {k: npz[k] for k in npz.files}
  assert set(loaded) == set(arrays)
  for k, v in arrays.items():
    np.testing.assert_array_equal(loaded[k], v)
  # Every parameter leaf is exported under its tree path.
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert len([k for k in loaded if k.startswith("params/")]) == len(leaves)
  np.testing.assert_array_equal(
    loaded["params/heads/dense_0/kernel"], np.asarray(params["heads"]["dense_0"]["kernel"])
  )
  assert loaded["params/heads/dense_0/kernel"].shape == (2, 32, 16)
  pred = npred.Predictor.load(path)
  assert pred.hardware == ("a", "b")
  assert pred.platform == "llvm"
  assert pred.crop == (25, 22)
  assert pred.step == 1234
  assert pred.format_version == npred.FORMAT_VERSION
  assert pred.vocab_json == VOCAB_JSON
  assert pred.vocab_version == str(features.VOCAB_VERSION)
  assert TLPConfig.from_dict(pred.config) == cfg
  x = _random_features(30, cfg)
  np.testing.assert_allclose(pred.predict(x, hw="all"), _flax(cfg, params, x), atol=1e-5)


def test_export_validates_inputs():
  cfg = TLPConfig(num_hardware_heads=2, **SMALL)
  params = init_params(cfg, jax.random.PRNGKey(0))
  kw = dict(platform="llvm", crop=None, vocab_json=VOCAB_JSON, step=0)
  with pytest.raises(ValueError, match="2 heads"):
    export.export_params(params, cfg, hardware=["a"], **kw)
  with pytest.raises(ValueError, match="duplicate"):
    export.export_params(params, cfg, hardware=["a", "a"], **kw)
  with pytest.raises(ValueError, match="vocabulary"):
    export.export_params(params, cfg, hardware=["a", "b"], **{**kw, "vocab_json": "{}"})
  other = dataclasses.replace(cfg, encoder_dims=(16, 64))
  with pytest.raises(npred.PredictorError, match="shape"):
    export.export_params(params, other, hardware=["a", "b"], **kw)


def test_predict_steps_matches_features_path():
  cfg = TLPConfig(num_hardware_heads=2)
  params, arrays = _export(cfg, seed=5)
  pred = npred.Predictor.from_arrays(arrays)
  steps = _sample_steps(max_files=2)
  feats = features.Featurizer("llvm").featurize_many(steps)
  got = pred.predict_steps(steps, hw="hw1")
  np.testing.assert_allclose(got, _flax(cfg, params, feats)[:, 1], atol=1e-5)
  assert pred.predict_steps([], hw="all").shape == (0, 2)


def test_predict_steps_uses_frozen_vocabulary():
  cfg = TLPConfig(**SMALL)
  _, arrays = _export(cfg)
  pred = npred.Predictor.from_arrays(arrays)
  steps = [["PR", 1, 0, "auto_unroll_max_step$999"], ["XX", 3]]
  pred.predict_steps([steps])
  fz = pred._featurizer  # pylint: disable=protected-access
  assert fz.vocab.frozen
  assert fz.stats[features.STAT_UNKNOWN_KINDS] + fz.stats[features.STAT_UNKNOWN_TOKENS] >= 1
  # The vocabulary of the export did not grow.
  assert fz.vocab.kinds == list(features.ORIGINAL_KINDS["llvm"])


def test_wrong_feature_shapes():
  cfg = TLPConfig(**SMALL)
  _, arrays = _export(cfg)
  pred = npred.Predictor.from_arrays(arrays)
  for bad in (np.zeros((4, 22)), np.zeros((4, 24, 22)), np.zeros((4, 25, 21))):
    with pytest.raises(npred.PredictorError, match=r"\(batch, >=25 steps, >=22 values\)"):
      pred.predict(bad)
  # Wider inputs are cropped, as the model does.
  x = _random_features(5, cfg)
  wide = np.concatenate([x, np.ones((5, 25, 4), np.float32)], axis=2)
  np.testing.assert_array_equal(pred.predict(wide), pred.predict(x))


def test_file_that_is_not_our_export(tmp_path):
  text = tmp_path / "notes.npz"
  text.write_text("hello")
  with pytest.raises(npred.PredictorError, match="notes.npz"):
    npred.Predictor.load(text)
  other = tmp_path / "other.npz"
  np.savez(other, weights=np.zeros(3))
  with pytest.raises(npred.PredictorError, match="not a tlp-jax model export"):
    npred.Predictor.load(other)
  pickled = tmp_path / "pickled.npz"
  np.savez(pickled, **{npred.META_FORMAT: np.array([{"x": 1}], dtype=object)})
  with pytest.raises(npred.PredictorError, match="pickled.npz"):
    npred.Predictor.load(pickled)


def test_newer_format_version_and_missing_param(tmp_path):
  cfg = TLPConfig(**SMALL)
  _, arrays = _export(cfg)
  newer = dict(arrays)
  newer[npred.META_FORMAT_VERSION] = np.array(npred.FORMAT_VERSION + 1)
  path = tmp_path / "newer.npz"
  np.savez(path, **newer)
  with pytest.raises(npred.PredictorError, match="newer"):
    npred.Predictor.load(path)
  partial = {k: v for k, v in arrays.items() if k != "params/res_block_1/kernel"}
  with pytest.raises(npred.PredictorError, match="res_block_1/kernel"):
    npred.Predictor.from_arrays(partial)


def _run_python(code, cwd, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  env.update(env_extra or {})
  return run_python(code, cwd=cwd, env=env)


def test_predictor_imports_no_jax(tmp_path):
  cfg = TLPConfig(num_hardware_heads=2, **SMALL)
  params, arrays = _export(cfg)
  path = tmp_path / "m.npz"
  np.savez(path, **arrays)
  x = _random_features(10, cfg)
  np.save(tmp_path / "x.npy", x)
  code = f"""
      import sys
      import numpy as np
      from tlp_jax.core import predictor as npred
      p = npred.Predictor.load({str(path)!r})
      y = p.predict(np.load({str(tmp_path / "x.npy")!r}), hw="all")
      p.predict_steps([[["CA", 2, 1, 3], ["FU", 1, [0, 1]]]])
      heavy = [m for m in ("jax", "flax", "tensorflow", "optax", "orbax") if m in sys.modules]
      assert not heavy, heavy
      np.save({str(tmp_path / "y.npy")!r}, y)
  """
  res = _run_python(code, cwd=REPO, env_extra={"PYTHONPATH": REPO})
  assert res.returncode == 0, res.stderr
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _flax(cfg, params, x), atol=1e-5)


def test_predictor_file_works_copied_alone(tmp_path):
  cfg = TLPConfig(**SMALL)
  _, arrays = _export(cfg)
  np.savez(tmp_path / "m.npz", **arrays)
  shutil.copy(os.path.join(REPO, "tlp_jax", "core", "predictor.py"), tmp_path / "tlp_pred.py")
  code = """
      import sys
      sys.modules["tlp_jax"] = None  # as if the package were not installed
      import numpy as np
      import tlp_pred
      p = tlp_pred.Predictor.load("m.npz")
      assert p.predict(np.ones((2, 25, 22), np.float32)).shape == (2,)
      try:
        p.predict_steps([[["CA", 2, 1, 3]]])
      except tlp_pred.PredictorError as e:
        assert "tlp_jax.core.features" in str(e), e
      else:
        raise AssertionError("predict_steps should need tlp_jax.core.features")
  """
  res = _run_python(code, cwd=str(tmp_path))
  assert res.returncode == 0, res.stderr


def test_export_workdir_exports_what_restore_for_export_reads(tmp_path, monkeypatch):
  cfg = TLPConfig(num_hardware_heads=2, **SMALL)
  params = jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.PRNGKey(1)))
  meta = {
    "hardware": ["epyc-9004", "xeon-emr-16c"],
    "platform": "llvm",
    "crop": [25, 22],
    "vocab_json": VOCAB_JSON,
    "step": 42,
    "epoch": 3,
  }
  calls = []

  def fake_restore(workdir, which):
    calls.append((workdir, which))
    return params, cfg, meta

  monkeypatch.setattr(export, "restore_for_export", fake_restore)
  out = str(tmp_path / "model.npz")
  export.export_workdir("/some/workdir", out, which="latest")
  assert calls == [("/some/workdir", "latest")]
  pred = npred.Predictor.load(out)
  assert pred.hardware == ("epyc-9004", "xeon-emr-16c") and pred.step == 42
  x = _random_features(8, cfg)
  np.testing.assert_allclose(pred.predict(x, hw="all"), _flax(cfg, params, x), atol=1e-5)


def test_export_cli_reports_a_bad_workdir(tmp_path):
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "tlp_jax.train.export",
      "--workdir",
      str(tmp_path),
      "--out",
      str(tmp_path / "m.npz"),
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert res.returncode != 0
  assert res.stderr.strip().splitlines()[-1].startswith("export: error: ")
  assert "not a training workdir" in res.stderr and "Traceback" not in res.stderr
  assert not os.path.exists(tmp_path / "m.npz")


def test_restore_for_export(trained, sample_arrays):
  workdir, result = trained
  params, model_config, meta = export.restore_for_export(workdir, "latest")
  assert model_config == result.model_config
  assert meta["hardware"] == ["epyc-9004"]
  dataset = sample_arrays("epyc-9004")
  # configs/test.py reads the sample's loop tokens (the default build has them), the first
  # config.max_loop_tokens of them.
  layout = dataset.loop_token_layout
  read = test_config.get_config().max_loop_tokens
  assert 0 < read < layout["max_tokens"]  # the default crops: the export must say so
  tokens = (read, layout["width"])
  assert (meta["platform"], tuple(meta["crop"]), meta["vocab_json"]) == (
    dataset.platform,
    npred.input_shape(dataset.crop, tokens),
    dataset.vocab_json,
  )
  assert meta["loop_tokens"]["max_tokens"] == tokens[0] and meta["skeletons_json"]
  assert meta["step"] == int(result.state.step)
  for a, b in zip(
    jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(result.state.params)
  ):
    np.testing.assert_array_equal(a, np.asarray(b))
  best_params, _, best_meta = export.restore_for_export(workdir, "best")
  assert best_meta["validation"]["val_loss/epyc-9004"] <= result.validation["val_loss/epyc-9004"]
  predict = export.make_predict_fn(model_config, batch_size=100)
  x = loop_tokens.model_input(dataset.test.features[:250], dataset.test.loop_tokens[:250])
  out = predict(best_params, x)
  assert out.shape == (250, 1) and np.isfinite(out).all()
  direct = model_lib.TLPModel(model_config).apply({"params": best_params}, x[:7])
  np.testing.assert_allclose(out[:7], np.asarray(direct), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="which must be"):
    export.restore_for_export(workdir, "final")


def test_forward_cost_counts_the_deduplicated_rows():
  cfg = TLPConfig(num_hardware_heads=1, **SMALL)
  _, arrays = _export(cfg)
  pred = npred.Predictor.from_arrays(arrays)
  rng = np.random.default_rng(0)
  a, b, c, d = rng.normal(size=(4, cfg.feature_dim)).astype(np.float32)
  x = np.zeros((2, cfg.seq_len, cfg.feature_dim), np.float32)
  x[0, :2] = a, b  # 2 real rows + 1 padding row
  x[1, :3] = a, c, d  # 3 real rows + 1 padding row; `a` and the padding row are shared
  cost = pred.forward_cost(x)
  assert (cost["programs"], cost["packed_rows"], cost["unique_rows"]) == (2, 7, 5)
  e0, e1 = cfg.encoder_dims
  dec = (e1,) + tuple(cfg.decoder_dims)
  pre = cfg.feature_dim * e0 + e0 * e1 + e1 * 3 * e1
  post = e1 * e1 * (1 + cfg.res_blocks) + sum(p * q for p, q in zip(dec[:-1], dec[1:]))
  mixing = 2 * 3 * 3 * e1 + 2 * 4 * 4 * e1
  assert cost["macs"] == 5 * pre + 7 * post + mixing and cost["flops"] == 2 * cost["macs"]


def _save_small(path, weights_dtype="float32", seed=0, scale=None):
  cfg = TLPConfig(num_hardware_heads=2, **SMALL)
  params = init_params(cfg, jax.random.PRNGKey(seed))
  if scale is not None:
    params = jax.tree_util.tree_map(lambda a: np.asarray(a) * scale, params)
  meta = dict(hardware=["a", "b"], platform="llvm", crop=None, vocab_json=VOCAB_JSON, step=5)
  return cfg, export.save_npz(str(path), params, cfg, weights_dtype=weights_dtype, **meta)


def test_save_npz_respects_the_umask_and_leaves_no_staging_file(tmp_path):
  old = os.umask(0o022)
  try:
    _save_small(tmp_path / "m.npz")
  finally:
    os.umask(old)
  assert os.stat(tmp_path / "m.npz").st_mode & 0o777 == 0o644
  assert os.listdir(tmp_path) == ["m.npz"]


def test_a_failed_save_keeps_the_previous_file(tmp_path):
  path = tmp_path / "m.npz"
  _save_small(path)
  before = path.read_bytes()
  with pytest.raises(ValueError, match="overflows float16"):
    _save_small(path, weights_dtype="float16", seed=1, scale=1e6)
  assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.npz"]


def test_float16_weights_predict_like_float32(tmp_path):
  cfg, a32 = _save_small(tmp_path / "f32.npz")
  _, a16 = _save_small(tmp_path / "f16.npz", weights_dtype="float16")
  weights = [k for k in a16 if k.startswith(npred.PARAMS_PREFIX)]
  assert weights and all(a16[k].dtype == np.float16 for k in weights)
  assert all(a16[k].dtype == a32[k].dtype for k in a16 if k not in weights)  # meta unchanged
  size16, size32 = os.path.getsize(tmp_path / "f16.npz"), os.path.getsize(tmp_path / "f32.npz")
  weight_bytes = sum(a32[k].nbytes for k in weights)
  assert size32 - size16 == pytest.approx(weight_bytes / 2, rel=0.05)
  p32 = npred.Predictor.load(tmp_path / "f32.npz")
  p16 = npred.Predictor.load(tmp_path / "f16.npz")
  assert p16.format_version == p32.format_version == npred.FORMAT_VERSION
  x = _random_features(200, cfg)
  want, got = p32.predict(x, hw="all"), p16.predict(x, hw="all")
  assert got.dtype == np.float32 and np.abs(got - want).max() > 0
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
  with pytest.raises(ValueError, match="weights_dtype must be one of"):
    export.cast_weights(a32, "bfloat16")


def _export_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "tlp_jax.train.export", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


def test_export_cli_does_not_log_the_tpu_probe(trained, tmp_path):
  # Without JAX_PLATFORMS (the tests' "cpu"), JAX probes for a TPU at start and logs
  # "Unable to initialize backend 'tpu'" at INFO: normal, not news, silenced as in train.py.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  res = subprocess.run(
    [sys.executable, "-m", "tlp_jax.train.export"]
    + ["--workdir", trained[0], "--out", str(tmp_path / "m.npz")],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert res.returncode == 0, res.stderr
  assert "Unable to initialize backend" not in res.stderr, res.stderr


def test_export_cli_float16_is_quiet(trained, tmp_path):
  workdir, _ = trained
  out16, out32 = tmp_path / "m16.npz", tmp_path / "m32.npz"
  res = _export_cli("--workdir", workdir, "--out", str(out16), "--weights_dtype", "float16")
  assert res.returncode == 0, res.stderr
  # Orbax's ~30 INFO/WARNING lines of a restore are silenced: only the summary line remains.
  lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
  assert not [ln for ln in lines if "orbax" in ln or "checkpoint" in ln.split("]")[0]], lines
  assert len(lines) <= 3, lines
  assert "float16 weights" in res.stderr
  export.export_workdir(workdir, str(out32))
  p16, p32 = npred.Predictor.load(out16), npred.Predictor.load(out32)
  assert os.path.getsize(out16) < os.path.getsize(out32)
  assert p16.step == p32.step
