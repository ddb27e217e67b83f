"""Tests of the TLP cost model for TVM's auto-scheduler (tlp_jax/tvm/cost_model.py)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orjson
import pytest

from tlp_jax.core import features
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import predictor as npred
from tlp_jax.core import replay as rp
from tlp_jax.core import skeleton as sk
from tlp_jax.train import export
from tlp_jax.train import model as model_lib
from tlp_jax.tvm import cost_model as tvm_cost_model
from tlp_jax.tvm import search_tasks, skeleton_extract

HAS_TVM = importlib.util.find_spec("tvm") is not None
needs_tvm = pytest.mark.skipif(not HAS_TVM, reason="TVM not installed (pip install -e '.[tvm]')")


def test_module_imports_without_tvm_and_names_the_extra():
  """Importing the module never needs TVM; using it without TVM says what to install."""
  code = textwrap.dedent("""
      import sys
      sys.modules["tvm"] = None  # makes `import tvm` raise ImportError
      from tlp_jax.tvm import cost_model as m
      try:
        m.TLPCostModel(object())
      except ImportError as e:
        assert "pip install -e '.[tvm]'" in str(e), e
        print("OK")
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "OK", out.stderr


class FakePredictor:
  """Records what it is asked; scores a program by a fixed function of its steps."""

  platform = "llvm"
  hardware = ("hw_a", "hw_b")

  def __init__(self, offset=0.0):
    self.seen = []
    self.heads = []
    self.offset = offset

  def predict_steps(self, list_of_steps, hw=None):
    self.seen.extend(list_of_steps)
    self.heads.append(hw)
    # Deterministic and spread out: negative for some programs (LambdaRank outputs can be).
    return np.asarray([len(json.dumps(s)) % 97 - 40.0 + self.offset for s in list_of_steps])


@pytest.fixture(scope="module")
def matmul_task():
  if not HAS_TVM:
    pytest.skip("TVM not installed (pip install -e '.[tvm]')")
  import tvm
  from tvm import auto_scheduler, te

  @auto_scheduler.register_workload("tlp_test_matmul")
  def matmul(n):
    a = te.placeholder((n, n), name="A")
    b = te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    return [a, b, te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=[k]), name="C")]

  del matmul
  return auto_scheduler.SearchTask(
    func="tlp_test_matmul", args=(32,), target=tvm.target.Target("llvm")
  )


def _states(task, n=8, seed=1):
  from tvm import auto_scheduler

  policy = auto_scheduler.SketchPolicy(
    task, params={"evolutionary_search_population": 16}, seed=seed, verbose=0
  )
  return list(policy.sample_initial_population())[:n]


@needs_tvm
def test_steps_equal_the_record_files_steps(matmul_task, tmp_path):
  """The cost model sees exactly the step lists a measure record stores at ["i"][1][1]."""
  from tvm import auto_scheduler

  states = _states(matmul_task)
  path = str(tmp_path / "records.json")
  auto_scheduler.save_records(
    path,
    [auto_scheduler.MeasureInput(matmul_task, s) for s in states],
    [auto_scheduler.MeasureResult([1e-3], 0, "", 0, 0) for _ in states],
  )
  with open(path, encoding="utf-8") as f:
    from_file = [json.loads(line)["i"][1][1] for line in f]
  assert tvm_cost_model.states_to_steps(matmul_task, states) == from_file
  assert len(from_file) == len(states) and all(from_file)


@needs_tvm
def test_predict_scores_each_state_with_the_predictor(matmul_task):
  fake = FakePredictor()
  model = tvm_cost_model.TLPCostModel(
    fake, tvm_cost_model.CostModelConfig(hardware="hw_b", score_transform="identity")
  )
  states = _states(matmul_task)
  steps = tvm_cost_model.states_to_steps(matmul_task, states)
  scores = model.predict(matmul_task, states)
  assert scores.dtype == np.float32 and scores.shape == (len(states),)
  np.testing.assert_allclose(scores, FakePredictor().predict_steps(steps))
  assert fake.seen == steps and fake.heads == ["hw_b"]
  # Second call: served from the cache, same scores, predictor not called again.
  again = model.predict(matmul_task, states)
  np.testing.assert_array_equal(again, scores)
  assert len(fake.seen) == len(steps)
  summary = model.timing_summary()
  assert summary["predict_calls"] == 2 and summary["states_cached"] == len(states)
  model.update([], [])  # documented no-op


