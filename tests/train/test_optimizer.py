"""tlp_jax.train.optimizer: schedules, Adam with coupled L2, per-member gradient clipping."""

import dataclasses
import logging
import math

import numpy as np
import optax
import pytest

from configs import default
from tlp_jax.train import config as config_lib
from tlp_jax.train import optimizer


def _optim(**overrides):
  """``configs/default.py``'s optimizer with ``overrides``."""
  return dataclasses.replace(config_lib.from_config_dict(default.get_config()).optim, **overrides)


def test_step_schedule_is_torch_steplr_stepped_per_epoch():
  cfg = _optim(
    optimizer="adam",
    schedule="step",
    learning_rate=0.1,
    step_decay_every_epochs=2,
    step_decay_rate=0.5,
  )
  _, schedule = optimizer.make_optimizer(cfg, steps_per_epoch=3, total_steps=30)
  for step in range(30):
    epoch = step // 3
    assert math.isclose(float(schedule(step)), 0.1 * 0.5 ** (epoch // 2), rel_tol=1e-6)
  const = _optim(optimizer="adam", schedule="step", learning_rate=7e-4, step_decay_rate=1.0)
  _, schedule = optimizer.make_optimizer(const, steps_per_epoch=3, total_steps=30)
  assert {round(float(schedule(s)), 10) for s in range(30)} == {7e-4}


def test_warmup_cosine_schedule():
  cfg = _optim(learning_rate=1.0, warmup_epochs=2, end_learning_rate=0.0)
  _, schedule = optimizer.make_optimizer(cfg, steps_per_epoch=5, total_steps=50)
  assert float(schedule(0)) == 0.0
  assert math.isclose(float(schedule(10)), 1.0, rel_tol=1e-6)
  assert float(schedule(30)) < float(schedule(20)) < 1.0
  assert float(schedule(50)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
  "warmup_epochs,steps_per_epoch,total_steps",
  [(1.0, 1, 1), (0.0, 4, 8), (0.1, 3, 6), (1.0, 4, 4), (2.0, 5, 50)],
)
def test_warmup_cosine_without_warmup_steps_is_quiet_and_keeps_its_values(
  caplog, warmup_epochs, steps_per_epoch, total_steps
):
  # num_epochs=1 with one step per epoch, or warmup_epochs=0: no warm-up step at all. optax's
  # warm-up + cosine then logs about its zero-length warm-up piece; the rates must not change.
  cfg = _optim(learning_rate=0.3, warmup_epochs=warmup_epochs, end_learning_rate=0.01)
  with caplog.at_level(logging.DEBUG):
    _, schedule = optimizer.make_optimizer(cfg, steps_per_epoch, total_steps)
  assert not [r for r in caplog.records if "polynomial schedule" in r.getMessage()]
  warmup = min(round(warmup_epochs * steps_per_epoch), total_steps - 1)
  reference = optax.warmup_cosine_decay_schedule(
    0.0, 0.3, warmup, max(total_steps, warmup + 1), end_value=0.01
  )
  steps = np.arange(total_steps + 3)
  np.testing.assert_allclose(schedule(steps), reference(steps), rtol=1e-7, atol=0)
  if warmup == 0:
    assert float(schedule(0)) == pytest.approx(0.3)


def test_adam_is_pytorch_adam_with_coupled_l2_after_clipping():
  # PyTorch: clip_grad_norm_(0.5); Adam.step with weight_decay: g += wd * p; moments; bias
  # correction; p -= lr * m_hat / (sqrt(v_hat) + eps). Written out by hand here.
  lr, wd, clip, eps = 0.01, 0.1, 0.5, 1e-8
  cfg = _optim(
    optimizer="adam",
    schedule="step",
    step_decay_rate=1.0,
    learning_rate=lr,
    weight_decay=wd,
    grad_clip_norm=clip,
  )
  tx, _ = optimizer.make_optimizer(cfg, 1, 1)
  params = {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([0.3], np.float32)}
  grads_seq = [
    {"w": np.array([3.0, 0.0, -1.0], np.float32), "b": np.array([0.2], np.float32)},
    {"w": np.array([0.1, 0.2, 0.1], np.float32), "b": np.array([-0.1], np.float32)},
  ]
  state = tx.init(params)
  p_jax = params
  p_ref = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p_ref.items()}
  v = {k: np.zeros_like(v) for k, v in p_ref.items()}
  for t, grads in enumerate(grads_seq, start=1):
    updates, state = tx.update(grads, state, p_jax)
    p_jax = optax.apply_updates(p_jax, updates)
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    scale = min(1.0, clip / norm)
    for k in p_ref:
      g = grads[k] * scale + wd * p_ref[k]
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.999 * v[k] + 0.001 * g * g
      m_hat, v_hat = m[k] / (1 - 0.9**t), v[k] / (1 - 0.999**t)
      p_ref[k] = p_ref[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
  for k in p_ref:
    np.testing.assert_allclose(np.asarray(p_jax[k]), p_ref[k], rtol=1e-5, atol=1e-7)


def test_unknown_optimizer_or_schedule_is_an_error():
  with pytest.raises(ValueError, match="unknown optimizer 'sgdx'"):
    _optim(optimizer="sgdx")
  with pytest.raises(ValueError, match="unknown schedule"):
    _optim(schedule="constant")


def test_clip_by_member_norm_clips_each_member_alone():
  rng = np.random.default_rng(0)
  grads = {
    "a": rng.normal(size=(3, 4, 5)).astype(np.float32),
    "b": rng.normal(size=(3, 7)).astype(np.float32),
  }
  grads["a"][1] *= 1e-3  # member 1 is under the limit and must stay unchanged
  grads["b"][1] *= 1e-3
  tx = optimizer.clip_by_member_norm(0.5)
  got, _ = tx.update(grads, tx.init(grads))
  single = optax.clip_by_global_norm(0.5)
  for m in range(3):
    member = {k: v[m] for k, v in grads.items()}
    want, _ = single.update(member, single.init(member))
    for k in grads:
      np.testing.assert_allclose(np.asarray(got[k][m]), np.asarray(want[k]), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(got["b"][1]), grads["b"][1])
