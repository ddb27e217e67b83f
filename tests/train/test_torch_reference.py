"""The PyTorch reference of the throughput benchmark computes what the Flax model and loss compute.

Same weights (copied with ``load_flax_params``), same inputs: the forward pass, the LambdaRank
loss and its gradient, the parameter gradients and one full optimizer step of
``step_lib.train_step`` (original recipe: Adam with coupled L2, clip 0.5) must agree. Skipped
when torch is not installed (``pip install -e '.[bench]'``).
"""

import functools
import importlib.util
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[bench]')")

import jax
import jax.numpy as jnp

from configs import tlp_original
from tlp_jax.train import config as config_lib
from tlp_jax.train import data, losses, optimizer
from tlp_jax.train import model as model_lib
from tlp_jax.train import step as step_lib

_REF_PATH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "torch_tlp_reference.py"
# The original recipe: LambdaRank over the batch, Adam with coupled L2 at a constant rate.
ORIGINAL = config_lib.from_config_dict(tlp_original.get_config())


def _load_reference():
  spec = importlib.util.spec_from_file_location("torch_tlp_reference", _REF_PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


ref = _load_reference()


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _features(rng, batch, length=30, width=24):
  """Random features larger than the crop, with trailing all-zero padding steps, like TLP's."""
  x = rng.normal(size=(batch, length, width)).astype(np.float32)
  steps = rng.integers(3, length + 1, size=batch)
  x[np.arange(length)[None, :] >= steps[:, None]] = 0.0
  return x


def _labels(rng, n):
  # TLP scores in (0, 1], with ties (same program measured alike) and a few zeros.
  y = rng.choice(np.linspace(0.05, 1.0, 12), size=n).astype(np.float32)
  y[rng.random(n) < 0.1] = 0.0
  return y


@pytest.fixture(scope="module")
def flax_and_torch():
  cfg = model_lib.TLPConfig()
  params = model_lib.init_params(cfg, jax.random.PRNGKey(3))
  tmodel = ref.TLPTorchModel(ref.model_config_from_tlp(cfg))
  ref.load_flax_params(tmodel, params)
  return cfg, params, tmodel


def test_forward_matches_flax(flax_and_torch):
  cfg, params, tmodel = flax_and_torch
  x = _features(np.random.default_rng(0), 32)
  want = np.asarray(model_lib.TLPModel(cfg).apply({"params": params}, x))[:, 0]
  with torch.no_grad():
    got = tmodel(torch.from_numpy(x)).numpy()
  assert got.shape == (32,)
  assert _rel(got, want) < 1e-5


def test_load_rejects_wrong_shapes(flax_and_torch):
  _, params, _ = flax_and_torch
  narrow = jax.tree_util.tree_map(np.asarray, params)
  narrow["encoder_0"] = {
    "kernel": np.zeros((22, 32), np.float32),
    "bias": np.zeros((32,), np.float32),
  }
  with pytest.raises(ValueError, match="shape mismatch"):
    ref.load_flax_params(ref.TLPTorchModel(), narrow)
  two_heads = jax.tree_util.tree_map(np.asarray, params)
  two_heads["heads"] = jax.tree_util.tree_map(lambda a: np.concatenate([a, a]), params["heads"])
  with pytest.raises(ValueError, match="one output head"):
    ref.load_flax_params(ref.TLPTorchModel(), two_heads)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lambdarank_value_and_grad_match(seed):
  rng = np.random.default_rng(seed)
  n = 96
  preds = rng.normal(size=n).astype(np.float32) * 3
  labels = _labels(rng, n)
  cfg = ORIGINAL.loss

  def jax_loss(p):
    return losses.multi_head_loss(
      cfg, p[:, None], jnp.asarray(labels)[:, None], jnp.ones((n, 1), bool)
    )

  want, want_grad = jax.value_and_grad(jax_loss)(jnp.asarray(preds))
  for boolean_index in (True, False):
    tp = torch.tensor(preds, requires_grad=True)
    got = ref.lambdarank_loss(tp, torch.from_numpy(labels), boolean_index=boolean_index)
    got.backward()
    assert abs(got.item() - float(want)) <= 1e-5 * abs(float(want))
    assert _rel(tp.grad.numpy(), want_grad) < 1e-5


def _pmap_step(cfg, tx):
  return jax.pmap(
    functools.partial(
      step_lib.train_step, model=model_lib.TLPModel(cfg), tx=tx, loss_config=ORIGINAL.loss
    ),
    axis_name=data.AXIS,
    devices=jax.devices()[:1],
  )


def test_train_step_matches_torch_step():
  """Gradients and one optimizer step of step.train_step (original recipe) equal the reference's."""
  cfg = ORIGINAL.model
  tx, _ = optimizer.make_optimizer(ORIGINAL.optim, steps_per_epoch=1, total_steps=1)
  state = step_lib.create_train_state(cfg, tx, seed=5)
  rng = np.random.default_rng(7)
  b = 64
  x, y = _features(rng, b), _labels(rng, b)

  tmodel = ref.TLPTorchModel(ref.model_config_from_tlp(cfg))
  ref.load_flax_params(tmodel, jax.device_get(state.params))
  trainer = ref.TorchTrainer(tmodel, ref.TorchTrainConfig())

  # Parameter gradients of the loss (before clipping).
  def loss_of(params):
    preds = model_lib.TLPModel(cfg).apply({"params": params}, x)
    return losses.multi_head_loss(ORIGINAL.loss, preds, y[:, None], np.ones((b, 1), bool))

  jgrads = jax.grad(loss_of)(state.params)
  tmodel.zero_grad()
  ref.lambdarank_loss(tmodel(torch.from_numpy(x)), torch.from_numpy(y)).backward()
  assert _rel(tmodel.encoder[0].weight.grad.numpy().T, jgrads["encoder_0"]["kernel"]) < 1e-4
  assert (
    _rel(
      tmodel.attention.in_proj_weight.grad.numpy()[:256].T, jgrads["attention"]["query"]["kernel"]
    )
    < 1e-4
  )
  assert (
    _rel(tmodel.decoder[-1].weight.grad.numpy().T, jgrads["heads"]["dense_3"]["kernel"][0]) < 1e-4
  )

  # One full step each.
  rstate = data.replicate_to_devices(state, jax.devices()[:1])
  batch = (x[None], y[None, :, None], np.ones((1, b, 1), bool), np.zeros((1, b), np.int32))
  rstate, metrics = _pmap_step(cfg, tx)(rstate, *batch)
  tloss = trainer.step(torch.from_numpy(x), torch.from_numpy(y))
  assert abs(tloss.item() - float(metrics["loss"][0])) <= 1e-5 * abs(tloss.item())
  new_params = jax.device_get(jax.tree_util.tree_map(lambda a: a[0], rstate.params))
  moved = np.abs(
    new_params["res_block_0"]["kernel"] - np.asarray(state.params["res_block_0"]["kernel"])
  )
  assert moved.max() > 1e-4  # the step did change the parameters
  # Adam's first step is ~lr * sign(g): compare the updated weights to a small fraction of lr.
  for name, linear in (("res_block_0", tmodel.res_blocks[0][0]), ("encoder_1", tmodel.encoder[2])):
    diff = np.abs(linear.weight.detach().numpy().T - new_params[name]["kernel"])
    assert np.quantile(diff, 0.999) < 7e-4 * 1e-2, name
  diff = np.abs(
    tmodel.attention.out_proj.weight.detach().numpy().T - new_params["attention"]["out"]["kernel"]
  )
  assert np.quantile(diff, 0.999) < 7e-4 * 1e-2
