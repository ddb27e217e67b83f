"""Tests of the TLP cost model for TVM's auto-scheduler (tlp_jax/tvm/cost_model.py)."""
import importlib.util
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tlp_jax.core import features
from tlp_jax.core import predictor as npred
from tlp_jax.train import export
from tlp_jax.train import model as model_lib
from tlp_jax.tvm import cost_model as tvm_cost_model
from tlp_jax.tvm import loop_features

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

  def __init__(self):
    self.seen = []
    self.heads = []

  def predict_steps(self, list_of_steps, hw=None):
    self.seen.extend(list_of_steps)
    self.heads.append(hw)
    # Deterministic and spread out: negative for some programs (LambdaRank outputs can be).
    return np.asarray([len(json.dumps(s)) % 97 - 40.0 for s in list_of_steps])


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
    return [a, b, te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=[k]),
                             name="C")]

  del matmul
  return auto_scheduler.SearchTask(func="tlp_test_matmul", args=(32,),
                                   target=tvm.target.Target("llvm"))


def _states(task, n=8, seed=1):
  from tvm import auto_scheduler
  policy = auto_scheduler.SketchPolicy(task, params={"evolutionary_search_population": 16},
                                       seed=seed, verbose=0)
  return list(policy.sample_initial_population())[:n]


@needs_tvm
def test_steps_equal_the_record_files_steps(matmul_task, tmp_path):
  """The cost model sees exactly the step lists a measure record stores at ["i"][1][1]."""
  from tvm import auto_scheduler
  states = _states(matmul_task)
  path = str(tmp_path / "records.json")
  auto_scheduler.save_records(
      path, [auto_scheduler.MeasureInput(matmul_task, s) for s in states],
      [auto_scheduler.MeasureResult([1e-3], 0, "", 0, 0) for _ in states])
  with open(path, encoding="utf-8") as f:
    from_file = [json.loads(line)["i"][1][1] for line in f]
  assert tvm_cost_model.states_to_steps(matmul_task, states) == from_file
  assert len(from_file) == len(states) and all(from_file)


@needs_tvm
def test_predict_scores_each_state_with_the_predictor(matmul_task):
  fake = FakePredictor()
  model = tvm_cost_model.TLPCostModel(fake, tvm_cost_model.CostModelConfig(hardware="hw_b"))
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
  raw = tvm_cost_model.TLPCostModel(FakePredictor()).predict(matmul_task, states)
  soft = tvm_cost_model.TLPCostModel(
      FakePredictor(), tvm_cost_model.CostModelConfig(score_transform="softplus")).predict(
          matmul_task, states)
  assert np.all(soft > 0)
  assert np.array_equal(np.argsort(raw, kind="stable"), np.argsort(soft, kind="stable"))
  assert np.any(raw < 0)


@needs_tvm
def test_config_errors():
  with pytest.raises(ValueError, match="score_transform"):
    tvm_cost_model.TLPCostModel(FakePredictor(),
                                tvm_cost_model.CostModelConfig(score_transform="exp"))
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
      fake, tvm_cost_model.CostModelConfig(score_transform="softplus"))
  policy = auto_scheduler.SketchPolicy(
      matmul_task, program_cost_model=model,
      params={"evolutionary_search_population": 32, "evolutionary_search_num_iters": 2},
      seed=3, verbose=0)
  init = policy.sample_initial_population()
  best = policy.evolutionary_search(init, 4)
  assert len(best) == 4
  assert model.calls and sum(c.num_states for c in model.calls) >= 32
  # The returned states are the best-scored ones the search saw.
  best_scores = model.predict(matmul_task, list(best))
  seen = np.asarray([c for c in model._cache.values()])
  assert best_scores.min() >= np.sort(seen)[-len(seen) // 2]


@needs_tvm
def test_with_the_real_numpy_predictor(matmul_task, tmp_path):
  """End to end with an exported (randomly initialised) model."""
  vocab = features.Vocabulary.original("llvm")
  crop = (25, 22)
  # Small widths: the cost model does not depend on them, and init stays cheap.
  cfg = model_lib.TLPConfig(feature_dim=crop[1], seq_len=crop[0], encoder_dims=(16, 16),
                            attention_heads=2, res_blocks=1, decoder_dims=(16, 1))
  params = model_lib.TLPModel(cfg).init(jax.random.PRNGKey(0),
                                        np.zeros((1,) + crop, np.float32))["params"]
  path = str(tmp_path / "model.npz")
  export.save_npz(path, params, cfg, hardware=["hw"], platform="llvm", crop=crop,
                  vocab_json=vocab.to_json(), step=0)
  pred = npred.Predictor.load(path)
  states = _states(matmul_task)
  scores = tvm_cost_model.TLPCostModel(pred).predict(matmul_task, states)
  expected = pred.predict_steps(tvm_cost_model.states_to_steps(matmul_task, states))
  np.testing.assert_allclose(scores, np.asarray(expected, np.float32), rtol=1e-6)
  assert np.all(np.isfinite(scores)) and np.unique(scores).size > 1


@needs_tvm
def test_loop_model_scores_states_with_their_store_vectors(matmul_task, tmp_path):
  """A model of the "loop" feature version gets each state's loop-nest vectors from TVM."""
  stores, dim = 3, loop_features.feature_dim()
  crop = (25 + stores, 22 + dim)
  cfg = model_lib.TLPConfig(feature_dim=crop[1], seq_len=crop[0], encoder_dims=(16, 16),
                            attention_heads=2, res_blocks=1, decoder_dims=(16, 1),
                            input_norm="log1p")
  params = model_lib.TLPModel(cfg).init(jax.random.PRNGKey(0),
                                        np.zeros((1,) + crop, np.float32))["params"]
  path = str(tmp_path / "loop.npz")
  export.save_npz(path, params, cfg, hardware=["hw"], platform="llvm", crop=crop,
                  vocab_json=features.Vocabulary.original("llvm").to_json(), step=0,
                  loop_stores=stores, loop_dim=dim)
  pred = npred.Predictor.load(path)
  states = _states(matmul_task)
  scores = tvm_cost_model.TLPCostModel(pred).predict(matmul_task, states)
  vectors, _ = loop_features.store_features_from_states(matmul_task, states, stores)
  expected = pred.predict_steps(tvm_cost_model.states_to_steps(matmul_task, states),
                                store_features=vectors)
  np.testing.assert_allclose(scores, np.asarray(expected, np.float32), rtol=1e-6)
  assert vectors.any() and np.unique(scores).size > 1
