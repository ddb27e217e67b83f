"""PyTorch reference of the original TLP training step, written for the throughput benchmark.

A reimplementation (not a copy) of what TLP's ``tlp_train.py`` runs per step:

* ``TLPTorchModel`` -- the original ``AttentionModule``: crop to ``(step_size, fea_size)``;
  encoder ``Linear E->64->128->256->256`` with a ReLU after each; the batch is transposed to
  sequence-first ``(L, B, D)`` and fed to ``nn.MultiheadAttention(256, 8)`` as self attention
  (called like the original, i.e. with ``need_weights=True``, which also returns the
  head-averaged attention matrix); residual add; ``res_blocks`` x ``x = relu(Linear(x)) + x``;
  decoder ``256->256->128->64->1`` with ReLUs between; sum over the step axis; squeeze to
  ``(B,)``. The unused ``l0`` layer of the original is left out (it has parameters but never runs,
  so it changes neither outputs nor time, only the optimizer's parameter count by 65,792).
* ``lambdarank_loss`` -- the original ``LambdaRankLoss.forward`` (allRank's LambdaRank with the
  ``lambdaRank_scheme`` weights, ``k=None``, ``eps=1e-10``, ``sigma=1``): sort the batch by
  prediction, gains ``2^y - 1`` normalised by the ideal DCG, discounts ``log2(1 + position)``,
  weights ``|1/D_i - 1/D_j| * |G_i - G_j|``, and ``-sum log2(clamp(clamp(sigmoid(s_i - s_j),
  eps) ** w_ij, eps))`` over the pairs with ``y_i > y_j``. ``boolean_index=True`` selects the
  pairs with a boolean index, as the original does (a device->host sync in eager mode);
  ``False`` sums under a mask instead, the same value, and what ``torch.compile`` can trace
  without a graph break.
* ``TorchTrainer`` -- ``Adam(lr, weight_decay)`` (PyTorch's default multi-tensor implementation,
  coupled L2), ``clip_grad_norm_(0.5)``, optionally ``loss.item()`` every step as the original's
  loop does; eager, or with the model and loss under ``torch.compile``.

``load_flax_params`` copies the parameters of a ``tlp_jax.train.model.TLPModel``
(``num_hardware_heads=1``, ``ensemble_size=1``) into a ``TLPTorchModel`` so both frameworks can
start from identical weights (tests and loss-curve comparisons).

torch is only needed by this module (``pip install -e '.[bench]'``); nothing else in the project
imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class TorchModelConfig:
  """Dimensions of the reference model (the original's command-line defaults)."""

  feature_dim: int = 22
  seq_len: int = 25
  encoder_dims: tuple[int, ...] = (64, 128, 256, 256)
  attention_heads: int = 8
  res_blocks: int = 2
  decoder_dims: tuple[int, ...] = (256, 128, 64, 1)
  need_weights: bool = True  # the original calls MultiheadAttention with its default (True)


def _mlp(widths: Sequence[int], fan_in: int, relu_last: bool) -> nn.Sequential:
  layers: list[nn.Module] = []
  for i, width in enumerate(widths):
    layers.append(nn.Linear(fan_in, width))
    if relu_last or i < len(widths) - 1:
      layers.append(nn.ReLU())
    fan_in = width
  return nn.Sequential(*layers)


class TLPTorchModel(nn.Module):
  """The original TLP ``AttentionModule`` (single output head): ``(B, L', E')`` -> ``(B,)``."""

  def __init__(self, config: TorchModelConfig = TorchModelConfig()):
    super().__init__()
    self.config = config
    hidden = config.encoder_dims[-1]
    self.encoder = _mlp(config.encoder_dims, config.feature_dim, relu_last=True)
    self.attention = nn.MultiheadAttention(hidden, config.attention_heads)
    self.res_blocks = nn.ModuleList(
      nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(config.res_blocks)
    )
    self.decoder = _mlp(config.decoder_dims, hidden, relu_last=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    cfg = self.config
    h = self.encoder(x[:, : cfg.seq_len, : cfg.feature_dim])
    h = h.transpose(0, 1)  # nn.MultiheadAttention is sequence-first by default
    attended, _ = self.attention(h, h, h, need_weights=cfg.need_weights)
    h = attended + h
    for block in self.res_blocks:
      h = block(h) + h
    return self.decoder(h).sum(0).squeeze(-1)


def lambdarank_loss(
  preds: torch.Tensor,
  labels: torch.Tensor,
  k: int | None = None,
  eps: float = 1e-10,
  sigma: float = 1.0,
  boolean_index: bool = True,
) -> torch.Tensor:
  """TLP's LambdaRank loss of one ranked list ``preds (N,)`` against ``labels (N,)``."""
  y_pred = preds[None, :]
  y_true = labels[None, :]
  n = y_pred.shape[1]
  pred_sorted, by_pred = y_pred.sort(descending=True, dim=-1)
  ideal_sorted, _ = y_true.sort(descending=True, dim=-1)
  true_in_pred_order = torch.gather(y_true, 1, by_pred)

  label_diffs = true_in_pred_order[:, :, None] - true_in_pred_order[:, None, :]
  pairs = torch.isfinite(label_diffs) & (label_diffs > 0)
  if k is not None:
    top_k = torch.zeros((n, n), dtype=torch.bool, device=preds.device)
    top_k[:k, :k] = True
    pairs = pairs & top_k

  true_in_pred_order = true_in_pred_order.clamp(min=0.0)
  ideal_sorted = ideal_sorted.clamp(min=0.0)
  positions = torch.arange(1, n + 1, device=preds.device, dtype=torch.float32)
  discounts = torch.log2(1.0 + positions)[None, :]
  max_dcg = ((torch.pow(2.0, ideal_sorted) - 1.0) / discounts)[:, :k].sum(-1).clamp(min=eps)
  gains = (torch.pow(2.0, true_in_pred_order) - 1.0) / max_dcg[:, None]
  weights = torch.abs(
    discounts[:, :, None].reciprocal() - discounts[:, None, :].reciprocal()
  ) * torch.abs(gains[:, :, None] - gains[:, None, :])

  score_diffs = (pred_sorted[:, :, None] - pred_sorted[:, None, :]).clamp(min=-1e8, max=1e8)
  score_diffs = torch.where(torch.isnan(score_diffs), torch.zeros_like(score_diffs), score_diffs)
  probs = (torch.sigmoid(sigma * score_diffs).clamp(min=eps) ** weights).clamp(min=eps)
  pair_losses = torch.log2(probs)
  if boolean_index:
    return -torch.sum(pair_losses[pairs])
  return -torch.sum(torch.where(pairs, pair_losses, torch.zeros_like(pair_losses)))


@dataclasses.dataclass(frozen=True)
class TorchTrainConfig:
  """How the reference step runs.

  Attributes:
    learning_rate, weight_decay, clip_norm: the original's Adam and gradient clip.
    amp_dtype: ``None`` (float32) or ``torch.bfloat16`` (autocast of the model; loss in float32).
    compile: run the model and loss under ``torch.compile`` (the optimizer stays eager).
    sync_loss_every_step: call ``loss.item()`` every step, as the original loop does.
    boolean_index: see ``lambdarank_loss``; forced to False under ``compile``.
  """

  learning_rate: float = 7e-4
  weight_decay: float = 1e-6
  clip_norm: float = 0.5
  amp_dtype: Any = None
  compile: bool = False
  sync_loss_every_step: bool = True
  boolean_index: bool = True


class TorchTrainer:
  """One training step of the original recipe on a model: forward, LambdaRank, backward, Adam."""

  def __init__(self, model: TLPTorchModel, config: TorchTrainConfig):
    self.model = model
    self.config = config
    self.optimizer = torch.optim.Adam(
      model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    boolean_index = config.boolean_index and not config.compile

    def forward_loss(x, y):
      with torch.autocast(
        device_type=x.device.type,
        dtype=config.amp_dtype or torch.float32,
        enabled=config.amp_dtype is not None,
      ):
        preds = model(x)
      return lambdarank_loss(preds.float(), y, boolean_index=boolean_index)

    self._forward_loss = torch.compile(forward_loss) if config.compile else forward_loss
    self.loss_sum = 0.0

  def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One optimizer step on ``x (B, L, E)``, ``y (B,)``; returns the loss tensor."""
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    loss = self._forward_loss(x, y)
    loss.backward()
    nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
    self.optimizer.step()
    if self.config.sync_loss_every_step:
      self.loss_sum += loss.item()
    return loss


def _as_tensor(a: Any) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def load_flax_params(model: TLPTorchModel, params: Mapping[str, Any]) -> None:
  """Copies ``tlp_jax.train.model.TLPModel`` parameters (one head, one network) into ``model``.

  Flax ``Dense`` kernels are ``(in, out)``, ``torch.nn.Linear`` weights ``(out, in)``; the q/k/v
  projections go into ``MultiheadAttention``'s packed ``in_proj`` in that order; the decoder is
  head 0 of the vmapped ``heads`` stack.
  """

  def set_linear(linear: nn.Linear, dense: Mapping[str, Any], head: int | None = None):
    kernel, bias = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
    if head is not None:
      kernel, bias = kernel[head], bias[head]
    if linear.weight.shape != (kernel.shape[1], kernel.shape[0]):
      raise ValueError(
        f"shape mismatch: torch {tuple(linear.weight.shape)} vs flax kernel {kernel.shape}"
      )
    with torch.no_grad():
      linear.weight.copy_(_as_tensor(kernel.T))
      linear.bias.copy_(_as_tensor(bias))

  encoder = [m for m in model.encoder if isinstance(m, nn.Linear)]
  for i, linear in enumerate(encoder):
    set_linear(linear, params[f"encoder_{i}"])
  att = params["attention"]
  with torch.no_grad():
    model.attention.in_proj_weight.copy_(
      _as_tensor(
        np.concatenate([np.asarray(att[n]["kernel"]).T for n in ("query", "key", "value")], axis=0)
      )
    )
    model.attention.in_proj_bias.copy_(
      _as_tensor(
        np.concatenate([np.asarray(att[n]["bias"]) for n in ("query", "key", "value")], axis=0)
      )
    )
  set_linear(model.attention.out_proj, att["out"])
  for i, block in enumerate(model.res_blocks):
    set_linear(block[0], params[f"res_block_{i}"])
  heads = params["heads"]
  if np.asarray(heads["dense_0"]["kernel"]).shape[0] != 1:
    raise ValueError("the reference model has one output head; got a multi-head parameter tree")
  decoder = [m for m in model.decoder if isinstance(m, nn.Linear)]
  for i, linear in enumerate(decoder):
    set_linear(linear, heads[f"dense_{i}"], head=0)


def model_config_from_tlp(tlp_config: Any) -> TorchModelConfig:
  """The reference dimensions of a ``tlp_jax.train.model.TLPConfig`` (the original model only)."""
  if (
    tlp_config.input_norm != "none"
    or tlp_config.num_hardware_heads != 1
    or tlp_config.ensemble_size != 1
  ):
    raise ValueError(
      "the reference implements the original model only (one head, one network, no input_norm)"
    )
  return TorchModelConfig(
    feature_dim=tlp_config.feature_dim,
    seq_len=tlp_config.seq_len,
    encoder_dims=tuple(tlp_config.encoder_dims),
    attention_heads=tlp_config.attention_heads,
    res_blocks=tlp_config.res_blocks,
    decoder_dims=tuple(tlp_config.decoder_dims),
  )
