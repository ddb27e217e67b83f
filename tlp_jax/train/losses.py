"""Training losses: TLP's LambdaRank (allRank-style) and MSE, and this project's pairwise_log;
masked per hardware head.

Every loss works on a batch ``preds (B, H)``, ``labels (B, H)``, ``mask (B, H)`` (True = label
present for that head) and ``task_index (B,)``; a head's loss only sees its present labels and the
heads' losses are summed. Shapes are static and nothing is boolean-indexed, so every loss is
jit-able.

LambdaRank follows ``LambdaRankLoss.forward`` of TLP's ``tlp_train.py`` (k=None, eps=1e-10,
sigma=1): items are ranked by prediction, ``D = log2(1 + position)``,
``G = (2^y - 1) / maxDCG`` (labels clamped at 0), ``w_ij = |1/D_i - 1/D_j| * |G_i - G_j|`` and
the loss is ``-sum log2(clamp(clamp(sigmoid(sigma * (s_i - s_j)), eps) ** w_ij, eps))`` over the
pairs with ``y_i > y_j``. The original sorts the batch; here positions are computed as ranks by
pairwise comparison (ties broken by batch index), which gives the same positions, needs no
sort/gather and extends directly to ranking within task groups (``group_by_task``): positions,
maxDCG and pairs are then all restricted to items of the same task. The original ranks the
whole batch as one list (``group_by_task=False``, the default).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp

from tlp_jax.core import metrics

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss hyper-parameters (``config.loss``; sigma, eps and k are TLP's constants, not in it).

  Attributes:
    name: key of ``LOSSES``: "lambdarank" (TLP), "mse" (TLP's alternative) or this project's
      "pairwise_log".
    group_by_task: rank within each task group instead of across the whole batch (TLP: False).
    sigma: LambdaRank / pairwise_log sigmoid scale.
    eps: LambdaRank clamp floor (and pairwise_log's weight-sum floor).
    k: LambdaRank NDCG truncation (``None`` = whole list, as TLP trains).
  """

  name: str
  group_by_task: bool
  sigma: float = 1.0
  eps: float = 1e-10
  k: int | None = None

  def __post_init__(self):
    if self.name not in LOSSES:
      raise ValueError(f"unknown loss {self.name!r}; known: {sorted(LOSSES)}")
    if self.k is not None and self.k < 1:
      raise ValueError(f"k must be >= 1 or None, got {self.k}")


class HeadLoss(Protocol):
  def __call__(
    self, preds: Array, labels: Array, valid: Array, groups: Array, config: LossConfig
  ) -> Array: ...


def _comparable(groups: Array, valid: Array) -> Array:
  """``(N, N)`` True where items ``i`` and ``j`` are both valid and in the same group."""
  return (groups[:, None] == groups[None, :]) & valid[:, None] & valid[None, :]


def _ranks(values: Array, comparable: Array) -> Array:
  """0-based descending rank of each item among the items it is comparable with.

  ``comparable (N, N)`` must be symmetric with True on the diagonal for valid items. Ties are
  broken by index (earlier first), like a stable descending sort.
  """
  n = values.shape[0]
  idx = jnp.arange(n)
  ahead = (values[None, :] > values[:, None]) | (
    (values[None, :] == values[:, None]) & (idx[None, :] < idx[:, None])
  )
  return jnp.sum(ahead & comparable, axis=1)


def lambdarank_head(
  preds: Array, labels: Array, valid: Array, groups: Array, config: LossConfig
) -> Array:
  """TLP's LambdaRank loss for one head. preds, labels, valid, groups: (N,). Returns a scalar."""
  preds = preds.astype(jnp.float32)
  labels = jnp.where(valid, labels.astype(jnp.float32), 0.0)  # absent labels may be NaN
  eps = config.eps
  n = preds.shape[0]
  # Positions beyond every possible rank when k is None.
  k = n if config.k is None else config.k

  comparable = _comparable(groups, valid)
  pred_rank = _ranks(preds, comparable)
  true_rank = _ranks(labels, comparable)

  gains = jnp.exp2(jnp.maximum(labels, 0.0)) - 1.0
  gains = jnp.where(valid, gains, 0.0)
  d_pred = jnp.log2(2.0 + pred_rank.astype(jnp.float32))
  d_true = jnp.log2(2.0 + true_rank.astype(jnp.float32))
  ideal = jnp.where(true_rank < k, gains / d_true, 0.0)
  max_dcg = jnp.maximum(comparable.astype(jnp.float32) @ ideal, eps)
  g = gains / max_dcg

  inv_d = 1.0 / d_pred
  weights = jnp.abs(inv_d[:, None] - inv_d[None, :]) * jnp.abs(g[:, None] - g[None, :])
  weights = jax.lax.stop_gradient(weights)

  diffs = jnp.clip(preds[:, None] - preds[None, :], -1e8, 1e8)
  diffs = jnp.where(jnp.isnan(diffs), 0.0, diffs)
  log_eps = math.log(eps)
  # log2(clamp(clamp(sigmoid(x), eps) ** w, eps)), computed in log space for stability.
  log_p = jnp.maximum(jax.nn.log_sigmoid(config.sigma * diffs), log_eps)
  pair_loss = jnp.maximum(weights * log_p, log_eps) / math.log(2.0)

  in_top_k = pred_rank < k
  pairs = comparable & (labels[:, None] > labels[None, :]) & in_top_k[:, None] & in_top_k[None, :]
  return -jnp.sum(jnp.where(pairs, pair_loss, 0.0))


