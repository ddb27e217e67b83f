"""Tests of the online last-layer refit (tlp_jax/core/online.py) and the predictor's embeddings."""

import json

import numpy as np
import pytest

from tlp_jax.core import features, online
from tlp_jax.core import predictor as npred


def tiny_export(hardware=("hw",), seed=0, decoder_dims=(8, 4, 1), ensemble_size=1) -> dict:
  """A small random TLP export (step tokens, llvm), made with NumPy only."""
  rng = np.random.default_rng(seed)
  enc, heads = (8, 8), len(hardware)
  cfg = {
    "feature_dim": 22,
    "seq_len": 25,
    "encoder_dims": list(enc),
    "decoder_dims": list(decoder_dims),
    "attention_heads": 2,
    "res_blocks": 1,
    "num_hardware_heads": heads,
    "input_norm": "log1p",
    "dtype": "float32",
    "ensemble_size": ensemble_size,
  }
  shapes = {}
  fan_in = 22
  for i, dim in enumerate(enc):
    shapes[f"encoder_{i}/kernel"], shapes[f"encoder_{i}/bias"] = (fan_in, dim), (dim,)
    fan_in = dim
  for name in ("query", "key", "value", "out"):
    shapes[f"attention/{name}/kernel"], shapes[f"attention/{name}/bias"] = (
      (fan_in, fan_in),
      (fan_in,),
    )
  shapes["res_block_0/kernel"], shapes["res_block_0/bias"] = (fan_in, fan_in), (fan_in,)
  for i, dim in enumerate(decoder_dims):
    shapes[f"heads/dense_{i}/kernel"] = (heads, fan_in, dim)
    shapes[f"heads/dense_{i}/bias"] = (heads, dim)
    fan_in = dim
  prefix = npred.PARAMS_PREFIX + (npred.MEMBERS_PREFIX if ensemble_size > 1 else "")
  lead = (ensemble_size,) if ensemble_size > 1 else ()
  arrays = {
    prefix + k: (rng.standard_normal(lead + s) / np.sqrt(s[-2] if len(s) > 1 else 4)).astype(
      np.float32
    )
    for k, s in shapes.items()
  }
  vocab = features.Vocabulary.original("llvm").to_json()
  arrays.update(
    {
      npred.META_FORMAT: np.array(npred.FORMAT_NAME),
      npred.META_FORMAT_VERSION: np.array(npred.FORMAT_VERSION, np.int64),
      npred.META_MODEL_CONFIG: np.array(json.dumps(cfg)),
      npred.META_HARDWARE: np.array(list(hardware), dtype=np.str_),
      npred.META_PLATFORM: np.array("llvm"),
      npred.META_CROP: np.array([25, 22], np.int64),
      npred.META_VOCAB_JSON: np.array(vocab),
      npred.META_VOCAB_VERSION: np.array("test"),
      npred.META_STEP: np.array(0, np.int64),
    }
  )
  return arrays


