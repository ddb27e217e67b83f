"""Training losses: TLP's LambdaRank (allRank-style) and MSE, masked per hardware head.

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
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss hyper-parameters. Defaults are TLP's.

  Attributes:
    name: key of ``LOSSES``: "lambdarank" (TLP), "mse" (TLP's alternative), or this project's
      log-scale losses "mse_log", "pairwise_log", "listwise_log" and "centered_mse_log".
    sigma: LambdaRank sigmoid scale.
    eps: LambdaRank clamp floor.
    k: LambdaRank NDCG truncation (``None`` = whole list, as TLP trains).
    group_by_task: rank within each task group instead of across the whole batch.
    temperature: target temperature of the listwise loss ("listwise_log"): the target
      distribution over a group's items is ``softmax(log(y) / temperature)``.
    aux_name: optional second loss (a key of ``LOSSES``) added with weight ``aux_weight``, with
      its own ``aux_group_by_task`` (e.g. within-task ranking plus a small whole-batch term).
    aux_weight: weight of the auxiliary loss.
    aux_group_by_task: ``group_by_task`` of the auxiliary loss.
  """

  name: str = "lambdarank"
  sigma: float = 1.0
  eps: float = 1e-10
  k: int | None = None
  group_by_task: bool = False
  temperature: float = 1.0
  aux_name: str | None = None
  aux_weight: float = 0.0
  aux_group_by_task: bool = False

  def __post_init__(self):
    for name in (self.name, self.aux_name):
      if name is not None and name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSSES)}")
    if self.aux_name is not None and not self.aux_weight >= 0:
      raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if self.k is not None and self.k < 1:
      raise ValueError(f"k must be >= 1 or None, got {self.k}")


class HeadLoss(Protocol):

  def __call__(self, preds: Array, labels: Array, valid: Array, groups: Array,
               config: LossConfig) -> Array:
    ...


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
      (values[None, :] == values[:, None]) & (idx[None, :] < idx[:, None]))
  return jnp.sum(ahead & comparable, axis=1)


def lambdarank_head(preds: Array, labels: Array, valid: Array, groups: Array,
                    config: LossConfig) -> Array:
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


def mse_head(preds: Array, labels: Array, valid: Array, groups: Array,
             config: LossConfig) -> Array:
  """Mean squared error over the head's present labels (``torch.nn.MSELoss`` when all present)."""
  del groups, config
  err = jnp.where(valid, preds.astype(jnp.float32) - labels.astype(jnp.float32), 0.0)
  return jnp.sum(err * err) / jnp.maximum(jnp.sum(valid), 1)


# Scores below this floor are treated as equal to it in the log-scale losses (TLP's eval uses the
# same 1e-5 floor when it turns scores back into latencies).
_LOG_SCORE_FLOOR = 1e-5


def _log_scores(labels: Array, valid: Array) -> Array:
  return jnp.where(valid, jnp.log(jnp.maximum(labels.astype(jnp.float32), _LOG_SCORE_FLOOR)),
                   0.0)


def mse_log_head(preds: Array, labels: Array, valid: Array, groups: Array,
                 config: LossConfig) -> Array:
  """MSE between the prediction and ``log(score)`` = ``-log(cost / min_cost)``.

  Not in TLP. The score ``min_cost / cost`` squashes every slow program towards 0, so a program
  7x slower than the best (0.14) and one 120x slower (0.008) look alike to a loss on scores,
  while top-k punishes picking the second one 17 times harder. On the log scale they are
  ``log(7)`` apart.
  """
  del groups, config
  err = jnp.where(valid, preds.astype(jnp.float32) - _log_scores(labels, valid), 0.0)
  return jnp.sum(err * err) / jnp.maximum(jnp.sum(valid), 1)


def pairwise_log_head(preds: Array, labels: Array, valid: Array, groups: Array,
                      config: LossConfig) -> Array:
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


