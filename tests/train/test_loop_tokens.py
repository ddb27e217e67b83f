"""Training, export and prediction with replayed loop tokens stored apart from the step features.

The dataset here is the built sample with synthetic float16 loop tokens (the layout's shape,
random values, real padding) and a hand-made skeleton collection: what the trainer, the export
and the predictor do with tokens does not depend on how they were made (tests/core covers that).
"""

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.core.test_loop_tokens import _STEPS
from tests.core.test_replay import _DENSE
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import predictor as npred
from tlp_jax.core import replay as rp
from tlp_jax.core import skeleton as sk
from tlp_jax.train import checkpoints, data, export, loop
from tlp_jax.train import model as model_lib
from tlp_jax.train import step as step_lib

T = lt.DEFAULT_MAX_TOKENS
W = lt.WIDTH


def _tokens(n, seed):
  """``(n, T, W)`` float16 tokens: a random number of real rows (is_loop = 1), zero padding."""
  rng = np.random.default_rng(seed)
  tok = rng.uniform(0, 8, size=(n, T, W)).astype(np.float16)
  tok[:, :, lt.C_IS_LOOP] = 1
  real = rng.integers(1, T + 1, size=n)
  tok[np.arange(T)[None, :] >= real[:, None]] = 0
  return tok


def _with_tokens(split, seed):
  fields = {f.name: getattr(split, f.name) for f in dataclasses.fields(split)}
  fields["loop_tokens"] = _tokens(len(split), seed)
  return types.SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def token_dataset(sample_arrays, tmp_path_factory):
  """The sample's epyc-9004 config as a dataset of loop tokens, with a skeletons file."""
  tlp = sample_arrays("epyc-9004")
  path = str(tmp_path_factory.mktemp("skeletons") / "skeletons.json")
  sk.save_collection(path, {"dense": sk.Skeleton.from_dict(_DENSE)})
  fields = {f.name: getattr(tlp, f.name) for f in dataclasses.fields(tlp)}
  fields.update(
    train=_with_tokens(tlp.train, 1),
    validation=_with_tokens(tlp.validation, 2),
    test=_with_tokens(tlp.test, 3),
    skeletons_path=path,
    metadata={
      **tlp.metadata,
      "loop_tokens": {"layout_version": lt.LAYOUT_VERSION, "max_tokens": T, "width": W},
    },
  )
  return types.SimpleNamespace(**fields)


def test_numpy_and_device_assembly_agree_bit_for_bit():
  rng = np.random.default_rng(0)
  steps = rng.normal(size=(7, 25, 22)).astype(np.float32)
  steps[:, 20:] = 0
  steps[0, 0, 0] = -0.0
  tokens = (rng.normal(size=(7, T, W)) * 1e3).astype(np.float16)
  tokens[:, 30:] = 0
  host = lt.model_input(steps, tokens)
  device = np.asarray(jax.jit(step_lib.model_input)(jnp.asarray(steps), jnp.asarray(tokens)))
  assert host.shape == device.shape == (7, 25 + T, 22 + W) and host.dtype == device.dtype
  assert np.array_equal(host.view(np.uint32), device.view(np.uint32))
  # Disjoint columns: steps in rows [:L] columns [:E], tokens in rows [L:] columns [E:].
  np.testing.assert_array_equal(host[:, :25, :22], steps)
  np.testing.assert_array_equal(host[:, 25:, 22:], tokens.astype(np.float32))
  assert not host[:, 25:, :22].any() and not host[:, :25, 22:].any()


def test_model_input_and_export_meta_follow_the_tokens(token_dataset):
  model = model_lib.TLPConfig()
  cfg = data.model_config_for(model, "auto", token_dataset, 1)
  assert (cfg.seq_len, cfg.feature_dim) == npred.input_shape((25, 22), (T, W))
  meta = data.dataset_meta(token_dataset, ["epyc-9004"], True)
  assert meta["crop"] == [25 + T, 22 + W]
  assert meta["loop_tokens"] == {"layout_version": lt.LAYOUT_VERSION, "max_tokens": T, "width": W}
  # "off": a TLP model of the step crop; a TLP build under "required" is refused.
  assert data.model_config_for(model, "off", token_dataset, 1) == dataclasses.replace(
    model, num_hardware_heads=1
  )
  assert "loop_tokens" not in data.dataset_meta(token_dataset, ["epyc-9004"], False)
  tlp = types.SimpleNamespace(metadata={}, config_name="epyc-9004")
  with pytest.raises(ValueError, match="has no loop tokens.*skeleton_extract --tenset_dir"):
    data.reads_loop_tokens("required", tlp)
  other = types.SimpleNamespace(
    **{
      **vars(token_dataset),
      "metadata": {
        "loop_tokens": {"layout_version": lt.LAYOUT_VERSION + 1, "max_tokens": T, "width": W}
      },
    }
  )
  with pytest.raises(ValueError, match=f"layout version {lt.LAYOUT_VERSION + 1}"):
    data.model_config_for(model, "auto", other, 1)
  assert data.model_config_for(model, "off", other, 1).seq_len == 25
  split = data.select_heads(token_dataset.train, [0], loop_tokens=True)
  assert split.loop_tokens.dtype == np.float16 and len(split.arrays) == 5
  layout = data.BatchLayout.create(8, jax.devices()[:2])
  x = data.host_batch(split, np.arange(8), np.ones(8, bool), layout)[0]
  assert x.shape == (2, 4, 25 + T, 22 + W)
  np.testing.assert_array_equal(
    x.reshape(8, 25 + T, 22 + W), lt.model_input(split.features[:8], split.loop_tokens[:8])
  )