def _programs(n, seed=0):
  """(n, 25, 22) step features with a varying number of real (non-zero) steps."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 4, (n, 25, 22)).astype(np.float32)
  x[np.arange(25)[None, :] >= rng.integers(3, 25, n)[:, None]] = 0.0
  return x


@pytest.mark.parametrize("decoder_dims", [(8, 4, 1), (1,)])
@pytest.mark.parametrize("ensemble_size", [1, 3])
def test_embeddings_times_the_last_layer_are_the_scores(decoder_dims, ensemble_size):
  pred = npred.Predictor(
    tiny_export(("a", "b"), decoder_dims=decoder_dims, ensemble_size=ensemble_size)
  )
  x = _programs(40)
  for hw in ("a", "b"):
    emb = pred.embed(x, hw=hw, batch_size=16)
    w, c = pred.last_layer(hw)
    assert emb.shape == (40, w.shape[0]) and emb.dtype == np.float32
    np.testing.assert_allclose(emb @ w + c, pred.predict(x, hw=hw), rtol=1e-4, atol=1e-4)
  with pytest.raises(npred.PredictorError, match="per head"):
    pred.embed(x, hw="all")


def _synthetic(num_tasks=12, per_task=60, d=6, seed=0):
  """Programs of tasks whose true speed is linear in the embedding, and a frozen model that
  ranks them wrongly (its last layer points partly against the truth)."""
  rng = np.random.default_rng(seed)
  w_true = rng.standard_normal(d)
  w_frozen = -0.6 * w_true + rng.standard_normal(d)  # wrong on this machine
  groups = np.repeat(np.arange(num_tasks), per_task)
  phi = rng.standard_normal((len(groups), d)) + rng.standard_normal((num_tasks, d))[groups]
  log_cost = -(phi @ w_true) + 3.0 * groups  # tasks differ in scale; only order within counts
  return phi, w_frozen, groups, np.exp(log_cost)


def _within_task_top1(scores, groups, costs):
  """Mean over tasks of best cost / cost of the program scored highest (TLP's top-1)."""
  out = []
  for g in np.unique(groups):
    m = groups == g
    out.append(costs[m].min() / costs[m][np.argmax(scores[m])])
  return float(np.mean(out))


def test_fit_improves_within_task_ranking_where_the_frozen_model_is_wrong():
  phi, w_frozen, groups, costs = _synthetic()
  # The tuner measured 20 programs of each task; judge on the other 40 of the same tasks.
  measured = (np.arange(len(groups)) % 60) < 20
  base = phi @ w_frozen
  dw, stats = online.fit(phi[measured], base[measured], groups[measured], costs[measured])
  held = ~measured
  before = _within_task_top1(base[held], groups[held], costs[held])
  after = _within_task_top1(base[held] + phi[held] @ dw, groups[held], costs[held])
  assert after > before + 0.2 and after > 0.8, (before, after)
  assert stats.measurements == measured.sum() and stats.tasks == 12
  assert stats.loss_after < stats.loss_before
  # Deterministic.
  again, _ = online.fit(phi[measured], base[measured], groups[measured], costs[measured])
  np.testing.assert_array_equal(dw, again)


def test_few_measurements_barely_move_the_model_and_more_move_it_further():
  phi, w_frozen, groups, costs = _synthetic()
  base = phi @ w_frozen
  sizes = []
  for per_task in (2, 5, 30):
    m = (np.arange(len(groups)) % 60) < per_task
    dw, _ = online.fit(phi[m], base[m], groups[m], costs[m])
    sizes.append(np.linalg.norm(dw))
  assert sizes[0] < sizes[1] < sizes[2]
  assert sizes[0] < 0.2 * sizes[2]


def test_pairs_are_within_tasks_and_failed_programs_are_left_out():
  groups = np.array([0, 0, 0, 1, 1, 2])
  costs = np.array([3.0, 1.0, np.inf, 2.0, 4.0, 1.0])
  i, j, w = online.ranking_pairs(groups, costs, max_pairs=100)
  assert sorted(zip(i.tolist(), j.tolist())) == [(1, 0), (3, 4)]
  np.testing.assert_allclose(sorted(w), sorted([np.log(3.0), np.log(2.0)]))
  # No pair at all: no change, no error.
  dw, stats = online.fit(np.ones((2, 3)), np.zeros(2), [0, 1], [1.0, 2.0])
  assert not dw.any() and stats.pairs == 0


def test_pairs_are_capped_deterministically():
  rng = np.random.default_rng(0)
  groups = np.repeat(np.arange(5), 200)  # 5 x 19,900 pairs
  costs = rng.uniform(1, 2, len(groups))
  i, j, w = online.ranking_pairs(groups, costs, max_pairs=1000, seed=3)
  assert 900 <= len(i) <= 1000
  assert np.all(groups[i] == groups[j]) and np.all(costs[i] < costs[j]) and np.all(w > 0)
  i2, j2, _ = online.ranking_pairs(groups, costs, max_pairs=1000, seed=3)
  np.testing.assert_array_equal(i, i2)
  np.testing.assert_array_equal(j, j2)
  # Every task gets its share.
  assert set(groups[i].tolist()) == set(range(5))


def test_bad_input_is_an_error():
  with pytest.raises(ValueError, match="one entry per program"):
    online.fit(np.ones((3, 2)), np.zeros(2), [0, 0, 0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="l2 > 0"):
    online.OnlineConfig(l2=0.0)
