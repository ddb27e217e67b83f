"""TLP's attention cost model in Flax linen, with per-hardware (MTL-TLP) decoder heads.

Structure follows the original ``AttentionModule`` of TLP's ``tlp_train.py`` exactly:

    x[:, :seq_len, :feature_dim]
    -> encoder  Linear E->64->128->256->256, ReLU after every Linear
    -> PyTorch-style multi-head self attention (in-projection with bias, out-projection with
       bias, scaled dot product, no dropout) over the step axis, plus a residual
    -> ``res_blocks`` x  (x = relu(Linear256(x)) + x)
    -> decoder 256->256->128->64->1 per step (ReLU between, none after the last)
    -> SUM over the step axis, padding rows included (no positional encoding, no layer norm,
       no padding mask).

The original also builds an ``l0`` layer that ``forward`` never calls; it is left out here since
it cannot change any output.

MTL-TLP: the decoder is ``nn.vmap``-ed over ``num_hardware_heads`` stacked parameter sets (one
per hardware), so the model returns ``(batch, num_hardware_heads)``; the single-hardware model is
the same code with ``num_hardware_heads=1``.

Ensembles (``ensemble_size`` > 1, not in the original): the whole network is ``nn.vmap``-ed over
``ensemble_size`` independently initialised parameter sets (params under ``members/``, leading
axis = member). Training gives each member its own loss (``per_member=True``), so the members
train as independent models that share only the batch order; predictions are the mean of the
members' scores. With ``ensemble_size=1`` the parameter tree is exactly TLP's.

Initialisation mirrors PyTorch's defaults (``nn.Linear``: kernel and bias uniform in
+-1/sqrt(fan_in); ``nn.MultiheadAttention``: Xavier-uniform over the packed (3E, E) in-projection,
zero biases), so that training dynamics match the original recipe.

Improvements over the original (off by default; see ``TLPConfig``): ``input_norm`` and
``ensemble_size``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tlp_jax.core import predictor

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def _identity(x: Array) -> Array:
  return x


def _signed_log1p(x: Array) -> Array:
  # Raw split factors / extents reach thousands; compress them while keeping 0 -> 0 (so padding
  # rows stay all-zero) and the sign.
  return jnp.sign(x) * jnp.log1p(jnp.abs(x))


# name -> elementwise transform applied to the selected feature columns before the encoder.
INPUT_NORMS: dict[str, Callable[[Array], Array]] = {
  "none": _identity,
  "log1p": _signed_log1p,
}


# ``TLPConfig.dtype`` "auto": bfloat16 compute on GPUs and TPUs, float32 on CPUs (where XLA
# emulates bfloat16 matmuls and would be slower). ``resolve_dtype`` picks one where the trained
# model's config is made, so a workdir and an exported model always record a concrete dtype.
AUTO_DTYPE = "auto"


def resolve_dtype(dtype: str, platform: str) -> str:
  """The compute dtype ``dtype`` means on a backend ``platform`` ("cpu", "gpu", "tpu", ...)."""
  if dtype != AUTO_DTYPE:
    return dtype
  return "float32" if platform == "cpu" else "bfloat16"


# ``SelfAttention.implementation`` "auto": cuDNN's fused attention over the token axis padded to
# a multiple of 8 where it runs (NVIDIA GPUs from Ampere on, bfloat16/float16 compute), else the
# padded einsum; the same function either way (bench/README.md, "Fused attention").
AUTO_ATTENTION = "auto"


def resolve_attention(implementation: str, dtype: str, cuda: bool) -> str:
  """The attention implementation ``implementation`` means for a concrete compute ``dtype`` on
  a device where cuDNN's fused attention runs (``cuda``: ``train.data.has_cudnn_attention``) or
  not."""
  if implementation != AUTO_ATTENTION:
    return implementation
  return "cudnn_pad8" if cuda and dtype in ("bfloat16", "float16") else "einsum_pad8"


@dataclasses.dataclass(frozen=True)
class TLPConfig:
  """Hyper-parameters of the TLP attention model. Defaults reproduce the original TLP model.

  Attributes:
    feature_dim: per-step feature width E (TLP's ``fea_size``); inputs are cropped to it.
    seq_len: number of steps L (TLP's ``step_size``); inputs are cropped to it.
    encoder_dims: widths of the encoder Linear layers (TLP ``hidden_dim``); the last one is the
      attention / residual width.
    attention_heads: heads of the self attention (TLP ``attention_head``).
    res_blocks: number of residual blocks ``relu(Linear(x)) + x`` (TLP ``res_block_cnt``).
    decoder_dims: widths of the decoder Linear layers (TLP ``out_dim``); must end in 1.
    num_hardware_heads: number of hardware decoder heads (1 = TLP, >1 = MTL-TLP).
    dtype: compute dtype name ("float32", "bfloat16", ...); parameters stay float32. "auto"
      (``AUTO_DTYPE``) in a training config only: ``resolve_dtype`` makes it concrete.
    input_norm: key of ``INPUT_NORMS`` applied to the input features. Original: "none".
    ensemble_size: independently initialised copies of the whole network whose scores are
      averaged (1 = a single network, as the original).
  """

  feature_dim: int = 22
  seq_len: int = 25
  encoder_dims: tuple[int, ...] = (64, 128, 256, 256)
  attention_heads: int = 8
  res_blocks: int = 2
  decoder_dims: tuple[int, ...] = (256, 128, 64, 1)
  num_hardware_heads: int = 1
  dtype: str = "float32"
  input_norm: str = "none"
  ensemble_size: int = 1

  def __post_init__(self):
    # Lists from ConfigDicts / JSON would make the dataclass unhashable (flax needs hashable
    # module attributes), so normalise sequences to tuples.
    for name in ("encoder_dims", "decoder_dims"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if not self.encoder_dims or not self.decoder_dims:
      raise ValueError("encoder_dims and decoder_dims must be non-empty")
    if self.decoder_dims[-1] != 1:
      raise ValueError(f"decoder_dims must end in 1, got {self.decoder_dims}")
    if self.hidden_dim % self.attention_heads:
      raise ValueError(
        f"attention width {self.hidden_dim} is not divisible by "
        f"attention_heads={self.attention_heads}"
      )
    if self.num_hardware_heads < 1:
      raise ValueError(f"num_hardware_heads must be >= 1, got {self.num_hardware_heads}")
    if self.ensemble_size < 1:
      raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
    if self.input_norm not in INPUT_NORMS:
      raise ValueError(f"unknown input_norm {self.input_norm!r}; known: {sorted(INPUT_NORMS)}")
    if self.dtype != AUTO_DTYPE:
      jnp.dtype(self.dtype)  # raises on an unknown dtype name

  @property
  def hidden_dim(self) -> int:
    """Width of the attention and residual blocks (last encoder width)."""
    return self.encoder_dims[-1]

  def to_dict(self) -> dict[str, Any]:
    """Plain-Python dict of the fields (JSON-serialisable)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TLPConfig:
    """Inverse of ``to_dict``; unknown keys are an error.

    Also reads the model configs stored by earlier versions (``predictor.upgrade_model_config``:
    ``num_heads``, and the removed options at the values that remain).
    """
    d = predictor.upgrade_model_config(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown TLPConfig fields: {sorted(unknown)}; known: {sorted(names)}")
    return cls(**d)


# ----------------------------------------------------------------------------------------------
# PyTorch-default initialisers
# ----------------------------------------------------------------------------------------------


def _uniform(limit: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def torch_linear(features: int, fan_in: int, dtype, name: str | None = None) -> nn.Dense:
  """``nn.Dense`` initialised like ``torch.nn.Linear``.

  Kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(fan_in)), for the kernel and the bias.
  """
  bound = 1.0 / math.sqrt(fan_in)
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=_uniform(bound),
    bias_init=_uniform(bound),
    name=name,
  )


class DenseParams(nn.Module):
  """The ``kernel`` (fan_in, features) and ``bias`` (features,) of an ``nn.Dense`` with the same
  name, shapes, initialisers and parameter dtype, returned instead of applied: for layers whose
  matmul is fused with others (the attention's q/k/v) while the parameter tree and its initial
  values stay exactly those of the plain layers."""

  fan_in: int
  features: int
  kernel_init: Callable
  bias_init: Callable

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    kernel = self.param("kernel", self.kernel_init, (self.fan_in, self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    return kernel, bias


def _matmul(x: Array, kernel: Array, bias: Array, dtype) -> Array:
  """``nn.Dense``'s computation: ``x @ kernel + bias`` in ``dtype`` (parameters cast to it)."""
  y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())))
  return y + bias.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
  """``torch.nn.MultiheadAttention(dim, heads)`` applied as self attention, batch-major.

  Parameters: ``query``, ``key``, ``value``, ``out`` Dense layers of shape (dim, dim) with bias.
  """

  dim: int
  heads: int
  dtype: Any = jnp.float32
  # "einsum": the einsum/softmax below (the reference); "einsum_padN": the same with the token
  # axis padded to a multiple of N inside the layer; otherwise the ``implementation`` of
  # jax.nn.dot_product_attention ("cudnn": its fused kernel, GPU with bfloat16/float16 only;
  # "xla"), optionally padded the same way ("cudnn_padN", "xla_padN"): the same function of q,
  # k, v.
  implementation: str = "einsum"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: (B, L, dim) -> (B, L, dim)."""
    head_dim = self.dim // self.heads
    # PyTorch packs q/k/v into one (3*dim, dim) matrix and Xavier-initialises it as a whole.
    in_bound = math.sqrt(6.0 / (self.dim + 3 * self.dim))
    # The parameters stay TLP's three (dim, dim) layers; one GEMM against their concatenation
    # reads x once instead of three times (bench/README.md, "Fewer, aligned GEMMs in the step").
    layers = [
      DenseParams(self.dim, self.dim, _uniform(in_bound), nn.initializers.zeros, name=name)()
      for name in ("query", "key", "value")
    ]
    kernel = jnp.concatenate([w for w, _ in layers], axis=1)
    bias = jnp.concatenate([b_ for _, b_ in layers])
    b, steps, _ = x.shape
    qkv = _matmul(x, kernel, bias, self.dtype).reshape(b, steps, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # "<kind>_padN": the same function with the token axis zero-padded to a multiple of N and
    # the padded keys masked out. With odd lengths (25 + 40 = 65 tokens, a model reading all 40
    # stored loop tokens) deterministic cuBLAS falls back to unaligned batched GEMM kernels
    # (bench/README.md, kernel profile). The default reads 64 tokens and pads nothing. The padded
    # rows of q, k and v are zeros and their gradients are dropped by the pad's transpose, so
    # the result does not depend on what a fused kernel writes for masked keys.
    kind, _, multiple = self.implementation.partition("_pad")
    pad = -steps % int(multiple or 1)
    if pad:
      q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
    if kind == "einsum":
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      logits = logits.astype(jnp.float32)
      if pad:
        logits = jnp.where(jnp.arange(steps + pad) < steps, logits, -jnp.inf)
      probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)[:, :steps]
    else:
      lengths = jnp.full((b,), steps, jnp.int32) if pad else None
      ctx = jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation=kind
      )[:, :steps]
    ctx = ctx.reshape(b, steps, self.dim)
    out_bound = 1.0 / math.sqrt(self.dim)
    return nn.Dense(
      self.dim,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_uniform(out_bound),
      bias_init=nn.initializers.zeros,
      name="out",
    )(ctx)


class Decoder(nn.Module):
  """Per-step MLP decoder summed over steps, padding steps included (as TLP): (B, L, D) -> (B,)."""

  config: TLPConfig

  @nn.compact
  def __call__(self, h: Array) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    fan_in = cfg.hidden_dim
    for i, width in enumerate(cfg.decoder_dims):
      h = torch_linear(width, fan_in, dtype, name=f"dense_{i}")(h)
      if i < len(cfg.decoder_dims) - 1:
        h = nn.relu(h)
      fan_in = width
    return jnp.sum(h[..., 0].astype(jnp.float32), axis=-1)


class TLPModel(nn.Module):
  """TLP attention regressor: ``(B, L, E)`` features -> ``(B, num_hardware_heads)`` scores.

  ``per_member=True`` returns each ensemble member's scores,
  ``(B, ensemble_size, num_hardware_heads)``
  (what training ranks, one loss per member); the default returns their mean.
  """

  config: TLPConfig
  # SelfAttention.implementation (not a model hyper-parameter: the same function either way).
  attention_impl: str = "einsum"

  @nn.compact
  def __call__(self, x: Array, per_member: bool = False) -> Array:
    cfg = self.config
    if cfg.ensemble_size > 1:
      members = nn.vmap(
        TLPModel,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=1,
        axis_size=cfg.ensemble_size,
      )(dataclasses.replace(cfg, ensemble_size=1), self.attention_impl, name="members")(x)
      return members if per_member else jnp.mean(members, axis=1)
    scores = self._network(x)
    return scores[:, None, :] if per_member else scores

  def _network(self, x: Array) -> Array:
    cfg = self.config
    if cfg.dtype == AUTO_DTYPE:
      raise ValueError('model dtype "auto" is for configs: resolve it (model.resolve_dtype) first')
    dtype = jnp.dtype(cfg.dtype)
    if x.ndim != 3:
      raise ValueError(f"expected features (batch, steps, width), got shape {x.shape}")
    if x.shape[1] < cfg.seq_len or x.shape[2] < cfg.feature_dim:
      raise ValueError(
        f"features {x.shape[1:]} are smaller than the model's "
        f"(seq_len, feature_dim)=({cfg.seq_len}, {cfg.feature_dim})"
      )
    # As the original: crop to (step_size, fea_size).
    x = x[:, : cfg.seq_len, : cfg.feature_dim].astype(jnp.float32)
    h = INPUT_NORMS[cfg.input_norm](x).astype(dtype)
    fan_in = cfg.feature_dim
    for i, width in enumerate(cfg.encoder_dims):
      h = nn.relu(torch_linear(width, fan_in, dtype, name=f"encoder_{i}")(h))
      fan_in = width

    attention = SelfAttention(
      cfg.hidden_dim,
      cfg.attention_heads,
      dtype=dtype,
      implementation=self.attention_impl,
      name="attention",
    )
    h = attention(h) + h
    for i in range(cfg.res_blocks):
      h = nn.relu(torch_linear(cfg.hidden_dim, cfg.hidden_dim, dtype, name=f"res_block_{i}")(h)) + h

    heads = nn.vmap(
      Decoder,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=None,
      out_axes=-1,
      axis_size=cfg.num_hardware_heads,
    )
    return heads(cfg, name="heads")(h)


def init_params(config: TLPConfig, rng: Array) -> dict:
  """Initialise the model's parameters (the ``params`` collection) for ``config``."""
  dummy = jnp.zeros((1, config.seq_len, config.feature_dim), jnp.float32)
  return TLPModel(config).init(rng, dummy)["params"]
