"""Tests for tlp_jax.train.model: shapes, stacked vmap heads, head isolation, config options."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlp_jax.train import losses
from tlp_jax.train import model as model_lib
from tlp_jax.train.model import TLPConfig, TLPModel

# Jitted: eager op-by-op initialisation of the full-size model is slow on 2 cores.
init_params = jax.jit(model_lib.init_params, static_argnums=0)

SMALL = dict(feature_dim=6, seq_len=5, encoder_dims=(8, 16), attention_heads=2, decoder_dims=(8, 1))


def _x(batch, cfg, seed=0, pad_from=None):
  x = np.random.default_rng(seed).normal(size=(batch, cfg.seq_len, cfg.feature_dim))
  if pad_from is not None:
    x[:, pad_from:] = 0.0
  return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("num_heads", [1, 3])
def test_output_shape_default_dims(num_heads):
  cfg = TLPConfig(num_hardware_heads=num_heads)
  params = init_params(cfg, jax.random.PRNGKey(0))
  out = jax.jit(TLPModel(cfg).apply)({"params": params}, _x(4, cfg))
  assert out.shape == (4, num_heads)
  assert out.dtype == jnp.float32
  # Original layer widths.
  assert params["encoder_0"]["kernel"].shape == (22, 64)
  assert params["encoder_3"]["kernel"].shape == (256, 256)
  assert params["attention"]["query"]["kernel"].shape == (256, 256)
  assert "res_block_1" in params and "res_block_2" not in params


def test_vmap_heads_have_stacked_distinct_params():
  cfg = TLPConfig(num_hardware_heads=3, **SMALL)
  params = init_params(cfg, jax.random.PRNGKey(0))
  heads = params["heads"]
  assert heads["dense_0"]["kernel"].shape == (3, 16, 8)
  assert heads["dense_1"]["kernel"].shape == (3, 8, 1)
  assert heads["dense_1"]["bias"].shape == (3, 1)
  k = np.asarray(heads["dense_0"]["kernel"])
  assert not np.allclose(k[0], k[1]) and not np.allclose(k[1], k[2])


def test_torch_style_init_bounds():
  cfg = TLPConfig()
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert np.abs(params["encoder_0"]["kernel"]).max() <= 1 / np.sqrt(22)
  assert np.abs(params["encoder_0"]["bias"]).max() <= 1 / np.sqrt(22)
  assert np.abs(params["attention"]["query"]["kernel"]).max() <= np.sqrt(6 / (4 * 256))
  assert np.all(params["attention"]["query"]["bias"] == 0)
  assert np.all(params["attention"]["out"]["bias"] == 0)


def test_gradient_from_one_head_changes_only_that_head():
  cfg = TLPConfig(num_hardware_heads=3, **SMALL)
  model = TLPModel(cfg)
  params = init_params(cfg, jax.random.PRNGKey(0))
  x = _x(12, cfg, seed=1)
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.uniform(size=(12, 3)), jnp.float32)
  mask = jnp.zeros((12, 3), bool).at[:, 1].set(True)
  loss = losses.LossConfig("lambdarank", group_by_task=False)

  def objective(p):
    return losses.multi_head_loss(loss, model.apply({"params": p}, x), labels, mask)

  tx = optax.sgd(0.1)
  grads = jax.jit(jax.grad(objective))(params)
  updates, _ = tx.update(grads, tx.init(params))
  new = optax.apply_updates(params, updates)
  for name in ("dense_0", "dense_1"):
    for leaf in ("kernel", "bias"):
      old_p, new_p = np.asarray(params["heads"][name][leaf]), np.asarray(new["heads"][name][leaf])
      np.testing.assert_array_equal(old_p[0], new_p[0])
      np.testing.assert_array_equal(old_p[2], new_p[2])
  assert not np.allclose(
    params["heads"]["dense_0"]["kernel"][1], new["heads"]["dense_0"]["kernel"][1]
  )
  # The shared trunk learns from head 1 too.
  assert not np.allclose(params["encoder_0"]["kernel"], new["encoder_0"]["kernel"])


def _reference_forward(params, x, cfg):
  """Independent NumPy forward of the original TLP model (no options)."""
  p = jax.tree_util.tree_map(np.asarray, params)

  def relu(a):
    return np.maximum(a, 0)

  h = np.asarray(x, np.float64)
  for i in range(len(cfg.encoder_dims)):
    h = relu(h @ p[f"encoder_{i}"]["kernel"] + p[f"encoder_{i}"]["bias"])
  a = p["attention"]
  nh, dh = cfg.attention_heads, cfg.hidden_dim // cfg.attention_heads
  outs = []
  for b in range(h.shape[0]):
    q = h[b] @ a["query"]["kernel"] + a["query"]["bias"]
    k = h[b] @ a["key"]["kernel"] + a["key"]["bias"]
    v = h[b] @ a["value"]["kernel"] + a["value"]["bias"]
    ctx = np.zeros_like(q)
    for j in range(nh):
      sl = slice(j * dh, (j + 1) * dh)
      logits = q[:, sl] @ k[:, sl].T / np.sqrt(dh)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      ctx[:, sl] = w @ v[:, sl]
    outs.append(ctx @ a["out"]["kernel"] + a["out"]["bias"])
  h = np.stack(outs) + h
  for i in range(cfg.res_blocks):
    h = relu(h @ p[f"res_block_{i}"]["kernel"] + p[f"res_block_{i}"]["bias"]) + h
  res = []
  for head in range(cfg.num_hardware_heads):
    y = h
    n = len(cfg.decoder_dims)
    for i in range(n):
      y = y @ p["heads"][f"dense_{i}"]["kernel"][head] + p["heads"][f"dense_{i}"]["bias"][head]
      if i < n - 1:
        y = relu(y)
    res.append(y[..., 0].sum(-1))
  return np.stack(res, -1)


def test_matches_independent_reference_forward():
  cfg = TLPConfig(num_hardware_heads=2, **SMALL)
  params = init_params(cfg, jax.random.PRNGKey(3))
  x = _x(3, cfg, seed=2, pad_from=3)
  got = np.asarray(TLPModel(cfg).apply({"params": params}, x))
  np.testing.assert_allclose(got, _reference_forward(params, x, cfg), rtol=1e-5, atol=1e-5)


def test_crops_wider_inputs_and_rejects_narrower():
  cfg = TLPConfig(**SMALL)
  params = init_params(cfg, jax.random.PRNGKey(0))
  x = _x(2, cfg)
  wide = jnp.concatenate([x, jnp.ones((2, cfg.seq_len, 3))], axis=-1)
  wide = jnp.concatenate([wide, jnp.ones((2, 2, cfg.feature_dim + 3))], axis=1)
  model = TLPModel(cfg)
  np.testing.assert_array_equal(
    model.apply({"params": params}, wide), model.apply({"params": params}, x)
  )
  with pytest.raises(ValueError, match="smaller"):
    model.apply({"params": params}, x[:, :, :-1])


def test_padding_rows_count_as_in_the_original():
  base = TLPConfig(**SMALL)
  params = init_params(base, jax.random.PRNGKey(0))
  x = _x(2, base, pad_from=3)
  # The number of padding rows matters: 3 real steps in seq_len 5 vs 6.
  longer = dataclasses.replace(base, seq_len=6)
  x6 = jnp.concatenate([x, jnp.zeros((2, 1, base.feature_dim))], axis=1)
  orig5 = TLPModel(base).apply({"params": params}, x)
  orig6 = TLPModel(longer).apply({"params": params}, x6)
  assert not np.allclose(orig5, orig6)


def test_log1p_input_norm_changes_outputs_and_keeps_padding_zero():
  base = TLPConfig(**SMALL)
  params = init_params(base, jax.random.PRNGKey(0))
  x = _x(4, base, pad_from=2) * 50
  ref = np.asarray(TLPModel(base).apply({"params": params}, x))
  out = np.asarray(
    TLPModel(dataclasses.replace(base, input_norm="log1p")).apply({"params": params}, x)
  )
  assert out.shape == ref.shape and not np.allclose(out, ref)
  np.testing.assert_array_equal(model_lib.INPUT_NORMS["log1p"](jnp.zeros(3)), np.zeros(3))
  np.testing.assert_allclose(
    model_lib.INPUT_NORMS["log1p"](jnp.asarray([-(np.e - 1), np.e - 1])), [-1.0, 1.0], rtol=1e-6
  )


def test_bfloat16_compute_runs():
  cfg = TLPConfig(dtype="bfloat16", **SMALL)
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert params["encoder_0"]["kernel"].dtype == jnp.float32
  out = TLPModel(cfg).apply({"params": params}, _x(2, cfg))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


def test_config_validation_and_roundtrip():
  with pytest.raises(ValueError, match="input_norm"):
    TLPConfig(input_norm="zscore")
  with pytest.raises(ValueError, match="end in 1"):
    TLPConfig(decoder_dims=(8, 2))
  with pytest.raises(ValueError, match="divisible"):
    TLPConfig(attention_heads=7)
  cfg = TLPConfig(num_hardware_heads=2, encoder_dims=[64, 128, 256, 256], input_norm="log1p")
  assert hash(cfg) == hash(TLPConfig.from_dict(cfg.to_dict()))
  assert TLPConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown"):
    TLPConfig.from_dict({"bogus": 1})


def test_from_dict_reads_the_model_configs_of_earlier_versions():
  old = dict(
    TLPConfig(num_hardware_heads=2).to_dict(),
    padding_mask=False,
    pool="sum",
    input_norm_columns=None,
  )
  old["num_heads"] = old.pop("num_hardware_heads")
  assert TLPConfig.from_dict(old) == TLPConfig(num_hardware_heads=2)
  for removed, value in (
    ("padding_mask", True),
    ("pool", "mean_valid"),
    ("input_norm_columns", [0, 2]),
  ):
    with pytest.raises(ValueError, match=f"{removed}=.* was removed .*4fe3f70"):
      TLPConfig.from_dict(dict(old, **{removed: value}))


def test_ensemble_is_the_mean_of_independent_members():
  single = TLPConfig(
    encoder_dims=(8, 16), attention_heads=2, decoder_dims=(8, 1), num_hardware_heads=2
  )
  ens = dataclasses.replace(single, ensemble_size=3)
  params = init_params(ens, jax.random.PRNGKey(0))
  assert set(params) == {"members"}
  x = _x(5, ens)
  members = np.asarray(TLPModel(ens).apply({"params": params}, x, per_member=True))
  assert members.shape == (5, 3, 2)
  for m in range(3):
    p_m = jax.tree_util.tree_map(lambda a, m=m: a[m], params["members"])
    np.testing.assert_allclose(
      members[:, m], TLPModel(single).apply({"params": p_m}, x), rtol=1e-5, atol=1e-5
    )
  # Members are initialised independently, so they disagree.
  assert np.abs(members[:, 0] - members[:, 1]).max() > 1e-3
  np.testing.assert_allclose(
    TLPModel(ens).apply({"params": params}, x), members.mean(axis=1), rtol=1e-6, atol=1e-6
  )
  # A single model's tree and outputs are unchanged by the ensemble code path.
  p1 = init_params(single, jax.random.PRNGKey(0))
  assert "members" not in p1
  np.testing.assert_array_equal(
    TLPModel(single).apply({"params": p1}, x, per_member=True)[:, 0],
    TLPModel(single).apply({"params": p1}, x),
  )
  with pytest.raises(ValueError, match="ensemble_size"):
    TLPConfig(ensemble_size=0)


def test_auto_dtype_is_bfloat16_on_accelerators_and_must_be_resolved():
  assert model_lib.resolve_dtype("auto", "cpu") == "float32"
  assert model_lib.resolve_dtype("auto", "gpu") == "bfloat16"
  assert model_lib.resolve_dtype("auto", "tpu") == "bfloat16"
  assert model_lib.resolve_dtype("float32", "gpu") == "float32"  # a concrete dtype is kept
  cfg = TLPConfig(**SMALL, dtype="auto")
  with pytest.raises(ValueError, match="resolve"):
    init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(TypeError):
    TLPConfig(**SMALL, dtype="float33")


def test_auto_attention_is_cudnn_only_for_half_precision_on_nvidia_gpus():
  resolve = model_lib.resolve_attention
  assert resolve("auto", "bfloat16", cuda=True) == "cudnn_pad8"
  assert resolve("auto", "float16", cuda=True) == "cudnn_pad8"
  # cuDNN's fused attention takes no float32 inputs; CPUs, TPUs and ROCm GPUs have no cuDNN.
  assert resolve("auto", "float32", cuda=True) == "einsum_pad8"
  assert resolve("auto", "bfloat16", cuda=False) == "einsum_pad8"
  assert resolve("einsum", "bfloat16", cuda=True) == "einsum"  # an explicit choice is kept


@pytest.mark.parametrize("impl", ["xla", "einsum_pad8", "einsum_pad4", "xla_pad8"])
@pytest.mark.parametrize("ensemble", [1, 2])
def test_other_attention_paths_are_the_same_function(ensemble, impl):
  """``attention_impl`` "<kind>_padN" pads the token axis (5 tokens here) inside the layer and
  masks the padded keys; "xla"/"cudnn" go through jax.nn.dot_product_attention (its "cudnn"
  kernel on a GPU; its XLA backend runs here). Each must give the reference's outputs and
  gradients for the same parameters."""
  cfg = TLPConfig(**SMALL, ensemble_size=ensemble)
  assert cfg.seq_len % 4 and cfg.seq_len % 8  # the padded paths do pad
  params = init_params(cfg, jax.random.PRNGKey(0))
  x = _x(4, cfg)

  def loss(p, impl):
    return jnp.sum(TLPModel(cfg, attention_impl=impl).apply({"params": p}, x) ** 2)

  ref, ref_grad = jax.value_and_grad(loss)(params, "einsum")
  got, got_grad = jax.value_and_grad(loss)(params, impl)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(got_grad), jax.tree_util.tree_leaves(ref_grad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="implementation"):
    TLPModel(cfg, attention_impl="nope").apply({"params": params}, x)


def test_dense_params_have_the_tree_and_init_of_the_plain_layer():
  """The fused q/k/v projection declares its parameters with ``DenseParams``: the names, shapes
  and initial values of the ``nn.Dense`` layers they replace, and the same product."""
  import flax.linen as nn

  init = model_lib._uniform(0.3)

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, kernel_init=init, bias_init=init, name="layer")(x)

  class Split(nn.Module):
    @nn.compact
    def __call__(self, x):
      kernel, bias = model_lib.DenseParams(5, 3, init, init, name="layer")()
      return model_lib._matmul(x, kernel, bias, jnp.float32)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 5)), jnp.float32)
  rng = jax.random.PRNGKey(7)
  plain, split = Plain().init(rng, x), Split().init(rng, x)
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(split)
  for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(split)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(
    np.asarray(Split().apply(plain, x)), np.asarray(Plain().apply(plain, x)), rtol=1e-6
  )