@pytest.fixture(scope="module")
def token_runs(token_dataset, new_test_config, tmp_path_factory):
  """configs/test.py on the token dataset: resident on 8 devices, and gathered on the host."""
  runs = {}
  for placement in ("device", "host"):
    config = new_test_config()
    config.data_placement = placement
    config.num_epochs = 2
    # All T stored tokens (the default reads fewer: test_max_loop_tokens_crops_...).
    config.max_loop_tokens = 0
    workdir = str(tmp_path_factory.mktemp(placement) / "run")
    runs[placement] = (workdir, loop.train_and_evaluate(config, workdir, dataset=token_dataset))
  return runs


def test_training_reads_the_tokens_on_device_and_on_host_alike(token_runs):
  (_, dev), (_, host) = token_runs["device"], token_runs["host"]
  assert (dev.model_config.seq_len, dev.model_config.feature_dim) == (25 + T, 22 + W)
  for a, b in zip(*(jax.tree_util.tree_leaves(r.state.params) for r in (dev, host))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dev.validation["val_loss"], host.validation["val_loss"], rtol=1e-5)
  # The token embedding is trained: its input rows [25:] use the kernel's rows [22:].
  kernel = np.asarray(dev.state.params["encoder_0"]["kernel"])
  init = np.asarray(
    step_lib.create_train_state(dev.model_config, optax.sgd(0.0), 0).params["encoder_0"]["kernel"]
  )
  assert not np.allclose(kernel[22:], init[22:])


def test_export_embeds_layout_and_skeletons_and_predicts_like_flax(
  token_runs, token_dataset, tmp_path
):
  workdir, result = token_runs["device"]
  assert os.path.exists(os.path.join(workdir, checkpoints.SKELETONS_FILE))
  path = str(tmp_path / "tokens.npz")
  arrays = export.export_workdir(workdir, path, "latest")
  assert int(arrays[npred.META_FORMAT_VERSION]) == npred.FORMAT_VERSION == 5
  assert [
    int(arrays[k])
    for k in (
      npred.META_LOOP_TOKENS_VERSION,
      npred.META_LOOP_TOKENS_MAX,
      npred.META_LOOP_TOKENS_WIDTH,
    )
  ] == [lt.LAYOUT_VERSION, T, W]
  pred = npred.Predictor.load(path)
  assert pred.reads_loop_tokens and pred.step_crop == (25, 22) and pred.crop == (25 + T, 22 + W)
  assert set(pred.skeletons) == {"dense"}
  test = token_dataset.test
  steps, tokens = np.asarray(test.features[:300]), test.loop_tokens[:300]
  got = pred.predict(steps, loop_tokens=tokens, batch_size=128)
  flax = export.make_predict_fn(result.model_config, batch_size=128)(
    result.state.params, lt.model_input(steps, tokens)
  )[:, 0]
  np.testing.assert_allclose(got, flax, rtol=1e-4, atol=1e-5)
  assert np.unique(got).size > 100
  with pytest.raises(npred.PredictorError, match="pass loop_tokens"):
    pred.predict(steps)
  with pytest.raises(npred.PredictorError, match=rf"loop_tokens must be \(300, >=40, {lt.WIDTH}\)"):
    pred.predict(steps, loop_tokens=tokens[:, :, :20])
  # Longer token sequences are cropped (tokens are outermost first).
  longer = np.concatenate([tokens, np.ones((300, 3, W), np.float16)], axis=1)
  np.testing.assert_array_equal(pred.predict(steps, loop_tokens=longer, batch_size=128), got)

  # Raw steps of a task the export embeds: replayed over its skeleton, no TVM.
  progs = [_STEPS, [["SP", 3, 0, 8, [4], 1]] + _STEPS[1:], _STEPS]
  want_tokens = np.stack(
    [lt.loop_tokens(rp.replay(sk.Skeleton.from_dict(_DENSE), s)) for s in progs]
  )
  np.testing.assert_array_equal(pred.loop_tokens_of(progs, workload_key="dense"), want_tokens)
  want = pred.predict(pred.featurize_steps(progs), loop_tokens=want_tokens)
  np.testing.assert_array_equal(pred.predict_steps(progs, workload_key="dense"), want)
  np.testing.assert_array_equal(pred.predict_steps(progs, skeleton=json.dumps(_DENSE)), want)
  with pytest.raises(npred.PredictorError, match="pass workload_key="):
    pred.predict_steps(progs)
  with pytest.raises(npred.PredictorError, match="no embedded skeleton for workload key 'x'"):
    pred.predict_steps(progs, workload_key="x")