@needs_tvm
def test_softplus_transform_is_positive_and_order_preserving(matmul_task):
  states = _states(matmul_task)
  raw = tvm_cost_model.TLPCostModel(
    FakePredictor(), tvm_cost_model.CostModelConfig(score_transform="identity")
  ).predict(matmul_task, states)
  soft = tvm_cost_model.TLPCostModel(FakePredictor()).predict(matmul_task, states)  # default
  assert np.all(soft > 0)
  assert np.array_equal(np.argsort(raw, kind="stable"), np.argsort(soft, kind="stable"))
  assert np.any(raw < 0)


@needs_tvm
def test_softplus_keeps_the_ranking_of_scores_far_below_zero(matmul_task):
  # A ranking model's scores have an arbitrary offset; one exported model scores whole tasks
  # near -196, where softplus underflows float32 (Ansor's dtype) and every state would tie.
  states = _states(matmul_task)
  raw = tvm_cost_model.TLPCostModel(
    FakePredictor(offset=-200.0), tvm_cost_model.CostModelConfig(score_transform="identity")
  ).predict(matmul_task, states)
  model = tvm_cost_model.TLPCostModel(FakePredictor(offset=-200.0))  # softplus, the default
  soft = model.predict(matmul_task, states)
  assert np.all(soft > 0) and len(np.unique(soft)) == len(np.unique(raw)) > 1
  assert np.array_equal(np.argsort(raw, kind="stable"), np.argsort(soft, kind="stable"))
  # The task's anchor is kept: a later call (here: cached, and a subset) scores the same.
  again = model.predict(matmul_task, states[:3])
  np.testing.assert_array_equal(again, soft[:3])
  assert model.timing_summary()["states_cached"] == 3


@needs_tvm
def test_config_errors():
  with pytest.raises(ValueError, match="score_transform"):
    tvm_cost_model.TLPCostModel(
      FakePredictor(), tvm_cost_model.CostModelConfig(score_transform="exp")
    )
  with pytest.raises(ValueError, match="no head"):
    tvm_cost_model.TLPCostModel(FakePredictor(), tvm_cost_model.CostModelConfig(hardware="x"))


@needs_tvm
def test_platform_mismatch_is_an_error(matmul_task):
  fake = FakePredictor()
  fake.platform = "cuda"
  with pytest.raises(ValueError, match="platform"):
    tvm_cost_model.TLPCostModel(fake).predict(matmul_task, _states(matmul_task, 2))


