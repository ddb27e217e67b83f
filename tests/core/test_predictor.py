"""Predictor.load on damaged files and Predictor.predict on bad input: one clear PredictorError
naming the file (or the offending rows), never a raw error, a huge allocation or silent NaN.

The model is built with NumPy here (tlp_jax.core has no JAX); tests/train/test_export.py checks
the predictor against the Flax model.
"""

import io
import json
import threading
import zipfile

import numpy as np
import pytest
import threadpoolctl

from tlp_jax.core import features
from tlp_jax.core import predictor as npred

CONFIG = dict(
  feature_dim=6,
  seq_len=5,
  encoder_dims=[8, 16],
  attention_heads=4,
  res_blocks=1,
  decoder_dims=[8, 1],
  num_hardware_heads=2,
  input_norm="log1p",
  ensemble_size=1,
)


def _param_shapes(cfg):
  shapes = {}
  fan_in = cfg["feature_dim"]
  for i, d in enumerate(cfg["encoder_dims"]):
    shapes[f"encoder_{i}/kernel"], shapes[f"encoder_{i}/bias"] = (fan_in, d), (d,)
    fan_in = d
  for n in ("query", "key", "value", "out"):
    shapes[f"attention/{n}/kernel"], shapes[f"attention/{n}/bias"] = (fan_in, fan_in), (fan_in,)
  for i in range(cfg["res_blocks"]):
    shapes[f"res_block_{i}/kernel"], shapes[f"res_block_{i}/bias"] = (fan_in, fan_in), (fan_in,)
  h = cfg["num_hardware_heads"]
  for i, d in enumerate(cfg["decoder_dims"]):
    shapes[f"heads/dense_{i}/kernel"], shapes[f"heads/dense_{i}/bias"] = (h, fan_in, d), (h, d)
    fan_in = d
  return shapes


def _arrays(**cfg_changes):
  """A valid export dict of a small random model (format 4, no loop tokens)."""
  cfg = {**CONFIG, **cfg_changes}
  rng = np.random.default_rng(0)
  out = {
    npred.PARAMS_PREFIX + k: (rng.standard_normal(s) * 0.3).astype(np.float32)
    for k, s in _param_shapes(CONFIG).items()
  }
  out.update(
    {
      npred.META_FORMAT: np.array(npred.FORMAT_NAME),
      npred.META_FORMAT_VERSION: np.array(4, np.int64),
      npred.META_MODEL_CONFIG: np.array(json.dumps(cfg)),
      npred.META_HARDWARE: np.array(["a", "b"]),
      npred.META_PLATFORM: np.array("llvm"),
      npred.META_CROP: np.array([CONFIG["seq_len"], CONFIG["feature_dim"]], np.int64),
      npred.META_VOCAB_JSON: np.array(features.Vocabulary.original("llvm").to_json()),
      npred.META_VOCAB_VERSION: np.array("1"),
      npred.META_STEP: np.array(3, np.int64),
    }
  )
  return out


def _save(tmp_path, arrays, name="model.npz"):
  path = tmp_path / name
  np.savez(path, **arrays)
  return path


def _features(n=7, seed=1):
  x = np.random.default_rng(seed).standard_normal((n, CONFIG["seq_len"], CONFIG["feature_dim"]))
  x[:, 3:] = 0  # padding steps
  return x.astype(np.float32)


def test_a_valid_export_loads_and_predicts(tmp_path):
  pred = npred.Predictor.load(_save(tmp_path, _arrays()))
  out = pred.predict(_features(), hw="all")
  assert out.shape == (7, 2) and np.isfinite(out).all()
  np.testing.assert_allclose(pred.predict(_features(), batch_size=2), out[:, 0], rtol=1e-6)


def test_a_truncated_npz_is_a_predictor_error(tmp_path):
  path = tmp_path / "model.npz"
  np.savez(path, a=np.arange(10_000, dtype=np.float32), b=np.ones((100, 100), np.float32))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(npred.PredictorError, match="model.npz: not a readable .npz"):
    npred.Predictor.load(path)


def test_a_file_that_is_no_zip_is_a_predictor_error(tmp_path):
  path = tmp_path / "model.npz"
  path.write_bytes(b"PK\x03\x04 not really a zip archive")
  with pytest.raises(npred.PredictorError, match="model.npz"):
    npred.Predictor.load(path)