def test_max_loop_tokens_crops_every_split_and_the_export(token_dataset, new_test_config, tmp_path):
  """``config.max_loop_tokens``: the model reads each program's first tokens; its export says
  so, and its predictor crops longer token sequences the same way."""
  assert data.crop_loop_tokens(token_dataset, 0) is token_dataset
  assert data.crop_loop_tokens(token_dataset, T) is token_dataset
  cropped = data.crop_loop_tokens(token_dataset, 7)
  assert data.loop_token_shape(cropped) == (7, W) and data.loop_token_shape(token_dataset)[0] == T
  # The arrays stay as stored (memory-mapped in a real dataset); the model drops the rest.
  for name in ("train", "validation", "test"):
    assert getattr(cropped, name).loop_tokens is getattr(token_dataset, name).loop_tokens
  config = new_test_config()
  config.max_loop_tokens = 7
  config.num_epochs = 1
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(config, workdir, dataset=token_dataset)
  assert (result.model_config.seq_len, result.model_config.feature_dim) == (25 + 7, 22 + W)
  arrays = export.export_workdir(workdir, str(tmp_path / "t7.npz"), "latest")
  assert int(arrays[npred.META_LOOP_TOKENS_MAX]) == 7
  pred = npred.Predictor.load(str(tmp_path / "t7.npz"))
  test = token_dataset.test
  steps, tokens = np.asarray(test.features[:64]), test.loop_tokens[:64]
  flax = export.make_predict_fn(result.model_config, batch_size=64)(
    result.state.params, lt.model_input(steps, tokens[:, :7])
  )[:, 0]
  uncropped = export.make_predict_fn(result.model_config, batch_size=64)(
    result.state.params, lt.model_input(steps, tokens)
  )[:, 0]
  np.testing.assert_array_equal(uncropped, flax)  # the model reads its first 25 + 7 rows
  np.testing.assert_allclose(pred.predict(steps, loop_tokens=tokens), flax, rtol=1e-4, atol=1e-5)
  config.max_loop_tokens = -1
  with pytest.raises(ValueError, match="max_loop_tokens must be an integer >= 0"):
    loop.train_and_evaluate(config, str(tmp_path / "bad"), dataset=token_dataset)
  # A model that reads no tokens ignores their count and their layout, whatever it is.
  other = types.SimpleNamespace(
    **{
      **vars(token_dataset),
      "metadata": {
        **token_dataset.metadata,
        "loop_tokens": {"layout_version": lt.LAYOUT_VERSION + 1, "max_tokens": T, "width": W},
      },
    }
  )
  config.max_loop_tokens, config.loop_tokens = 7, "off"
  steps_only = loop.train_and_evaluate(config, str(tmp_path / "off"), dataset=other)
  assert (steps_only.model_config.seq_len, steps_only.model_config.feature_dim) == (25, 22)


def test_bad_embedded_skeletons_fail_at_load(token_runs, tmp_path):
  workdir, _ = token_runs["host"]
  arrays = export.export_workdir(workdir, str(tmp_path / "m.npz"), "latest")
  bad = dict(arrays)
  bad[npred.META_SKELETONS_JSON] = np.array('{"format": "nope"}')
  with pytest.raises(npred.PredictorError, match="tlp-jax-loopnest-skeletons"):
    npred.Predictor.from_arrays(bad)
  old = dict(arrays)
  old[npred.META_FORMAT_VERSION] = np.array(4, np.int64)
  with pytest.raises(npred.PredictorError, match="need format_version >= 5"):
    npred.Predictor.from_arrays(old)
  other = dict(arrays)
  other[npred.META_LOOP_TOKENS_VERSION] = np.array(lt.LAYOUT_VERSION + 1, np.int64)
  with pytest.raises(npred.PredictorError, match=f"layout version {lt.LAYOUT_VERSION + 1}"):
    npred.Predictor.from_arrays(other)