def mse_head(preds: Array, labels: Array, valid: Array, groups: Array, config: LossConfig) -> Array:
  """Mean squared error over the head's present labels (``torch.nn.MSELoss`` when all present)."""
  del groups, config
  err = jnp.where(valid, preds.astype(jnp.float32) - labels.astype(jnp.float32), 0.0)
  return jnp.sum(err * err) / jnp.maximum(jnp.sum(valid), 1)


def _log_scores(labels: Array, valid: Array) -> Array:
  # Scores below the floor TLP's eval uses to turn scores back into latencies count as equal.
  return jnp.where(
    valid, jnp.log(jnp.maximum(labels.astype(jnp.float32), metrics.SCORE_FLOOR)), 0.0
  )


def pairwise_log_head(
  preds: Array, labels: Array, valid: Array, groups: Array, config: LossConfig
) -> Array:
  """Pairwise logistic (RankNet) loss with each pair weighted by ``log(y_i / y_j)``.

  Not in TLP. Over the pairs of comparable items (same group when ``group_by_task``) with
  ``y_i > y_j``: ``-sum w_ij * log_sigmoid(sigma * (s_i - s_j)) / sum w_ij`` with
  ``w_ij = log(y_i) - log(y_j)``, i.e. how many times slower ``j`` is than ``i`` (in nats). A
  mis-ordered pair costs in proportion to the latency ratio it gets wrong, which is what the
  top-k ratio measures.
  """
  preds = preds.astype(jnp.float32)
  log_y = _log_scores(labels, valid)
  comparable = _comparable(groups, valid)
  weights = jnp.where(comparable, jnp.maximum(log_y[:, None] - log_y[None, :], 0.0), 0.0)
  log_p = jax.nn.log_sigmoid(config.sigma * (preds[:, None] - preds[None, :]))
  return -jnp.sum(weights * log_p) / jnp.maximum(jnp.sum(weights), config.eps)


LOSSES: dict[str, HeadLoss] = {
  "lambdarank": lambdarank_head,
  "mse": mse_head,
  "pairwise_log": pairwise_log_head,
}


def multi_head_loss(
  config: LossConfig, preds: Array, labels: Array, mask: Array, task_index: Array | None = None
) -> Array:
  """Sum over heads of ``config``'s loss on each head's present labels.

  Args:
    config: which loss and its hyper-parameters.
    preds: (B, H) model outputs.
    labels: (B, H) targets (TLP scores ``min_cost / cost``); absent entries may hold anything.
    mask: (B, H) bool, True where the label is present.
    task_index: (B,) int task of each row; needed when ``config.group_by_task``.

  Returns:
    Scalar float32 loss.
  """
  if preds.ndim != 2 or preds.shape != labels.shape or preds.shape != mask.shape:
    raise ValueError(
      f"preds {preds.shape}, labels {labels.shape} and mask {mask.shape} must all be (batch, heads)"
    )
  if config.group_by_task:
    if task_index is None:
      raise ValueError("group_by_task=True needs task_index")
    groups = task_index
  else:
    groups = jnp.zeros((preds.shape[0],), jnp.int32)
  head_fn = LOSSES[config.name]
  per_head = jax.vmap(lambda p, y, m: head_fn(p, y, m, groups, config), in_axes=(1, 1, 1))(
    preds, labels, mask.astype(bool)
  )
  return jnp.sum(per_head)