def test_a_format_version_that_is_no_integer_is_a_predictor_error(tmp_path):
  arrays = _arrays()
  arrays[npred.META_FORMAT_VERSION] = np.array("abc")
  with pytest.raises(npred.PredictorError, match=r"model.npz: meta/format_version must be an int"):
    npred.Predictor.load(_save(tmp_path, arrays))
  arrays[npred.META_FORMAT_VERSION] = np.array(0, np.int64)
  with pytest.raises(npred.PredictorError, match="must be >= 1"):
    npred.Predictor.load(_save(tmp_path, arrays))


@pytest.mark.parametrize(
  "key, value, match",
  [
    (npred.META_CROP, np.array(["x", "y"]), "meta/crop must be an integer vector"),
    (npred.META_CROP, np.array([5, 6, 7], np.int64), "meta/crop must be 2 positive sizes"),
    (npred.META_HARDWARE, np.array("a"), "meta/hardware must be a string vector"),
    (npred.META_STEP, np.array(1.5), "meta/step must be an integer scalar"),
    (npred.META_MODEL_CONFIG, np.array("[1, 2]"), "meta/model_config is not a JSON object"),
  ],
)
def test_meta_of_the_wrong_type_is_a_predictor_error(tmp_path, key, value, match):
  arrays = _arrays()
  arrays[key] = value
  with pytest.raises(npred.PredictorError, match=f"model.npz: {match}"):
    npred.Predictor.load(_save(tmp_path, arrays))


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(attention_heads=0), "attention_heads must be positive, got 0"),
    (dict(attention_heads=3), "divisible by attention_heads 3"),
    (dict(encoder_dims=[]), "encoder_dims must be positive"),
    (dict(decoder_dims=[8, 2]), "decoder_dims ending in 1"),
    (dict(attention_heads="many"), "bad meta/model_config"),
  ],
)
def test_an_impossible_model_config_is_a_predictor_error(tmp_path, change, match):
  with pytest.raises(npred.PredictorError, match=f"model.npz: .*{match}"):
    npred.Predictor.load(_save(tmp_path, _arrays(**change)))


def _write_npz_with_header(path, arrays, key, header, payload):
  """An .npz whose member ``key`` has the given .npy header and data bytes."""
  with zipfile.ZipFile(path, "w") as z:
    for k, a in arrays.items():
      buf = io.BytesIO()
      if k == key:
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(payload)
      else:
        np.lib.format.write_array(buf, a, allow_pickle=False)
      z.writestr(k + ".npy", buf.getvalue())


def test_a_small_file_declaring_a_huge_array_is_refused_before_allocating(tmp_path):
  # 1 MB of data under a header declaring 2^34 float32 (64 GiB).
  path = tmp_path / "model.npz"
  key = npred.PARAMS_PREFIX + "encoder_0/kernel"
  header = {"descr": "<f4", "fortran_order": False, "shape": (2**34,)}
  _write_npz_with_header(path, _arrays(), key, header, b"\0" * (1 << 20))
  with pytest.raises(
    npred.PredictorError, match=r"model.npz: member .*declares .*\(17179869184,\)"
  ):
    npred.Predictor.load(path)


def test_a_huge_meta_string_is_refused_before_allocating(tmp_path):
  path = tmp_path / "model.npz"
  header = {"descr": "<U1000000", "fortran_order": False, "shape": (1000,)}  # 4 GB of text
  _write_npz_with_header(path, _arrays(), npred.META_VOCAB_JSON, header, b"{}")
  with pytest.raises(npred.PredictorError, match="model.npz: member 'meta/vocab_json' declares"):
    npred.Predictor.load(path)


def test_a_weight_of_the_wrong_shape_is_refused_from_its_header(tmp_path, monkeypatch):
  arrays = _arrays()
  key = npred.PARAMS_PREFIX + "encoder_1/kernel"
  arrays[key] = np.zeros((8, 17), np.float32)
  path = _save(tmp_path, arrays)
  read = []
  real = np.lib.format.read_array
  monkeypatch.setattr(
    np.lib.format, "read_array", lambda f, **kw: read.append(f.name) or real(f, **kw)
  )
  with pytest.raises(
    npred.PredictorError, match=r"model.npz: parameter .*encoder_1/kernel has shape \(8, 17\)"
  ):
    npred.Predictor.load(path)
  assert key + ".npy" not in read  # refused from the header: its data was never read


def test_a_forged_zip_directory_is_refused(tmp_path):
  path = _save(tmp_path, _arrays())
  data = bytearray(path.read_bytes())
  # Make every central-directory entry of a stored member claim 2^31 bytes (sizes at +20/+24).
  pos = data.find(b"PK\x01\x02")
  while pos >= 0:
    data[pos + 20 : pos + 28] = (2**31).to_bytes(4, "little") * 2
    pos = data.find(b"PK\x01\x02", pos + 4)
  path.write_bytes(bytes(data))
  with pytest.raises(npred.PredictorError, match="model.npz"):
    npred.Predictor.load(path)


