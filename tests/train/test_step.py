"""Data-parallel training step: 8 CPU devices (see conftest) against 1 device."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from tlp_jax.train import data, loop, losses, optimizer
from tlp_jax.train import model as model_lib
from tlp_jax.train import step as step_lib

L, E, H = 6, 5, 2
TINY = model_lib.TLPConfig(
  feature_dim=E,
  seq_len=L,
  encoder_dims=(8, 8, 16, 16),
  attention_heads=2,
  res_blocks=1,
  decoder_dims=(16, 8, 1),
  num_hardware_heads=H,
)
LOSS = losses.LossConfig("lambdarank", group_by_task=False)
# Adam with coupled L2 at a constant rate (TLP's StepLR with rate 1.0), as configs/tlp_original.
ADAM = optimizer.OptimConfig(
  optimizer="adam",
  schedule="step",
  learning_rate=3e-3,
  weight_decay=1e-6,
  grad_clip_norm=0.5,
  warmup_epochs=0.0,
  end_learning_rate=0.0,
  step_decay_every_epochs=1,
  step_decay_rate=1.0,
)


def _batch(n, seed=0, tasks=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, L, E)).astype(np.float32)
  scores = rng.uniform(0.05, 1.0, size=(n, H)).astype(np.float32)
  mask = rng.random((n, H)) > 0.15
  task = rng.integers(0, tasks, n).astype(np.int32)
  return x, scores, mask, task


def _shard(arrays, devices):
  return tuple(a.reshape((devices, -1) + a.shape[1:]) for a in arrays)


def _pmapped_step(tx, devices):
  fn = functools.partial(
    step_lib.train_step, model=model_lib.TLPModel(TINY), tx=tx, loss_config=LOSS
  )
  return jax.pmap(fn, axis_name=data.AXIS, devices=devices)


def _global_loss(params, batch):
  x, s, m, t = batch
  preds = model_lib.TLPModel(TINY).apply({"params": params}, x)
  return jnp.sum(step_lib.per_head_losses(LOSS, preds, s, m, t))


def _unreplicate(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a[0]), tree)


def test_eight_devices_available():
  assert jax.device_count() == 8


def test_one_step_lowers_loss_and_keeps_replicas_identical():
  devices = jax.devices()
  tx, _ = optimizer.make_optimizer(ADAM, 1, 1)
  state = step_lib.create_train_state(TINY, tx, seed=0)
  batch = _batch(64)
  before = float(_global_loss(state.params, batch))
  rstate = data.replicate_to_devices(state, devices)
  rstate, metrics = _pmapped_step(tx, devices)(rstate, *_shard(batch, len(devices)))
  # The reported loss is the global-batch loss before the update, identical on every device.
  np.testing.assert_allclose(np.asarray(metrics["loss"]), before, rtol=1e-5)
  for leaf in jax.tree_util.tree_leaves(rstate):
    leaf = np.asarray(leaf)
    for i in range(1, len(devices)):
      np.testing.assert_array_equal(leaf[i], leaf[0])
  after = float(_global_loss(_unreplicate(rstate.params), batch))
  assert after < before
  assert int(_unreplicate(rstate.step)) == 1


def test_gradient_is_the_single_device_global_batch_gradient():
  # With SGD(lr=1) the parameter change is exactly -grad, so the 8-device gradient (all-gathered
  # predictions, sliced prediction gradients, psum) can be compared with jax.grad on one device.
  devices = jax.devices()
  tx = optax.sgd(1.0)
  state = step_lib.create_train_state(TINY, tx, seed=1)
  batch = _batch(64, seed=1)
  want = jax.grad(_global_loss)(state.params, batch)
  rstate = data.replicate_to_devices(state, devices)
  rstate, _ = _pmapped_step(tx, devices)(rstate, *_shard(batch, len(devices)))
  got = jax.tree_util.tree_map(
    lambda new, old: np.asarray(old) - new, _unreplicate(rstate.params), state.params
  )
  # atol: the parameter difference (old - new) of float32 params resolves gradients to ~1e-7.
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=5e-6)
  assert any(np.abs(np.asarray(w)).max() > 0 for w in jax.tree_util.tree_leaves(want))


def test_eight_and_one_device_steps_agree():
  # SGD with momentum (optimizer state carried over steps) rather than Adam: LambdaRank is
  # invariant to a shift of the predictions and softmax to a shift of the attention keys, so some
  # true gradients are exactly zero and their float rounding differs with the reduction order;
  # Adam normalises such noise to learning-rate-sized steps, SGD keeps it at rounding level.
  tx = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.05, momentum=0.9))
  state = step_lib.create_train_state(TINY, tx, seed=2)
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    step = _pmapped_step(tx, devices)
    rstate = data.replicate_to_devices(state, devices)
    for s in range(3):
      rstate, _ = step(rstate, *_shard(_batch(32, seed=10 + s), len(devices)))
    results.append(_unreplicate(rstate.params))
  for a, b in zip(*map(jax.tree_util.tree_leaves, results)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@dataclasses.dataclass
class _Split:
  features: np.ndarray
  scores: np.ndarray
  mask: np.ndarray
  task_index: np.ndarray


@dataclasses.dataclass
class _Dataset:
  train: _Split
  validation: _Split
  test: _Split
  hardware: tuple = ("hw-a", "hw-b")
  platform: str = "llvm"
  crop: tuple = (L, E)
  vocab_json: str = "{}"


def _config(batch):
  """configs/test.py with TINY's model and ``batch``."""
  config = test_config.get_config()
  config.model.seq_len, config.model.feature_dim = L, E
  config.model.encoder_dims = TINY.encoder_dims
  config.model.attention_heads = TINY.attention_heads
  config.model.decoder_dims = TINY.decoder_dims
  config.num_epochs = 2
  config.checkpoint_every_steps = 0
  config.batch_size = batch
  return config


