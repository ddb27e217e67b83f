"""The Optax optimizer and learning-rate schedule, chosen by name from small tables.

TLP trains with PyTorch ``Adam(weight_decay)`` (coupled L2) and a ``StepLR`` schedule (rate 1.0 =
constant); this project's default is AdamW with linear warm-up and cosine decay
(docs/ACCURACY.md). Gradients are clipped by global norm first, per member for an ensemble.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer hyper-parameters (``config.optim``).

  Attributes:
    optimizer: key of ``OPTIMIZERS``.
    schedule: key of ``SCHEDULES``.
    learning_rate: peak learning rate.
    weight_decay: ``adam``: coupled L2 (PyTorch ``Adam(weight_decay=...)``); ``adamw``:
      decoupled, multiplied by the learning rate (PyTorch ``AdamW``).
    grad_clip_norm: global-norm gradient clip; <= 0 disables it.
    warmup_epochs: linear warm-up length (``warmup_cosine``).
    end_learning_rate: final rate of the cosine decay.
    step_decay_every_epochs: ``step``: multiply the rate by ``step_decay_rate`` every this many
      epochs (PyTorch ``StepLR(step_size, gamma)`` stepped once per epoch).
    step_decay_rate: ``step``: the factor (TLP: 1.0, i.e. constant).
  """

  optimizer: str
  schedule: str
  learning_rate: float
  weight_decay: float
  grad_clip_norm: float
  warmup_epochs: float
  end_learning_rate: float
  step_decay_every_epochs: int
  step_decay_rate: float

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZERS)}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; known: {sorted(SCHEDULES)}")
    if self.step_decay_every_epochs < 1:
      raise ValueError(f"step_decay_every_epochs must be >= 1, got {self.step_decay_every_epochs}")


def _warmup_cosine_schedule(cfg: OptimConfig, steps_per_epoch: int, total_steps: int):
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  decay_steps = max(total_steps, warmup + 1)
  if warmup == 0:
    # No warm-up (warmup_epochs=0, or a one-step run): the cosine alone. These are the values of
    # optax's warm-up + cosine too, whose zero-length warm-up piece logs a warning on every run.
    alpha = 0.0 if cfg.learning_rate == 0.0 else cfg.end_learning_rate / cfg.learning_rate
    return optax.cosine_decay_schedule(
      init_value=cfg.learning_rate, decay_steps=decay_steps, alpha=alpha
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=warmup,
    decay_steps=decay_steps,
    end_value=cfg.end_learning_rate,
  )


def _step_schedule(cfg: OptimConfig, steps_per_epoch: int, total_steps: int):
  del total_steps
  # StepLR is stepped after each epoch, so epoch e trains at lr * gamma ** (e // step_size).
  return optax.exponential_decay(
    init_value=cfg.learning_rate,
    transition_steps=cfg.step_decay_every_epochs * steps_per_epoch,
    decay_rate=cfg.step_decay_rate,
    staircase=True,
  )


SCHEDULES: dict[str, Callable[[OptimConfig, int, int], optax.Schedule]] = {
  "warmup_cosine": _warmup_cosine_schedule,
  "step": _step_schedule,
}


def clip_by_member_norm(max_norm: float) -> optax.GradientTransformation:
  """``clip_by_global_norm`` applied to each ensemble member on its own.

  Every leaf of an ensemble's gradient has the member as its leading axis. Clipping by the norm
  over all members would scale every member by the largest one's norm and couple their
  training; clipping each member's slice keeps them as independent as separately trained runs.
  """

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree_util.tree_leaves(updates)
    sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in leaves)
    norm = jnp.sqrt(sq)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / jnp.maximum(norm, 1e-30))
    clipped = jax.tree_util.tree_map(
      lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), updates
    )
    return clipped, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _clip(cfg: OptimConfig, ensemble_size: int) -> list[optax.GradientTransformation]:
  if cfg.grad_clip_norm <= 0:
    return []
  if ensemble_size > 1:
    return [clip_by_member_norm(cfg.grad_clip_norm)]
  return [optax.clip_by_global_norm(cfg.grad_clip_norm)]


def _adam_l2(
  cfg: OptimConfig, schedule: optax.Schedule, clip: Sequence[optax.GradientTransformation]
) -> optax.GradientTransformation:
  # PyTorch Adam(weight_decay): grad += wd * param after clipping, before the moments.
  return optax.chain(
    *clip,
    optax.add_decayed_weights(cfg.weight_decay),
    optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
    optax.scale_by_learning_rate(schedule),
  )


def _adamw(
  cfg: OptimConfig, schedule: optax.Schedule, clip: Sequence[optax.GradientTransformation]
) -> optax.GradientTransformation:
  return optax.chain(
    *clip, optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)
  )


OPTIMIZERS: dict[
  str,
  Callable[
    [OptimConfig, optax.Schedule, Sequence[optax.GradientTransformation]],
    optax.GradientTransformation,
  ],
] = {
  "adam": _adam_l2,
  "adamw": _adamw,
}


def make_optimizer(
  cfg: OptimConfig, steps_per_epoch: int, total_steps: int, ensemble_size: int = 1
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the Optax optimizer and its learning-rate schedule (a function of the step).

  ``ensemble_size`` > 1: the parameters are an ensemble's (leading member axis on every leaf);
  the gradient clip then applies per member. Adam and weight decay are elementwise already.
  """
  schedule = SCHEDULES[cfg.schedule](cfg, steps_per_epoch, total_steps)
  return OPTIMIZERS[cfg.optimizer](cfg, schedule, _clip(cfg, ensemble_size)), schedule