@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.complex64])
def test_weights_of_a_wrong_dtype_are_a_predictor_error(tmp_path, dtype):
  arrays = _arrays()
  key = npred.PARAMS_PREFIX + "encoder_0/kernel"
  arrays[key] = arrays[key].astype(dtype)
  with pytest.raises(
    npred.PredictorError, match=f"model.npz: parameter {key} is {np.dtype(dtype)}"
  ):
    npred.Predictor.load(_save(tmp_path, arrays))


def test_object_arrays_are_never_unpickled(tmp_path):
  arrays = _arrays()
  arrays[npred.META_PLATFORM] = np.array([{"x": 1}], dtype=object)
  path = tmp_path / "model.npz"
  np.savez(path, **arrays)  # pickles the object array into the file
  with pytest.raises(npred.PredictorError, match="model.npz: member 'meta/platform' holds Python"):
    npred.Predictor.load(path)


def test_non_finite_or_unused_weights_are_a_predictor_error(tmp_path):
  arrays = _arrays()
  arrays[npred.PARAMS_PREFIX + "res_block_0/bias"][3] = np.nan
  with pytest.raises(npred.PredictorError, match="res_block_0/bias has 1 non-finite"):
    npred.Predictor.load(_save(tmp_path, arrays))
  arrays = _arrays()
  arrays[npred.PARAMS_PREFIX + "res_block_1/bias"] = np.zeros(16, np.float32)
  with pytest.raises(npred.PredictorError, match="model config does not describe.*res_block_1"):
    npred.Predictor.load(_save(tmp_path, arrays))


@pytest.mark.parametrize(
  "missing", [npred.META_PLATFORM, npred.PARAMS_PREFIX + "heads/dense_1/bias"]
)
def test_missing_keys_are_a_predictor_error(tmp_path, missing):
  arrays = _arrays()
  del arrays[missing]
  with pytest.raises(npred.PredictorError, match=f"model.npz: .*{missing}"):
    npred.Predictor.load(_save(tmp_path, arrays))


def test_float16_weights_are_upcast(tmp_path):
  arrays = _arrays()
  half = {
    k: v.astype(np.float16) if k.startswith(npred.PARAMS_PREFIX) else v for k, v in arrays.items()
  }
  p32 = npred.Predictor.load(_save(tmp_path, arrays, "f32.npz"))
  p16 = npred.Predictor.load(_save(tmp_path, half, "f16.npz"))
  x = _features()
  want = p32.predict(x, hw="all")
  got = p16.predict(x, hw="all")
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
  assert np.abs(got - want).max() > 0  # the weights really were rounded


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_predict_refuses_a_bad_batch_size(batch_size):
  pred = npred.Predictor.from_arrays(_arrays())
  with pytest.raises(npred.PredictorError, match="batch_size must be"):
    pred.predict(_features(), batch_size=batch_size)
  with pytest.raises(npred.PredictorError, match="batch_size must be"):
    pred.embed(_features(), batch_size=batch_size)  # the same checks: one implementation


def test_predict_names_the_rows_of_non_finite_features():
  pred = npred.Predictor.from_arrays(_arrays())
  x = _features()
  x[2, 0, 1] = np.nan
  x[5, 1, 0] = np.inf
  with pytest.raises(
    npred.PredictorError, match=r"features of 2 programs hold NaN or inf .*rows 2, 5\)"
  ):
    pred.predict(x)
  # A NaN in the cropped-away part of a row is not an input of the model.
  wide = np.concatenate([_features(), np.full((7, CONFIG["seq_len"], 2), np.nan, np.float32)], 2)
  np.testing.assert_array_equal(pred.predict(wide), pred.predict(_features()))


def test_a_compressed_export_loads_the_same(tmp_path):
  arrays = _arrays()
  np.savez_compressed(tmp_path / "small.npz", **arrays)
  got = npred.Predictor.load(tmp_path / "small.npz").predict(_features(), hw="all")
  want = npred.Predictor.load(_save(tmp_path, arrays)).predict(_features(), hw="all")
  np.testing.assert_array_equal(got, want)