def test_full_runs_agree_across_device_counts_and_data_placement(tmp_path):
  # 8 devices with the training set resident on device vs 1 device gathering on the host:
  # same global batches (padded last batch included), so the same parameters. MSE, because with
  # LambdaRank the output bias has an exactly-zero gradient that Adam turns from rounding noise
  # into learning-rate-sized, reduction-order-dependent steps (see the test above).
  ds = _Dataset(
    _Split(*_batch(150, seed=3)), _Split(*_batch(40, seed=4)), _Split(*_batch(8, seed=5))
  )
  runs = []
  for name, devices, placement in (
    ("eight", jax.devices(), "device"),
    ("one", jax.devices()[:1], "host"),
  ):
    config = _config(32)
    config.data_placement = placement
    config.loss.name = "mse"
    runs.append(loop.train_and_evaluate(config, str(tmp_path / name), dataset=ds, devices=devices))
  assert int(runs[0].state.step) == int(runs[1].state.step) == 2 * 5
  for a, b in zip(*(jax.tree_util.tree_leaves(r.state.params) for r in runs)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for key in ("val_loss", "val_top1/hw-a"):
    np.testing.assert_allclose(runs[0].validation[key], runs[1].validation[key], rtol=1e-4)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="batch size 60 is not divisible by the number of devices 8"):
    data.BatchLayout.create(60, jax.devices())
  ds = _Dataset(_Split(*_batch(16)), _Split(*_batch(8)), _Split(*_batch(8)))
  with pytest.raises(ValueError, match="not divisible"):
    loop.train_and_evaluate(_config(12), str(tmp_path / "w"), dataset=ds)
  # The same batch is fine on devices that divide it.
  assert data.BatchLayout.create(12, jax.devices()[:4]).per_device == 3