def _group_logsumexp(values: Array, comparable: Array) -> Array:
  """``log(sum_j exp(values_j))`` over the items ``j`` comparable with each item ``i``."""
  masked = jnp.where(comparable, values[None, :], -jnp.inf)
  peak = jax.lax.stop_gradient(jnp.max(masked, axis=1, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  total = jnp.sum(jnp.where(comparable, jnp.exp(masked - peak), 0.0), axis=1)
  return jnp.log(jnp.maximum(total, 1e-30)) + peak[:, 0]


def listwise_log_head(preds: Array, labels: Array, valid: Array, groups: Array,
                      config: LossConfig) -> Array:
  """Listwise softmax cross-entropy (ListNet, top-1 form) against ``softmax(log(y) / T)``.

  Not in TLP. Within each group (task when ``group_by_task``) the model's scores define a
  softmax over the group's programs and the target puts mass ``y_i^(1/T) / sum_j y_j^(1/T)`` on
  each, i.e. in proportion to its speed; the loss is the cross-entropy, averaged over groups
  with at least two valid items. Mass concentrates on the fastest programs, which is what top-1
  rewards, and a program ``r`` times slower than the best gets ``r^(-1/T)`` of the best's mass.
  """
  preds = preds.astype(jnp.float32)
  log_y = _log_scores(labels, valid)
  comparable = _comparable(groups, valid)
  target_logits = log_y / config.temperature
  log_q = target_logits - _group_logsumexp(target_logits, comparable)
  q = jax.lax.stop_gradient(jnp.where(valid, jnp.exp(log_q), 0.0))
  log_p = preds - _group_logsumexp(preds, comparable)
  group_size = jnp.sum(comparable, axis=1)
  in_list = valid & (group_size >= 2)
  # Each item's row sums its group's target mass once per item; 1/group_size counts each group
  # once.
  num_groups = jnp.sum(jnp.where(in_list, 1.0 / jnp.maximum(group_size, 1), 0.0))
  return -jnp.sum(jnp.where(in_list, q * log_p, 0.0)) / jnp.maximum(num_groups, 1.0)


def centered_mse_log_head(preds: Array, labels: Array, valid: Array, groups: Array,
                          config: LossConfig) -> Array:
  """MSE on ``log(y)`` up to a free per-group offset.

  Not in TLP. ``log(y) = log(min_cost) - log(cost)`` carries a per-task constant the model
  cannot know for an unseen task; subtracting each group's mean residual removes it, so only
  within-group log-latency ratios are regressed (``mse_log`` with ``group_by_task`` off is the
  uncentred version).
  """
  del config
  preds = preds.astype(jnp.float32)
  comparable = _comparable(groups, valid)
  resid = jnp.where(valid, preds - _log_scores(labels, valid), 0.0)
  group_size = jnp.sum(comparable, axis=1)
  group_mean = (comparable.astype(jnp.float32) @ resid) / jnp.maximum(group_size, 1)
  err = jnp.where(valid, resid - group_mean, 0.0)
  return jnp.sum(err * err) / jnp.maximum(jnp.sum(valid), 1)


LOSSES: dict[str, HeadLoss] = {
    "lambdarank": lambdarank_head,
    "mse": mse_head,
    "mse_log": mse_log_head,
    "pairwise_log": pairwise_log_head,
    "listwise_log": listwise_log_head,
    "centered_mse_log": centered_mse_log_head,
}


def multi_head_loss(config: LossConfig, preds: Array, labels: Array, mask: Array,
                    task_index: Array | None = None) -> Array:
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
    raise ValueError(f"preds {preds.shape}, labels {labels.shape} and mask {mask.shape} must "
                     "all be (batch, heads)")
  if config.aux_name is not None:
    primary = dataclasses.replace(config, aux_name=None, aux_weight=0.0)
    aux = dataclasses.replace(primary, name=config.aux_name, group_by_task=config.aux_group_by_task)
    return (multi_head_loss(primary, preds, labels, mask, task_index)
            + config.aux_weight * multi_head_loss(aux, preds, labels, mask, task_index))
  if config.group_by_task:
    if task_index is None:
      raise ValueError("group_by_task=True needs task_index")
    groups = task_index
  else:
    groups = jnp.zeros((preds.shape[0],), jnp.int32)
  head_fn = LOSSES[config.name]
  per_head = jax.vmap(lambda p, y, m: head_fn(p, y, m, groups, config),
                      in_axes=(1, 1, 1))(preds, labels, mask.astype(bool))
  return jnp.sum(per_head)


def make_loss_fn(config: LossConfig) -> Callable[..., Array]:
  """``fn(preds, labels, mask, task_index=None) -> scalar`` bound to ``config``."""

  def loss_fn(preds, labels, mask, task_index=None):
    return multi_head_loss(config, preds, labels, mask, task_index)

  return loss_fn