def test_threads_give_the_same_scores_for_every_thread_count():
  pred = npred.Predictor.from_arrays(_arrays())
  # Programs of different lengths (several attention groups per chunk), some rows repeated.
  x = np.random.default_rng(5).standard_normal((23, 5, 6)).astype(np.float32)
  x[::3, 4:] = 0
  x[::4, 2:] = 0
  x[1::5, 1] = x[0, 0]
  one = pred.predict(x, hw="all", batch_size=4, threads=1)
  for threads in (2, 3, 8):
    np.testing.assert_array_equal(pred.predict(x, hw="all", batch_size=4, threads=threads), one)
  # The same function as the plain path, up to the BLAS's summation order.
  np.testing.assert_allclose(one, pred.predict(x, hw="all", batch_size=4), rtol=1e-5, atol=1e-6)
  emb = pred.embed(x, hw="b", batch_size=4, threads=1)
  np.testing.assert_array_equal(pred.embed(x, hw="b", batch_size=4, threads=3), emb)
  w, c = pred.last_layer("b")
  np.testing.assert_allclose(emb @ w + c, one[:, 1], rtol=1e-4, atol=1e-4)
  assert pred.predict(x[:0], threads=2).shape == (0,)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_predict_refuses_a_bad_thread_count(threads):
  pred = npred.Predictor.from_arrays(_arrays())
  with pytest.raises(npred.PredictorError, match="threads must be"):
    pred.predict(_features(), threads=threads)
  with pytest.raises(npred.PredictorError, match="threads must be"):
    pred.embed(_features(), threads=threads)


def test_a_chunk_that_fails_on_a_worker_thread_raises_in_the_caller(monkeypatch):
  pred = npred.Predictor.from_arrays(_arrays())
  calls = []

  def broken(x, heads, embed=False):
    calls.append(len(x))
    raise FloatingPointError("boom")

  monkeypatch.setattr(pred, "_forward", broken)
  with pytest.raises(FloatingPointError, match="boom"):
    pred.predict(_features(n=9), batch_size=2, threads=3)
  assert calls


def _blas_threads():
  return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
  """The process's BLAS thread counts, when a one-thread limit is visible against them.

  (Not set here with threadpoolctl: OpenBLAS then ignores a limit set from another thread.)"""
  before = _blas_threads()
  if not before or max(before) < 2:
    pytest.skip("the BLAS runs one thread already (one core?)")
  return before


def test_threads_run_on_a_one_thread_blas_and_restore_it(monkeypatch, two_blas_threads):
  pred = npred.Predictor.from_arrays(_arrays())
  before = two_blas_threads
  seen, threads = [], set()
  forward = pred._forward

  def recording(x, heads, embed=False):
    seen.append(_blas_threads())
    threads.add(threading.get_ident())
    return forward(x, heads, embed)

  monkeypatch.setattr(pred, "_forward", recording)
  pred.predict(_features(n=40), batch_size=2, threads=3)
  assert seen and all(s == [1] * len(before) for s in seen)
  assert _blas_threads() == before
  assert len(threads) > 1 and threading.get_ident() not in threads

  def broken(x, heads, embed=False):
    raise FloatingPointError("boom")

  monkeypatch.setattr(pred, "_forward", broken)
  with pytest.raises(FloatingPointError):
    pred.predict(_features(n=9), batch_size=2, threads=2)
  assert _blas_threads() == before


def test_overlapping_threaded_calls_keep_and_then_restore_the_limit(monkeypatch, two_blas_threads):
  """Two calls on two threads: the one that ends first must not lift the other's limit, and the
  last one out restores the process's own setting."""
  pred = npred.Predictor.from_arrays(_arrays())
  before = two_blas_threads
  first_in, first_may_leave, first_out = threading.Event(), threading.Event(), threading.Event()
  second_in = threading.Event()
  seen_by_second = []
  forward = pred._forward

  def first(x, heads, embed=False):
    first_in.set()
    first_may_leave.wait(10)
    return forward(x, heads, embed)

  def second(x, heads, embed=False):
    second_in.set()
    first_out.wait(10)  # the first call has returned by now
    seen_by_second.append(_blas_threads())
    return forward(x, heads, embed)

  def run_first():
    p = npred.Predictor.from_arrays(_arrays())
    p._forward = first
    p.predict(_features(n=4), batch_size=4, threads=1)
    first_out.set()

  t = threading.Thread(target=run_first)
  t.start()
  assert first_in.wait(10)
  monkeypatch.setattr(pred, "_forward", second)
  worker = threading.Thread(target=lambda: pred.predict(_features(n=4), batch_size=4, threads=1))
  worker.start()
  assert second_in.wait(10)  # both calls hold the limit now
  first_may_leave.set()
  t.join(10)
  worker.join(10)
  assert seen_by_second == [[1] * len(before)]
  assert _blas_threads() == before