def test_ensemble_members_train_as_independent_models():
  # One step of a 3-member ensemble (8 devices) equals one step of each member trained alone
  # (1 device) from the member's own parameters: own loss, own gradient clip, own Adam moments.
  ens_cfg = dataclasses.replace(TINY, ensemble_size=3)
  # Coupled L2 ("adam") adds the decay after the clip, so a clip that scaled a member by another
  # member's norm would change its update (Adam alone is nearly scale-invariant).
  opt = dataclasses.replace(ADAM, weight_decay=0.5, grad_clip_norm=0.05)
  tx_ens, _ = optimizer.make_optimizer(opt, 1, 1, ensemble_size=3)
  tx_one, _ = optimizer.make_optimizer(opt, 1, 1)
  state = step_lib.create_train_state(ens_cfg, tx_ens, seed=0)
  batch = _batch(64, seed=3)
  fn = functools.partial(
    step_lib.train_step, model=model_lib.TLPModel(ens_cfg), tx=tx_ens, loss_config=LOSS
  )
  devices = jax.devices()
  step = jax.pmap(fn, axis_name=data.AXIS, devices=devices)
  rstate, metrics = step(data.replicate_to_devices(state, devices), *_shard(batch, len(devices)))
  ens_after = _unreplicate(rstate.params)["members"]

  one_step = jax.pmap(
    functools.partial(
      step_lib.train_step, model=model_lib.TLPModel(TINY), tx=tx_one, loss_config=LOSS
    ),
    axis_name=data.AXIS,
    devices=devices[:1],
  )
  losses_alone = []
  for m in range(3):
    params = jax.tree_util.tree_map(lambda a, m=m: np.asarray(a[m]), state.params["members"])
    alone = step_lib.TrainState(
      step=state.step, params=params, opt_state=tx_one.init(params), rng=state.rng
    )
    alone, alone_metrics = one_step(
      data.replicate_to_devices(alone, devices[:1]), *_shard(batch, 1)
    )
    losses_alone.append(np.asarray(alone_metrics["loss_per_head"])[0])
    alone_leaves = jax.tree_util.tree_flatten_with_path(_unreplicate(alone.params))[0]
    for got, (path, want) in zip(jax.tree_util.tree_leaves(ens_after), alone_leaves):
      # The attention's key bias adds q . b_k to every logit of a query's row, which the softmax
      # ignores: its exact gradient is 0, the computed one rounding noise of the fused q/k/v GEMM
      # (batched differently for 3 members than for 1), and Adam scales noise up to ~lr steps.
      if jax.tree_util.keystr(path) == "['attention']['key']['bias']":
        assert np.all(np.abs(got[m] - want) < 5 * ADAM.learning_rate)
        continue
      np.testing.assert_allclose(got[m], want, rtol=1e-3, atol=1e-5)
  # Reported per-head losses are the members' mean (comparable with a single model's).
  np.testing.assert_allclose(
    np.asarray(metrics["loss_per_head"])[0], np.mean(losses_alone, axis=0), rtol=1e-4
  )


@pytest.mark.parametrize("num_devices", [1, 8])
def test_multi_step_call_equals_single_steps(num_devices):
  """``train_steps_resident`` with ``num_steps=3`` ends in the state of three single
  ``train_step_resident`` calls, and stacks their metrics, on 1 and on 8 devices.

  Up to float rounding: XLA compiles the step inside the scan's loop apart from the step alone,
  and may fuse (so round) differently. So SGD with momentum, not Adam, for the reason given in
  ``test_eight_and_one_device_steps_agree``."""
  devices = jax.devices()[:num_devices]
  tx = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.05, momentum=0.9))
  x, s, m, t = _batch(128, seed=7)
  order = np.random.default_rng(1).permutation(128).astype(np.int32)
  kwargs = dict(
    steps_per_epoch=4, global_batch=32, model=model_lib.TLPModel(TINY), tx=tx, loss_config=LOSS
  )
  resident = data.replicate_to_devices((x, s, m, t), devices)
  order_dev = data.replicate_to_devices((order, np.ones(128, bool)), devices)
  one = jax.pmap(
    functools.partial(step_lib.train_step_resident, **kwargs), axis_name=data.AXIS, devices=devices
  )
  many = jax.pmap(
    functools.partial(step_lib.train_steps_resident, num_steps=3, **kwargs),
    axis_name=data.AXIS,
    devices=devices,
  )
  state = data.replicate_to_devices(step_lib.create_train_state(TINY, tx, seed=3), devices)
  singles = []
  single_state = state
  for _ in range(3):
    single_state, metrics = one(single_state, resident, *order_dev)
    singles.append(_unreplicate(metrics))
  multi_state, stacked = many(state, resident, *order_dev)
  assert int(_unreplicate(multi_state).step) == 3
  moved = 0.0
  for a, b, c in zip(*map(jax.tree_util.tree_leaves, (single_state, multi_state, state))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)
    moved = max(moved, float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(c)))))
  assert moved > 1e-3  # the steps trained: the tolerance is far below what they changed
  stacked = _unreplicate(stacked)
  for key in ("loss", "loss_per_head", "grad_norm"):
    expected = np.stack([g[key] for g in singles])
    assert stacked[key].shape == expected.shape, key
    np.testing.assert_allclose(stacked[key], expected, rtol=2e-5, err_msg=key)