@needs_tvm
def test_ansor_search_calls_the_model_through_the_ffi(matmul_task):
  """Ansor's C++ evolutionary search scores populations via our predict()."""
  from tvm import auto_scheduler

  fake = FakePredictor()
  model = tvm_cost_model.TLPCostModel(
    fake, tvm_cost_model.CostModelConfig(score_transform="softplus")
  )
  policy = auto_scheduler.SketchPolicy(
    matmul_task,
    program_cost_model=model,
    params={"evolutionary_search_population": 32, "evolutionary_search_num_iters": 2},
    seed=3,
    verbose=0,
  )
  init = policy.sample_initial_population()
  best = policy.evolutionary_search(init, 4)
  assert len(best) == 4
  assert model.calls and sum(c.num_states for c in model.calls) >= 32
  # The returned states are the best-scored ones the search saw.
  best_scores = model.predict(matmul_task, list(best))
  seen = np.asarray([c for c in model._cache.values()])
  assert best_scores.min() >= np.sort(seen)[-len(seen) // 2]


def _tiny_model(crop, *, width=16, decoder_dims=None, input_norm="log1p", seed=0):
  """A small randomly initialised TLP model of input shape ``crop``: (config, params).

  Small widths: the cost model does not depend on them, and init stays cheap."""
  cfg = model_lib.TLPConfig(
    feature_dim=crop[1],
    seq_len=crop[0],
    encoder_dims=(width, width),
    attention_heads=2,
    res_blocks=1,
    decoder_dims=decoder_dims or (width, 1),
    input_norm=input_norm,
  )
  params = model_lib.TLPModel(cfg).init(
    jax.random.PRNGKey(seed), np.zeros((1,) + tuple(crop), np.float32)
  )["params"]
  return cfg, params


def _save_export(path, cfg, params, crop, **extra):
  """``export.save_npz`` of ``params`` with one hardware head "hw" on llvm; returns ``path``."""
  export.save_npz(
    path,
    params,
    cfg,
    hardware=["hw"],
    platform="llvm",
    crop=crop,
    vocab_json=features.Vocabulary.original("llvm").to_json(),
    step=0,
    **extra,
  )
  return path


@needs_tvm
def test_with_the_real_numpy_predictor(matmul_task, tmp_path):
  """End to end with an exported (randomly initialised) model."""
  crop = (25, 22)
  cfg, params = _tiny_model(crop, input_norm="none")
  path = _save_export(str(tmp_path / "model.npz"), cfg, params, crop)
  pred = npred.Predictor.load(path)
  states = _states(matmul_task)
  identity = tvm_cost_model.CostModelConfig(score_transform="identity")
  scores = tvm_cost_model.TLPCostModel(pred, identity).predict(matmul_task, states)
  expected = pred.predict_steps(tvm_cost_model.states_to_steps(matmul_task, states))
  np.testing.assert_allclose(scores, np.asarray(expected, np.float32), rtol=1e-6)
  assert np.all(np.isfinite(scores)) and np.unique(scores).size > 1
  # The README's one-liner: a path works, and loads the same model.
  by_path = tvm_cost_model.TLPCostModel(path, identity)
  np.testing.assert_array_equal(by_path.predict(matmul_task, states), scores)


@needs_tvm
def test_a_bad_model_file_fails_at_construction(tmp_path):
  with pytest.raises(FileNotFoundError):
    tvm_cost_model.TLPCostModel(str(tmp_path / "missing.npz"))
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(npred.PredictorError, match="not a readable .npz"):
    tvm_cost_model.TLPCostModel(bad)  # a PathLike too
  np.savez(tmp_path / "other.npz", x=np.zeros(2))
  with pytest.raises(npred.PredictorError, match="not a tlp-jax model export"):
    tvm_cost_model.TLPCostModel(str(tmp_path / "other.npz"))
  with pytest.raises(TypeError, match="model path or a Predictor"):
    tvm_cost_model.TLPCostModel(42)


@needs_tvm
def test_a_model_of_the_removed_store_version_is_refused(tmp_path):
  """Exports of the TVM store feature version (format 2, or its own meta keys) fail at
  construction, naming the commit that still serves them."""
  cfg, params = _tiny_model((25, 22), width=8)
  arrays = export.export_params(
    params,
    cfg,
    hardware=["hw"],
    platform="llvm",
    crop=None,
    vocab_json=features.Vocabulary.original("llvm").to_json(),
    step=0,
  )
  old = dict(arrays, **{npred.META_FORMAT_VERSION: np.array(2, np.int64)})
  np.savez(tmp_path / "store.npz", **old)
  with pytest.raises(npred.PredictorError, match="TVM store feature version.*4fe3f70"):
    tvm_cost_model.TLPCostModel(str(tmp_path / "store.npz"))


@pytest.fixture(scope="module")
def sample_conv_task(sample_tenset_dir):
  """A real task of the embedded sample (a strided 3x3 conv, NHWC) as a TVM SearchTask."""
  if not HAS_TVM:
    pytest.skip("TVM not installed (pip install -e '.[tvm]')")
  tasks = search_tasks.load_search_tasks(
    os.path.join(sample_tenset_dir, "network_info", "all_tasks.pkl")
  )
  record_file = os.path.join(
    sample_tenset_dir,
    "measure_records",
    "epyc-9004",
    "([07f9fcad27bdd3233f86fe35a5185d33,[1,56,56,64],[3,3,64,128],[1,1,1,128],[1,28,28,128]],"
    "llvm).json",
  )
  with open(record_file) as f:
    key = json.loads(f.readline())["i"][0][0]
  for t in tasks:
    if t.workload_key == key:
      return t
  pytest.fail(f"no task of {record_file} in the sample's all_tasks.pkl")


def _token_export(tmp_path, skeletons):
  """A tiny export of a loop-token model (format 5) embedding ``skeletons``."""
  crop = npred.input_shape((25, 22), (lt.DEFAULT_MAX_TOKENS, lt.WIDTH))
  cfg, params = _tiny_model(crop)
  sk_path = str(tmp_path / "skeletons.json")
  sk.save_collection(sk_path, skeletons)
  with open(sk_path) as f:
    skeletons_json = f.read()
  return _save_export(
    str(tmp_path / "tokens.npz"),
    cfg,
    params,
    crop,
    loop_tokens={
      "layout_version": lt.LAYOUT_VERSION,
      "max_tokens": lt.DEFAULT_MAX_TOKENS,
      "width": lt.WIDTH,
    },
    skeletons_json=skeletons_json,
  )


@needs_tvm
def test_loop_token_model_scores_states_with_no_tvm_call_per_state(
  sample_conv_task, tmp_path, monkeypatch
):
  """Skeleton extracted once per task; per state only the step serialisation touches TVM."""
  from tvm import auto_scheduler

  task = sample_conv_task
  skel = skeleton_extract.skeleton_from_task(task)
  path = _token_export(tmp_path, {task.workload_key: skel})
  pred = npred.Predictor.load(path)
  states = _states(task, n=16, seed=4)
  steps = tvm_cost_model.states_to_steps(task, states)

  calls = []

  def forbidden(name):
    def f(*args, **kwargs):
      calls.append(name)
      raise AssertionError(f"{name} called per state")

    return f

  monkeypatch.setattr(
    auto_scheduler.ComputeDAG, "infer_bound_from_state", forbidden("infer_bound_from_state")
  )
  monkeypatch.setattr(
    auto_scheduler.feature,
    "get_per_store_features_from_states",
    forbidden("get_per_store_features_from_states"),
  )
  extracted = []
  real_extract = skeleton_extract.skeleton_from_task
  monkeypatch.setattr(
    skeleton_extract,
    "skeleton_from_task",
    lambda t: extracted.append(t.workload_key) or real_extract(t),
  )

  model = tvm_cost_model.TLPCostModel(
    path, tvm_cost_model.CostModelConfig(score_transform="identity", cache_size=0)
  )
  first = model.predict(task, states[:8])
  second = model.predict(task, states)
  assert calls == [] and extracted == [task.workload_key]
  assert model.timing_summary()["states_failed"] == 0
  # The same scores as the NumPy predictor on the same steps, with the embedded skeleton.
  want = pred.predict_steps(steps, workload_key=task.workload_key)
  # Equal up to float32 rounding: the predictor packs a batch's distinct rows into matrices whose
  # size depends on the batch, and BLAS may sum in another order for another size.
  np.testing.assert_allclose(second, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(first, want[:8], rtol=1e-5, atol=1e-6)
  assert np.unique(want).size > 1
  # The tokens are read: other tokens, other scores.
  tokens = pred.loop_tokens_of(steps, workload_key=task.workload_key)
  assert tokens.any()
  assert not np.allclose(want, pred.predict(pred.featurize_steps(steps), loop_tokens=tokens * 0))
  # Softplus (the default) of the same scores, relative to the task's anchor: the median raw
  # score of its first call.
  soft = tvm_cost_model.TLPCostModel(path).predict(task, states)
  centred = want.astype(np.float64) - np.median(want.astype(np.float64))
  np.testing.assert_allclose(soft, np.logaddexp(0.0, centred), rtol=1e-5)


@needs_tvm
def test_step_features_come_from_the_serialised_text_with_the_same_values(
  sample_conv_task, tmp_path
):
  """The step list's text is cut out of each serialised state (after the task's head, checked by
  parsing) and featurized on the records' text path: the same features as the parsed steps."""
  task = sample_conv_task
  states = _states(task, n=16, seed=4)
  keys = [tvm_cost_model.state_steps_json(task, s) for s in states]
  head = tvm_cost_model.steps_text_head(keys[0])
  assert head is not None and head.endswith(b", [[], [")
  assert all(k.startswith(head) and k.endswith(b"]]]") for k in keys)
  steps = [orjson.loads(k)[1][1] for k in keys]
  texts = [k[len(head) : -3] for k in keys]
  assert [json.loads(b"[" + t + b"]") for t in texts] == steps
  pred = npred.Predictor.load(_token_export(tmp_path, {}))
  np.testing.assert_array_equal(pred.featurize_texts(texts), pred.featurize_steps(steps))


def test_steps_text_head_is_checked_by_parsing():
  # The state's opening text also inside the task part (in its workload key string): the first
  # cut does not parse as the task, the second does.
  task = b'["[\\"k\\", [[], [1]]]", "llvm", [], "", 2, []]'
  key = b"[" + task + b', [[], [["CI", 1], ["AN", 1, 0, 3]]]]'
  head = tvm_cost_model.steps_text_head(key)
  assert head == b"[" + task + b", [[], ["
  assert key[len(head) : -3] == b'["CI", 1], ["AN", 1, 0, 3]'
  empty = b"[" + task + b", [[], []]]"
  assert empty[len(tvm_cost_model.steps_text_head(empty)) : -3] == b""
  for bad in [b"not json", b"[1, 2]", b"[" + task + b", [[], [1]], 2]"]:
    assert tvm_cost_model.steps_text_head(bad) is None


@needs_tvm
def test_network_threads_give_the_same_scores(sample_conv_task, tmp_path):
  task = sample_conv_task
  path = _token_export(tmp_path, {task.workload_key: skeleton_extract.skeleton_from_task(task)})
  states = _states(task, n=16, seed=4)
  cfg = tvm_cost_model.CostModelConfig(score_transform="identity", cache_size=0, predict_chunk=3)
  one = tvm_cost_model.TLPCostModel(path, cfg, threads=1).predict(task, states)
  four = tvm_cost_model.TLPCostModel(path, cfg, threads=4)
  assert four.threads == 4 and tvm_cost_model.TLPCostModel(path, cfg).threads >= 1
  many = four.predict(task, states)
  np.testing.assert_array_equal(many, one)
  pred = npred.Predictor.load(path)
  want = pred.predict_steps(
    tvm_cost_model.states_to_steps(task, states), workload_key=task.workload_key
  )
  np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-6)
  for bad in [{"threads": -1}, {"threads": 2.5}, {"threads": None}, {"threads": True}]:
    with pytest.raises(ValueError, match="threads must be an integer >= 0"):
      tvm_cost_model.TLPCostModel(path, cfg, **bad)
  for bad in [0, 1.5]:
    with pytest.raises(ValueError, match="predict_chunk must be an integer >= 1"):
      tvm_cost_model.TLPCostModel(path, cfg, predict_chunk=bad)


@needs_tvm
def test_step_features_take_the_text_path_and_fall_back_to_parsed_steps(
  sample_conv_task, tmp_path, monkeypatch
):
  task = sample_conv_task
  path = _token_export(tmp_path, {task.workload_key: skeleton_extract.skeleton_from_task(task)})
  states = _states(task, n=12, seed=4)
  cfg = tvm_cost_model.CostModelConfig(score_transform="identity", cache_size=0)
  want = tvm_cost_model.TLPCostModel(path, cfg).predict(task, states)
  # The text path: the parsed steps' featurizer is never called.
  model = tvm_cost_model.TLPCostModel(path, cfg)

  def no_parsed(steps_list):
    raise AssertionError("featurize_steps called on the text path")

  monkeypatch.setattr(model.predictor, "featurize_steps", no_parsed)
  np.testing.assert_array_equal(model.predict(task, states), want)
  monkeypatch.undo()
  # A head that no key starts with: every key goes back to the parsed steps, same scores.
  model = tvm_cost_model.TLPCostModel(path, cfg)
  model._heads[task.workload_key] = b"[[no such head"
  calls = []
  monkeypatch.setattr(model.predictor, "featurize_texts", lambda texts: calls.append(texts))
  np.testing.assert_array_equal(model.predict(task, states), want)
  assert calls == []


@needs_tvm
def test_a_predictor_of_another_class_is_called_as_before(sample_conv_task, tmp_path):
  """A duck-typed predictor that reads loop tokens (e.g. a wrapper around a Predictor) gets the
  loop tokens and plain ``predict(features, loop_tokens=...)`` calls, without threads."""
  task = sample_conv_task
  path = _token_export(tmp_path, {task.workload_key: skeleton_extract.skeleton_from_task(task)})
  inner = npred.Predictor.load(path)

  class Proxy:
    def __init__(self, wrapped):
      self._wrapped = wrapped
      self.calls = []

    def __getattr__(self, name):
      return getattr(self._wrapped, name)

    def predict(self, features, hw=None, loop_tokens=None):
      self.calls.append(loop_tokens is not None)
      return self._wrapped.predict(features, hw=hw, loop_tokens=loop_tokens)

  proxy = Proxy(inner)
  states = _states(task, n=8, seed=4)
  cfg = tvm_cost_model.CostModelConfig(score_transform="identity", cache_size=0)
  got = tvm_cost_model.TLPCostModel(proxy, cfg).predict(task, states)
  want = inner.predict_steps(
    tvm_cost_model.states_to_steps(task, states), workload_key=task.workload_key
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert proxy.calls == [True]


@needs_tvm
def test_a_state_whose_replay_fails_gets_the_lowest_score(sample_conv_task, tmp_path, monkeypatch):
  task = sample_conv_task
  path = _token_export(tmp_path, {task.workload_key: skeleton_extract.skeleton_from_task(task)})
  # Raw scores: softplus's per-task anchor would depend on which states the first call scored.
  model = tvm_cost_model.TLPCostModel(path, score_transform="identity")
  states = _states(task, n=6, seed=5)
  steps = tvm_cost_model.states_to_steps(task, states)
  good = model.predict(task, states)
  bad_key = orjson.dumps(steps[2])
  real = model.predictor.loop_tokens_of

  def flaky(steps_list, **kwargs):
    if any(orjson.dumps(s) == bad_key for s in steps_list):
      raise rp.ReplayError("unsupported step")
    return real(steps_list, **kwargs)

  model2 = tvm_cost_model.TLPCostModel(path, score_transform="identity")
  monkeypatch.setattr(model2.predictor, "loop_tokens_of", flaky)
  got = model2.predict(task, states)
  ok = np.arange(len(states)) != 2
  np.testing.assert_allclose(got[ok], good[ok], rtol=1e-5, atol=1e-6)  # other batch: rounding
  assert got[2] == got[ok].min()
  assert model2.timing_summary()["states_failed"] == 1
  # That score depends on its batch, so it is not cached: alone, the state is replayed again.
  again = model2.predict(task, states[2:3])
  assert model2.timing_summary()["states_failed"] == 2 and model2.calls[-1].num_cached == 0
  assert again.shape == (1,)


@needs_tvm
def test_a_task_without_any_skeleton_is_scored_on_steps_and_never_raises(
  sample_conv_task, tmp_path, monkeypatch, caplog
):
  """TVM's extraction fails and the model embeds no skeleton of the task: no exception reaches
  the tuner; the states are scored with empty loop tokens, and a warning says so once."""
  task = sample_conv_task
  path = _token_export(tmp_path, {})  # embeds no skeleton at all

  def broken(t):
    raise RuntimeError("extraction failed")

  monkeypatch.setattr(skeleton_extract, "skeleton_from_task", broken)
  model = tvm_cost_model.TLPCostModel(
    path, tvm_cost_model.CostModelConfig(score_transform="identity", cache_size=0)
  )
  states = _states(task, n=6, seed=6)
  with caplog.at_level("WARNING"):
    got = model.predict(task, states)
    calls = []
    monkeypatch.setattr(
      skeleton_extract, "skeleton_from_task", lambda t: calls.append(t) or broken(t)
    )
    model.predict(task, states)
  assert calls == []  # the failed extraction is not retried on every call
  steps = tvm_cost_model.states_to_steps(task, states)
  pred = model.predictor
  tokens = np.zeros((len(steps), pred.max_tokens, pred.token_width), np.float16)
  want = pred.predict(pred.featurize_steps(steps), loop_tokens=tokens)
  np.testing.assert_array_equal(got, np.asarray(want, np.float32))
  assert model.tasks_without_skeleton == {task.workload_key}
  assert sum("scored without loop tokens" in r.getMessage() for r in caplog.records) == 1


@needs_tvm
def test_ansor_search_with_a_loop_token_model(sample_conv_task, tmp_path):
  from tvm import auto_scheduler

  task = sample_conv_task
  path = _token_export(tmp_path, {task.workload_key: skeleton_extract.skeleton_from_task(task)})
  model = tvm_cost_model.TLPCostModel(path)
  policy = auto_scheduler.SketchPolicy(
    task,
    program_cost_model=model,
    params={"evolutionary_search_population": 32, "evolutionary_search_num_iters": 2},
    seed=3,
    verbose=0,
  )
  best = policy.evolutionary_search(policy.sample_initial_population(), 4)
  assert len(best) == 4 and sum(c.num_states for c in model.calls) >= 32
  assert model.timing_summary()["states_failed"] == 0


def _tiny_step_model(tmp_path, seed=0):
  """A small random step-token export (its own file)."""
  cfg, params = _tiny_model((25, 22), decoder_dims=(16, 8, 1), seed=seed)
  return _save_export(str(tmp_path / f"step_model_{seed}.npz"), cfg, params, (25, 22))


def _kendall(a, b):
  """Kendall's tau of two score vectors (no ties expected)."""
  s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
  n = len(a)
  return s[np.triu_indices(n, 1)].sum() / (n * (n - 1) / 2)


def _results(costs):
  from tvm import auto_scheduler

  return [
    auto_scheduler.MeasureResult([float(c)], 0, "", 0, 0)
    if np.isfinite(c)
    else auto_scheduler.MeasureResult([1e10], 4, "run error", 0, 0)
    for c in costs
  ]


@needs_tvm
@pytest.mark.parametrize("tokens", [False, True])
def test_online_update_learns_this_machines_ranking(
  matmul_task, sample_conv_task, tmp_path, tokens
):
  """Before any update the online model scores as the frozen one; after updates on
  measurements that rank the states against the model, its ranking follows the measurements;
  failed measurements are counted, not used; the refit is deterministic."""
  from tvm import auto_scheduler

  if tokens:
    task = sample_conv_task
    path = _token_export(tmp_path, {task.workload_key: skeleton_extract.skeleton_from_task(task)})
  else:
    task, path = matmul_task, _tiny_step_model(tmp_path)
  states = _states(task, n=24, seed=7)
  frozen = tvm_cost_model.TLPCostModel(path, score_transform="identity")
  cfg = tvm_cost_model.CostModelConfig(
    score_transform="identity",
    update="online",
    online_config=tvm_cost_model.online.OnlineConfig(l2=0.01),
  )
  model = tvm_cost_model.TLPCostModel(path, cfg)
  before = model.predict(task, states)
  np.testing.assert_allclose(before, frozen.predict(task, states), rtol=1e-4, atol=1e-4)
  # This machine disagrees with the model: the states it scores highest are the slowest.
  costs = 1e-3 * 1.2 ** np.argsort(np.argsort(before, kind="stable"))
  costs[3] = np.inf  # a failed run
  inputs = [auto_scheduler.MeasureInput(task, s) for s in states]
  model.update(inputs[:12], _results(costs[:12]))
  model.update(inputs[12:], _results(costs[12:]))
  model.update(inputs[:2], _results(costs[:2]))  # measured again: not added twice
  after = model.predict(task, states)  # cached embeddings, re-scored with the new layer
  ok = np.isfinite(costs)
  assert _kendall(before[ok], -costs[ok]) < -0.8
  assert _kendall(after[ok], -costs[ok]) > 0.5, _kendall(after[ok], -costs[ok])
  assert [u.added for u in model.updates] == [11, 12, 0]
  assert [u.failed for u in model.updates] == [1, 0, 0] and model.updates[-1].buffer == 23
  assert model.timing_summary()["update_errors"] == 0
  # Deterministic: the same measurements give the same scores; the frozen model never moved.
  twin = tvm_cost_model.TLPCostModel(path, cfg)
  twin.predict(task, states)
  for lo, hi in ((0, 12), (12, 24), (0, 2)):
    twin.update(inputs[lo:hi], _results(costs[lo:hi]))
  np.testing.assert_array_equal(twin.predict(task, states), after)
  # Another cache history only changes float rounding (BLAS over other batch shapes).
  other = tvm_cost_model.TLPCostModel(path, cfg)
  other.predict(task, states[:5])
  for lo, hi in ((0, 12), (12, 24), (0, 2)):
    other.update(inputs[lo:hi], _results(costs[lo:hi]))
  np.testing.assert_allclose(other.predict(task, states), after, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(frozen.predict(task, states), frozen.predict(task, states))
  frozen.update(inputs, _results(costs))  # update="none" (the default): nothing changes
  np.testing.assert_allclose(frozen.predict(task, states), before, rtol=1e-4, atol=1e-4)


@needs_tvm
def test_an_online_update_that_fails_never_reaches_the_tuner(matmul_task, tmp_path, monkeypatch):
  from tvm import auto_scheduler

  model = tvm_cost_model.TLPCostModel(_tiny_step_model(tmp_path), update="online")
  states = _states(matmul_task, n=6)
  before = model.predict(matmul_task, states)

  def broken(*args, **kwargs):
    raise np.linalg.LinAlgError("singular")

  monkeypatch.setattr(tvm_cost_model.online, "fit", broken)
  inputs = [auto_scheduler.MeasureInput(matmul_task, s) for s in states]
  model.update(inputs, _results(np.arange(1, 7) * 1e-3))
  assert model.updates[-1].error == "LinAlgError: singular"
  assert model.timing_summary()["update_errors"] == 1
  np.testing.assert_array_equal(model.predict(matmul_task, states), before)


@needs_tvm
def test_update_mode_and_online_needs_a_real_predictor():
  with pytest.raises(ValueError, match="unknown update 'always'"):
    tvm_cost_model.TLPCostModel(FakePredictor(), update="always")
  with pytest.raises(TypeError, match="update='online'"):
    tvm_cost_model.TLPCostModel(FakePredictor(), update="online")
  with pytest.raises(TypeError, match="unexpected keyword"):
    tvm_cost_model.TLPCostModel(FakePredictor(), updates="online")


@needs_tvm
def test_pretrained_by_name_and_spec(matmul_task, tmp_path, monkeypatch):
  """TLPCostModel.pretrained(NAME) and "pretrained:NAME" load the packaged model; an unknown
  name fails at construction, listing the shipped ones."""
  from tlp_jax.core import pretrained

  folder = tmp_path / "pkg"
  folder.mkdir()
  os.replace(_tiny_step_model(tmp_path), folder / "tiny-cpu.npz")
  monkeypatch.setattr(pretrained, "package_dir", lambda: folder)
  states = _states(matmul_task, n=4)
  want = tvm_cost_model.TLPCostModel(str(folder / "tiny-cpu.npz")).predict(matmul_task, states)
  by_name = tvm_cost_model.TLPCostModel.pretrained("tiny-cpu")
  np.testing.assert_array_equal(by_name.predict(matmul_task, states), want)
  by_spec = tvm_cost_model.TLPCostModel("pretrained:tiny-cpu")
  np.testing.assert_array_equal(by_spec.predict(matmul_task, states), want)
  with pytest.raises(pretrained.PretrainedError, match="available: tiny-cpu"):
    tvm_cost_model.TLPCostModel.pretrained("epyc-9004")
