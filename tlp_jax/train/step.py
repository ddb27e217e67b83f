"""The training state and the steps, free functions run under ``pmap`` (applied in ``loop``).

The loss is a function of the *global* batch (a ranking loss couples all items), so the steps
all-gather the per-device predictions and compute the loss on the whole batch: LambdaRank ranks
the same list as the original single-process code, whatever the device count.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from tlp_jax.train import losses
from tlp_jax.train import model as model_lib
from tlp_jax.train.data import AXIS


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (the data order follows from ``step``)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data of the run's PRNG key


def create_train_state(
  model_config: model_lib.TLPConfig, tx: optax.GradientTransformation, seed: int
) -> TrainState:
  """Initial state: PyTorch-style initialised parameters from ``seed``, fresh optimizer state."""
  # Legacy uint32 keys: plain arrays that checkpoint like any other.
  rng = jax.random.PRNGKey(seed)
  init_rng, rng = jax.random.split(rng)
  params = model_lib.init_params(model_config, init_rng)
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
  )


def per_head_losses(
  loss_config: losses.LossConfig,
  preds: jax.Array,
  scores: jax.Array,
  mask: jax.Array,
  task_index: jax.Array,
) -> jax.Array:
  """``(H,)`` loss of each head on a batch (their sum is the training loss)."""
  return jnp.stack(
    [
      losses.multi_head_loss(
        loss_config, preds[:, h : h + 1], scores[:, h : h + 1], mask[:, h : h + 1], task_index
      )
      for h in range(preds.shape[1])
    ]
  )


def _gather(x: jax.Array) -> jax.Array:
  return jax.lax.all_gather(x, AXIS, tiled=True)


def train_step(
  state: TrainState,
  features: jax.Array,
  scores: jax.Array,
  mask: jax.Array,
  task_index: jax.Array,
  *,
  model: model_lib.TLPModel,
  tx: optax.GradientTransformation,
  loss_config: losses.LossConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on this device's shard of the global batch (inside ``pmap``).

  Predictions are all-gathered, the loss and its gradient w.r.t. all predictions are computed
  identically on every device, each device back-propagates its own slice of that gradient
  through the model, and the parameter gradients are summed over devices. This is exactly the
  single-device gradient of the global-batch loss, for any number of devices.
  """

  def forward(params):
    # (B, members, H) flattened to (B, members * H): every (member, head) column is ranked on
    # its own, so each ensemble member trains on its own loss (one column per head if not an
    # ensemble).
    preds = model.apply({"params": params}, features, per_member=True)
    return preds.reshape(preds.shape[0], -1)

  preds, model_vjp = jax.vjp(forward, state.params)
  all_scores, all_mask, all_tasks = _gather(scores), _gather(mask), _gather(task_index)
  members = preds.shape[1] // scores.shape[1]
  all_scores, all_mask = jnp.tile(all_scores, (1, members)), jnp.tile(all_mask, (1, members))

  def total_loss(all_preds):
    per_column = per_head_losses(loss_config, all_preds, all_scores, all_mask, all_tasks)
    # Summed over members (each member's gradient is its own loss's); reported per head as the
    # members' mean, comparable to a single model's.
    per_head = jnp.mean(per_column.reshape(members, -1), axis=0)
    return jnp.sum(per_column), per_head

  (loss, per_head), pred_grads = jax.value_and_grad(total_loss, has_aux=True)(_gather(preds))
  loss = jnp.sum(per_head)
  n = preds.shape[0]
  local_grads = jax.lax.dynamic_slice_in_dim(pred_grads, jax.lax.axis_index(AXIS) * n, n)
  (grads,) = model_vjp(local_grads.astype(preds.dtype))
  grads = jax.lax.psum(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {
    "loss": loss,
    "loss_per_head": per_head,
    "grad_norm": optax.tree.norm(grads),
    "labels": jnp.sum(_gather(mask), axis=0),
  }


def model_input(steps: jax.Array, tokens: jax.Array) -> jax.Array:
  """``tlp_jax.core.loop_tokens.model_input`` on device: ``(N, L, E)`` steps and ``(N, T, W)``
  float16 loop tokens -> the ``(N, L + T, E + W)`` float32 disjoint-column block (bit-identical
  to the NumPy one: float16 -> float32 is exact and the rest is zeros)."""
  n, length, width = steps.shape
  _, num_tokens, token_width = tokens.shape
  out = jnp.zeros((n, length + num_tokens, width + token_width), jnp.float32)
  out = out.at[:, :length, :width].set(steps.astype(jnp.float32))
  return out.at[:, length:, width:].set(tokens.astype(jnp.float32))


def _resident_batch(
  data: tuple[jax.Array, ...], order: jax.Array, valid: jax.Array, index: Any, global_batch: int
) -> tuple[jax.Array, ...]:
  """This device's share of global batch number ``index`` of resident arrays ``data =
  (features, [loop_tokens,] scores, mask, task_index)`` in the padded ``order``/``valid``:
  ``(model input, scores, mask, task_index)``, the model input assembled here (in ``pmap``)."""
  features, *tokens, scores, mask, task_index = data
  n = global_batch // jax.lax.psum(1, AXIS)
  start = index * global_batch + jax.lax.axis_index(AXIS) * n
  rows = jax.lax.dynamic_slice_in_dim(order, start, n)
  ok = jax.lax.dynamic_slice_in_dim(valid, start, n)
  x = features[rows]
  if tokens:
    x = model_input(x, tokens[0][rows])
  return x, scores[rows], mask[rows] & ok[:, None], task_index[rows]


def train_step_resident(
  state: TrainState,
  data: tuple[jax.Array, ...],
  order: jax.Array,
  valid: jax.Array,
  *,
  steps_per_epoch: int,
  global_batch: int,
  **step_kwargs,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """``train_step`` on a batch gathered on device from the resident training arrays.

  ``data = (features, [loop_tokens,] scores, mask, task_index)`` of the whole training set
  (``HeadArrays.arrays``) and the epoch's padded ``order``/``valid`` live on every device; the
  step's rows follow from ``state.step``. With loop tokens (float16 on device) the batch's
  model input is assembled here, so the padded block never exists for the whole set.
  """
  batch = _resident_batch(data, order, valid, state.step % steps_per_epoch, global_batch)
  return train_step(state, *batch, **step_kwargs)


def train_steps_resident(
  state: TrainState,
  data: tuple[jax.Array, ...],
  order: jax.Array,
  valid: jax.Array,
  *,
  num_steps: int,
  **resident_kwargs,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """``num_steps`` consecutive ``train_step_resident`` steps in one program (a ``lax.scan``).

  One dispatch then runs several steps, so the host's per-call work (pmap's argument handling,
  the launch) is paid once per ``num_steps`` steps instead of every step: on one H200 the
  128-wide default's step is short enough (~1.3 ms) for that work to hold the GPU back
  (bench/README.md). Each step is the same function on the state the previous one returned, so
  the states are those of ``num_steps`` single calls up to float rounding: XLA compiles the step
  inside the loop apart from the step alone and may fuse it differently. The metrics are
  stacked along a new leading axis, one entry per step.
  """
  step = lambda s, _: train_step_resident(s, data, order, valid, **resident_kwargs)  # noqa: E731
  return jax.lax.scan(step, state, None, length=num_steps)


def eval_step_resident(
  params: Any,
  data: tuple[jax.Array, ...],
  order: jax.Array,
  valid: jax.Array,
  index: jax.Array,
  *,
  global_batch: int,
  **eval_kwargs,
) -> tuple[jax.Array, jax.Array]:
  """``eval_step`` on global batch number ``index`` of resident validation arrays (``data``,
  ``order`` and ``valid`` laid out as ``train_step_resident``'s), assembled on device."""
  return eval_step(params, *_resident_batch(data, order, valid, index, global_batch), **eval_kwargs)


def eval_step(
  params: Any,
  features: jax.Array,
  scores: jax.Array,
  mask: jax.Array,
  task_index: jax.Array,
  *,
  model: model_lib.TLPModel,
  loss_config: losses.LossConfig,
) -> tuple[jax.Array, jax.Array]:
  """Predictions of the global batch ``(B, H)`` and its per-head losses ``(H,)`` (in ``pmap``)."""
  preds = _gather(model.apply({"params": params}, features))
  per_head = per_head_losses(
    loss_config, preds, _gather(scores), _gather(mask), _gather(task_index)
  )
  return preds, per_head
