"""Training library: data-parallel ``pmap`` loop, Optax schedules, Orbax checkpoints.

``train_and_evaluate(config, workdir)`` is the whole job behind ``train.py``:

* the dataset comes from ``data_pipelines.loader.load_arrays`` as contiguous arrays; the
  configured hardware heads are selected (target first) and, for MTL-TLP transfer, all but N of
  the target head's training labels are masked (``few_shot``);
* the global batch is split ``(devices, per_device, ...)`` over every device of every host; the
  loss is computed on the *whole* global batch (per-device predictions are all-gathered), so
  LambdaRank ranks the same list as the original single-process code, whatever the device count;
* every epoch visits a fresh permutation of the training set (NumPy, from ``(seed, epoch)``);
  ``ceil(N / batch)`` steps, the last batch padded with masked rows (the losses ignore them), so
  every record is used once per epoch, as TLP's data loader does;
* the training arrays are either copied once to every local device and gathered there by index
  (``data_placement="device"``: no host->device traffic per step) or gathered on the host per
  step (``"host"``); both give identical batches;
* validation every ``eval_every_epochs`` epochs (1 = each epoch, as TLP; the last epoch always):
  per-head loss (summed over the validation batches, as TLP reports it)
  and the quick top-k of ``tlp_jax.core.metrics``;
* Orbax checkpoints in ``workdir/checkpoints/latest`` (every ``checkpoint_every_steps`` and at
  each validated epoch end) and ``workdir/checkpoints/best`` (lowest target-head validation
  loss). The data order state (epoch, step in epoch) is part of the checkpoint, so a restarted
  run resumes exactly where the checkpoint was taken and ends with the same parameters as an
  unbroken run.

The model's hyper-parameters and the dataset metadata needed for export are written to
``workdir/model_config.json`` and ``workdir/dataset_meta.json``; ``restore_for_export`` reads
them back with the parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from tlp_jax.train import losses
from tlp_jax.core import metrics
from tlp_jax.train import model as model_lib
from tlp_jax.train import runtime

AXIS = "batch"
MODEL_CONFIG_FILE = "model_config.json"
DATASET_META_FILE = "dataset_meta.json"
TRAIN_CONFIG_FILE = "train_config.json"
CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"

# Independent random streams derived from the seed (numpy SeedSequence entropy tags).
_STREAM_SHUFFLE = 1
_STREAM_FEW_SHOT = 2


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir cannot be used (corrupted, or from an incompatible run)."""


# ---------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule, chosen by name from small tables.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer hyper-parameters (from the flat training config).

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
    step_decay_rate: ``step``: the factor (TLP default 1.0, i.e. constant).
  """

  optimizer: str = "adamw"
  schedule: str = "warmup_cosine"
  learning_rate: float = 7e-4
  weight_decay: float = 1e-6
  grad_clip_norm: float = 0.5
  warmup_epochs: float = 1.0
  end_learning_rate: float = 0.0
  step_decay_every_epochs: int = 16
  step_decay_rate: float = 0.5

  def __post_init__(self):
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZERS)}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown schedule {self.schedule!r}; known: {sorted(SCHEDULES)}")
    if self.step_decay_every_epochs < 1:
      raise ValueError(f"step_decay_every_epochs must be >= 1, got {self.step_decay_every_epochs}")


def _constant_schedule(cfg: OptimConfig, steps_per_epoch: int, total_steps: int):
  del steps_per_epoch, total_steps
  return optax.constant_schedule(cfg.learning_rate)


def _warmup_cosine_schedule(cfg: OptimConfig, steps_per_epoch: int, total_steps: int):
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.end_learning_rate)


def _step_schedule(cfg: OptimConfig, steps_per_epoch: int, total_steps: int):
  del total_steps
  # StepLR is stepped after each epoch, so epoch e trains at lr * gamma ** (e // step_size).
  return optax.exponential_decay(
      init_value=cfg.learning_rate,
      transition_steps=cfg.step_decay_every_epochs * steps_per_epoch,
      decay_rate=cfg.step_decay_rate, staircase=True)


SCHEDULES: dict[str, Callable[[OptimConfig, int, int], optax.Schedule]] = {
    "constant": _constant_schedule,
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
        lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), updates)
    return clipped, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _clip(cfg: OptimConfig, ensemble_size: int) -> list[optax.GradientTransformation]:
  if cfg.grad_clip_norm <= 0:
    return []
  if ensemble_size > 1:
    return [clip_by_member_norm(cfg.grad_clip_norm)]
  return [optax.clip_by_global_norm(cfg.grad_clip_norm)]


def _adam_l2(cfg: OptimConfig, schedule: optax.Schedule,
             clip: Sequence[optax.GradientTransformation]) -> optax.GradientTransformation:
  # PyTorch Adam(weight_decay): grad += wd * param after clipping, before the moments.
  return optax.chain(*clip, optax.add_decayed_weights(cfg.weight_decay),
                     optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                     optax.scale_by_learning_rate(schedule))


def _adamw(cfg: OptimConfig, schedule: optax.Schedule,
           clip: Sequence[optax.GradientTransformation]) -> optax.GradientTransformation:
  return optax.chain(*clip, optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                                        weight_decay=cfg.weight_decay))


OPTIMIZERS: dict[str, Callable[[OptimConfig, optax.Schedule,
                                Sequence[optax.GradientTransformation]],
                               optax.GradientTransformation]] = {
    "adam": _adam_l2,
    "adamw": _adamw,
}


def make_optimizer(cfg: OptimConfig, steps_per_epoch: int, total_steps: int,
                   ensemble_size: int = 1
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the Optax optimizer and its learning-rate schedule (a function of the step).

  ``ensemble_size`` > 1: the parameters are an ensemble's (leading member axis on every leaf);
  the gradient clip then applies per member. Adam and weight decay are elementwise already.
  """
  schedule = SCHEDULES[cfg.schedule](cfg, steps_per_epoch, total_steps)
  return OPTIMIZERS[cfg.optimizer](cfg, schedule, _clip(cfg, ensemble_size)), schedule


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def optim_config_from(config: ml_collections.ConfigDict) -> OptimConfig:
  """The ``OptimConfig`` fields of the flat training config."""
  names = [f.name for f in dataclasses.fields(OptimConfig)]
  return OptimConfig(**{n: config[n] for n in names if n in config})


# config.loop_tokens: whether the model reads the loop-nest store tokens of a dataset of the "loop"
# feature version. "auto": when the dataset has them; "required": refuse a dataset without them;
# "off": read TLP's step tokens only (the original's input, also on a loop dataset).
LOOP_TOKEN_MODES = ("auto", "required", "off")


def reads_loop_tokens(config: ml_collections.ConfigDict, dataset: Any) -> bool:
  """Whether a model trained with ``config`` on ``dataset`` reads its loop-nest store tokens."""
  mode = config.get("loop_tokens", "auto")
  if mode not in LOOP_TOKEN_MODES:
    raise ValueError(f"unknown loop_tokens {mode!r}; known: {', '.join(LOOP_TOKEN_MODES)}")
  loop_stores, _ = loop_feature_shape(dataset)
  if mode == "required" and not loop_stores:
    raise ValueError(
        f"config.loop_tokens='required' but dataset {getattr(dataset, 'config_name', '')!r} has no "
        "loop-nest features; build it with `python -m data_pipelines.build ... --loop_stores "
        "10` (needs TVM: pip install -e '.[tvm]')")
  return bool(loop_stores) and mode != "off"


def model_config_from(config: ml_collections.ConfigDict, num_heads: int,
                      dataset: Any | None = None) -> model_lib.TLPConfig:
  """``TLPConfig`` from ``config.model``, the number of hardware heads and the dataset.

  ``config.model.seq_len`` / ``feature_dim`` are the step-token crop (TLP's ``step_size`` /
  ``fea_size``). When the model reads a "loop" dataset's store tokens (``reads_loop_tokens``),
  its input grows by them: they sit after the dataset's step crop, so the model's step crop must
  equal the dataset's.
  """
  fields = dict(config.model.to_dict())
  fields["num_heads"] = num_heads
  if dataset is not None and reads_loop_tokens(config, dataset):
    loop_stores, loop_dim = loop_feature_shape(dataset)
    step_crop = (int(dataset.crop[0]) - loop_stores, int(dataset.crop[1]) - loop_dim)
    if (fields["seq_len"], fields["feature_dim"]) != step_crop:
      raise ValueError(
          f"the dataset's loop-nest tokens follow its {step_crop} step features, but the model's "
          f"step crop is ({fields['seq_len']}, {fields['feature_dim']}); set "
          f"model.seq_len={step_crop[0]}, model.feature_dim={step_crop[1]}, or loop_tokens='off'")
    fields["seq_len"] += loop_stores
    fields["feature_dim"] += loop_dim
  return model_lib.TLPConfig.from_dict(fields)


def loss_config_from(config: ml_collections.ConfigDict) -> losses.LossConfig:
  """``LossConfig`` from ``config.loss`` (name), ``config.group_by_task`` and, when present,
  ``config.loss_temperature`` (listwise loss) and ``config.aux_loss`` (name, "" = none),
  ``config.aux_loss_weight``, ``config.aux_loss_group_by_task``."""
  return losses.LossConfig(name=config.loss, group_by_task=bool(config.group_by_task),
                           temperature=float(config.get("loss_temperature", 1.0)),
                           aux_name=config.get("aux_loss", "") or None,
                           aux_weight=float(config.get("aux_loss_weight", 0.0)),
                           aux_group_by_task=bool(config.get("aux_loss_group_by_task", False)))


# ---------------------------------------------------------------------------------------------
# Data: head selection, few-shot masking, epoch order.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's arrays with the configured heads only (column 0 = target hardware)."""

  features: np.ndarray  # (N, L, E) float32
  scores: np.ndarray  # (N, H) float32
  mask: np.ndarray  # (N, H) bool
  task_index: np.ndarray  # (N,) int32

  @property
  def size(self) -> int:
    return int(self.features.shape[0])

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in (self.features, self.scores, self.mask, self.task_index))


def head_columns(dataset_hardware: Sequence[str], wanted: Sequence[str]) -> list[int]:
  """Column of each wanted hardware in the dataset's ``(N, H)`` arrays; all when none wanted."""
  dataset_hardware = [str(h) for h in dataset_hardware]
  if not wanted:
    return list(range(len(dataset_hardware)))
  missing = [h for h in wanted if h not in dataset_hardware]
  if missing:
    raise ValueError(f"config.hardware {list(wanted)}: {missing} not in the dataset's hardware "
                     f"{dataset_hardware}")
  if len(set(wanted)) != len(wanted):
    raise ValueError(f"config.hardware has duplicates: {list(wanted)}")
  return [dataset_hardware.index(h) for h in wanted]


def select_split(split: Any, columns: Sequence[int]) -> Split:
  """Keeps the given head columns of an ``loader.SplitArrays``; drops rows with no label."""
  cols = np.asarray(columns, dtype=np.int64)
  mask = np.asarray(split.mask, dtype=bool)[:, cols]
  keep = mask.any(axis=1)
  rows = None if keep.all() else np.flatnonzero(keep)

  def take(a):
    a = np.asarray(a)
    return a if rows is None else a[rows]

  return Split(features=np.ascontiguousarray(take(split.features), dtype=np.float32),
               scores=np.ascontiguousarray(take(np.asarray(split.scores)[:, cols]),
                                           dtype=np.float32),
               mask=np.ascontiguousarray(take(mask)),
               task_index=np.ascontiguousarray(take(split.task_index), dtype=np.int32))


def few_shot_mask(mask: np.ndarray, num_labels: int, fraction: float, seed: int) -> np.ndarray:
  """Masks all but ``num_labels`` (or ``fraction``) of the target head's (column 0) labels.

  The kept labels are a uniformly random subset of the present ones, fixed by ``seed``.
  ``num_labels < 0`` and ``fraction >= 1`` keep everything.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"few_shot.fraction must be in [0, 1], got {fraction}")
  present = np.flatnonzero(mask[:, 0])
  keep = present.size
  if num_labels >= 0:
    keep = min(keep, int(num_labels))
  if fraction < 1.0:
    keep = min(keep, int(math.floor(fraction * present.size)))
  if keep == present.size:
    return mask
  rng = np.random.default_rng([seed, _STREAM_FEW_SHOT])
  kept = rng.permutation(present)[:keep]
  out = mask.copy()
  out[:, 0] = False
  out[kept, 0] = True
  logging.info("few-shot: kept %d of %d target-head training labels", keep, present.size)
  return out


BATCH_ORDERS = ("random", "by_task")
# Values of jax.default_matmul_precision for config.matmul_precision.
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def epoch_order(seed: int, epoch: int, n: int, steps_per_epoch: int,
                global_batch: int, task_index: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Row order of one epoch padded to whole batches: ``(order, valid)``, both ``(S * B,)``.

  With ``task_index`` (``batch_order="by_task"``) the epoch visits whole tasks in a random
  order, each task's programs shuffled, so a batch holds all programs of a few tasks and a
  within-task ranking loss sees every pair of them; without it (TLP) rows are shuffled freely.
  Padding rows point at row 0 and are invalid (their labels are masked in the step).
  """
  rng = np.random.default_rng([seed, _STREAM_SHUFFLE, epoch])
  perm = rng.permutation(n).astype(np.int32)
  if task_index is not None:
    task_index = np.asarray(task_index)
    task_position = rng.permutation(int(task_index.max()) + 1)[task_index[perm]]
    perm = perm[np.argsort(task_position, kind="stable")]
  total = steps_per_epoch * global_batch
  order = np.zeros(total, np.int32)
  order[:n] = perm
  valid = np.arange(total) < n
  return order, valid


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a global batch maps onto processes and devices."""

  global_batch: int
  num_devices: int  # over all processes
  local_devices: int
  process_index: int

  @property
  def per_device(self) -> int:
    return self.global_batch // self.num_devices

  @property
  def per_process(self) -> int:
    return self.per_device * self.local_devices

  @classmethod
  def create(cls, global_batch: int, devices: Sequence[Any] | None = None) -> "BatchLayout":
    """Layout for ``devices`` (default: all local devices, over ``jax.process_count()`` hosts)."""
    local = list(devices) if devices is not None else jax.local_devices()
    num_devices = len(local) * jax.process_count()
    if global_batch <= 0 or global_batch % num_devices:
      raise ValueError(f"batch size {global_batch} is not divisible by the number of devices "
                       f"{num_devices} ({jax.process_count()} process(es) x {len(local)} local "
                       "devices); choose a multiple of the device count")
    return cls(global_batch, num_devices, len(local), jax.process_index())

  def local_slice(self, step_in_epoch: int) -> slice:
    """This process's rows of a step's global batch, as a slice of the epoch order."""
    start = step_in_epoch * self.global_batch + self.process_index * self.per_process
    return slice(start, start + self.per_process)


def host_batch(split: Split, rows: np.ndarray, valid: np.ndarray,
               layout: BatchLayout) -> tuple[np.ndarray, ...]:
  """Gathers ``rows`` on the host as ``(local_devices, per_device, ...)`` arrays."""
  shape = (layout.local_devices, layout.per_device)
  mask = split.mask[rows] & valid[:, None]
  return (split.features[rows].reshape(shape + split.features.shape[1:]),
          split.scores[rows].reshape(shape + split.scores.shape[1:]),
          mask.reshape(shape + mask.shape[1:]),
          split.task_index[rows].reshape(shape))


def first_replica(tree: Any) -> Any:
  """NumPy copy of this process's first device's slice of pmapped (replicated) outputs.

  Reads only a local shard: indexing the global array (``x[0]``) would run a computation over
  all processes' devices, which in a multi-host run only process 0 can answer alone and which
  desynchronises the processes' collective programs.
  """
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def replicate_to_devices(tree: Any, devices: Sequence[Any]) -> Any:
  """Copies every array of ``tree`` to each device, as pmap's ``(devices, ...)`` inputs.

  Unlike ``flax.jax_utils.replicate`` no ``(devices, ...)`` host copy is made, so a large
  training set needs only its own size in host memory.
  """
  # The same sharding (mesh axis named like pmap's axis) as pmap's outputs, so a step compiled
  # for these inputs is reused when the state it returns is fed back.
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))

  def put(x):
    x = np.asarray(x)
    shards = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, shards)

  return jax.tree_util.tree_map(put, tree)


# ---------------------------------------------------------------------------------------------
# Train state and the pmapped steps (top-level functions; pmap is applied where the loop is built)
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (the data order follows from ``step``)."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data of the run's PRNG key


def create_train_state(model_config: model_lib.TLPConfig, tx: optax.GradientTransformation,
                       seed: int) -> TrainState:
  """Initial state: PyTorch-style initialised parameters from ``seed``, fresh optimizer state."""
  # Legacy uint32 keys: plain arrays that checkpoint like any other.
  rng = jax.random.PRNGKey(seed)
  init_rng, rng = jax.random.split(rng)
  params = model_lib.init_params(model_config, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def per_head_losses(loss_config: losses.LossConfig, preds: jax.Array, scores: jax.Array,
                    mask: jax.Array, task_index: jax.Array) -> jax.Array:
  """``(H,)`` loss of each head on a batch (their sum is the training loss)."""
  return jnp.stack([
      losses.multi_head_loss(loss_config, preds[:, h:h + 1], scores[:, h:h + 1],
                             mask[:, h:h + 1], task_index) for h in range(preds.shape[1])])


def _gather(x: jax.Array) -> jax.Array:
  return jax.lax.all_gather(x, AXIS, tiled=True)


def train_step(state: TrainState, features: jax.Array, scores: jax.Array, mask: jax.Array,
               task_index: jax.Array, *, model: model_lib.TLPModel,
               tx: optax.GradientTransformation,
               loss_config: losses.LossConfig) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on this device's shard of the global batch (inside ``pmap``).

  The loss is a function of the *global* batch (a ranking loss couples all items), so
  predictions are all-gathered, the loss and its gradient w.r.t. all predictions are computed
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
  return new_state, {"loss": loss, "loss_per_head": per_head,
                     "grad_norm": optax.tree.norm(grads),
                     "labels": jnp.sum(_gather(mask), axis=0)}


def train_step_resident(state: TrainState, data: tuple[jax.Array, ...], order: jax.Array,
                        valid: jax.Array, *, steps_per_epoch: int, global_batch: int,
                        **step_kwargs) -> tuple[TrainState, dict[str, jax.Array]]:
  """``train_step`` on a batch gathered on device from the resident training arrays.

  ``data = (features, scores, mask, task_index)`` of the whole training set and the epoch's
  padded ``order``/``valid`` live on every device; the step's rows follow from ``state.step``.
  """
  features, scores, mask, task_index = data
  n = global_batch // jax.lax.psum(1, AXIS)
  start = (state.step % steps_per_epoch) * global_batch + jax.lax.axis_index(AXIS) * n
  rows = jax.lax.dynamic_slice_in_dim(order, start, n)
  ok = jax.lax.dynamic_slice_in_dim(valid, start, n)
  return train_step(state, features[rows], scores[rows], mask[rows] & ok[:, None],
                    task_index[rows], **step_kwargs)


def eval_step(params: Any, features: jax.Array, scores: jax.Array, mask: jax.Array,
              task_index: jax.Array, *, model: model_lib.TLPModel,
              loss_config: losses.LossConfig) -> tuple[jax.Array, jax.Array]:
  """Predictions of the global batch ``(B, H)`` and its per-head losses ``(H,)`` (in ``pmap``)."""
  preds = _gather(model.apply({"params": params}, features))
  per_head = per_head_losses(loss_config, preds, _gather(scores), _gather(mask),
                             _gather(task_index))
  return preds, per_head


# ---------------------------------------------------------------------------------------------
# Metric writer (TensorBoard event files)
# ---------------------------------------------------------------------------------------------


class MetricWriter:
  """Scalars to TensorBoard event files in ``logdir`` and to the log.

  Same methods as ``clu.metric_writers.MetricWriter`` (``write_scalars``, ``write_hparams``,
  ``flush``, ``close``). clu's TensorBoard writer needs TensorFlow, which this project does not
  install, so the events are written with tensorboardX; only process 0 writes files.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes ``{name: value}`` at ``step``."""
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))
    if self._writer is not None:
      for k, v in scalars.items():
        self._writer.add_scalar(k, float(v), global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Records the run's hyper-parameters as a text summary."""
    if self._writer is not None:
      self._writer.add_text("hparams", json.dumps(hparams, indent=1, default=str), 0)

  def flush(self) -> None:
    """Flushes pending events to disk."""
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _state_to_tree(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "rng": state.rng}


def checkpoint_managers(workdir: str, keep: int) -> tuple[ocp.CheckpointManager,
                                                          ocp.CheckpointManager]:
  """``(latest, best)`` Orbax managers under ``workdir/checkpoints``."""
  root = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  latest = ocp.CheckpointManager(
      os.path.join(root, LATEST),
      options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True))
  best = ocp.CheckpointManager(
      os.path.join(root, BEST), options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  return latest, best


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState,
                    meta: Mapping[str, Any]) -> None:
  """Saves an (unreplicated) state and its JSON metadata at ``state.step``."""
  step = int(jax.device_get(state.step))
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state_to_tree(state)), meta=ocp.args.JsonSave(dict(meta))))


def _step_entries(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  return [e for e in os.listdir(directory) if not e.startswith(".") and e != "_CHECKPOINT_METADATA"]


def restore_checkpoint(manager: ocp.CheckpointManager, template: TrainState | None,
                       step: int | None = None) -> tuple[Any, dict[str, Any]]:
  """Restores ``(state, meta)`` of ``step`` (default: latest); ``template`` gives the structure.

  With ``template=None`` the raw tree (nested dicts of NumPy arrays) is returned.

  Raises:
    CheckpointError: naming the directory, when there is no readable checkpoint although the
      directory has entries, or when restoring fails (corrupted or incompatible checkpoint).
  """
  directory = str(manager.directory)
  if step is None:
    step = manager.latest_step()
  if step is None:
    entries = _step_entries(directory)
    if entries:
      raise CheckpointError(
          f"checkpoint directory {directory} has entries {sorted(entries)[:5]} but no complete "
          "checkpoint; refusing to start over existing work (move the directory away to start "
          "fresh)")
    raise CheckpointError(f"no checkpoint in {directory}")
  path = os.path.join(directory, str(step))
  try:
    if template is None:
      state_args = ocp.args.StandardRestore()
    else:
      target = jax.tree_util.tree_map(
          lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), _state_to_tree(template))
      state_args = ocp.args.StandardRestore(target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=state_args, meta=ocp.args.JsonRestore()))
    tree, meta = restored["state"], restored["meta"]
  except Exception as e:  # Orbax raises many types; all mean the same thing here.
    raise CheckpointError(f"cannot restore checkpoint {path}: {type(e).__name__}: {e}") from e
  if template is None:
    return tree, dict(meta)
  _check_same_structure(template, tree, path)
  state = TrainState(step=jnp.asarray(tree["step"], jnp.int32), params=tree["params"],
                     opt_state=tree["opt_state"], rng=jnp.asarray(tree["rng"]))
  return state, dict(meta)


def _check_same_structure(template: TrainState, tree: Mapping[str, Any], path: str) -> None:
  want = jax.tree_util.tree_map(lambda x: (np.shape(x), np.asarray(x).dtype.name),
                                _state_to_tree(template))
  got = jax.tree_util.tree_map(lambda x: (np.shape(x), np.asarray(x).dtype.name), dict(tree))
  if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or (
      jax.tree_util.tree_leaves(want) != jax.tree_util.tree_leaves(got)):
    raise CheckpointError(f"checkpoint {path} does not match this run's model/optimizer "
                          "(different parameter shapes or optimizer state)")


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=str)
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _check_or_write_json(path: str, obj: Any, what: str, write: bool) -> None:
  """Writes ``obj`` to ``path``, or checks it equals what an earlier run wrote there."""
  obj = json.loads(json.dumps(obj, sort_keys=True, default=str))
  if os.path.exists(path):
    old = _read_json(path)
    if old != obj:
      diff = sorted(k for k in set(old) | set(obj) if old.get(k) != obj.get(k))
      raise CheckpointError(f"{path}: this workdir holds a run with a different {what} "
                            f"(differs in {diff}); use another workdir to start a new run")
    return
  if write:
    _write_json(path, obj)


def loop_feature_shape(dataset: Any) -> tuple[int, int]:
  """``(stores, width)`` of the dataset's loop-nest tokens; ``(0, 0)`` for TLP features only."""
  meta = getattr(dataset, "metadata", None) or {}
  return int(meta.get("loop_stores", 0)), int(meta.get("loop_dim", 0))


def dataset_meta(dataset: Any, hardware: Sequence[str], loop_tokens: bool = True
                 ) -> dict[str, Any]:
  """What the exporter needs about the model's input: head hardware, platform, crop, vocabulary.

  ``loop_tokens=False``: the model reads only the step tokens of a "loop" dataset, so its
  export is a TLP model (the step crop, no loop fields).
  """
  crop = dataset.crop
  loop_stores, loop_dim = loop_feature_shape(dataset)
  if loop_stores and not loop_tokens:
    crop = (int(crop[0]) - loop_stores, int(crop[1]) - loop_dim)
    loop_stores = loop_dim = 0
  meta = {"hardware": list(hardware), "platform": str(dataset.platform),
          "crop": [int(c) for c in crop] if crop is not None else None,
          "vocab_json": dataset.vocab_json}
  if loop_stores:
    meta.update(loop_stores=loop_stores, loop_dim=loop_dim)
  return meta


def restore_for_export(workdir: str, which: str = "best"
                       ) -> tuple[Any, model_lib.TLPConfig, dict[str, Any]]:
  """``(params, TLPConfig, meta)`` of a training run, for export and evaluation.

  Args:
    workdir: the training run's workdir.
    which: "best" (lowest target-head validation loss) or "latest".

  Returns:
    ``params`` as nested dicts of NumPy arrays; the model config; ``meta`` = the dataset
    metadata (``hardware``, ``platform``, ``crop``, ``vocab_json``) plus ``step``, ``epoch`` and
    the validation metrics of the restored checkpoint.
  """
  if which not in (BEST, LATEST):
    raise ValueError(f"which must be {BEST!r} or {LATEST!r}, got {which!r}")
  model_path = os.path.join(workdir, MODEL_CONFIG_FILE)
  meta_path = os.path.join(workdir, DATASET_META_FILE)
  for p in (model_path, meta_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} missing: {workdir} is not a training workdir")
  model_config = model_lib.TLPConfig.from_dict(_read_json(model_path))
  meta = dict(_read_json(meta_path))
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, which)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no {which} checkpoints in {directory}")
  manager = ocp.CheckpointManager(directory,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    tree, ckpt_meta = restore_checkpoint(manager, None)
  finally:
    manager.close()
  params = jax.tree_util.tree_map(np.asarray, tree["params"])
  meta.update({k: ckpt_meta[k] for k in ("step", "epoch", "validation") if k in ckpt_meta})
  return params, model_config, meta


def make_predict_fn(model_config: model_lib.TLPConfig, batch_size: int = 4096,
                    per_member: bool = False) -> Callable[[Any, np.ndarray], np.ndarray]:
  """``predict(params, features (N, L, E)) -> scores (N, H)`` on one device, in fixed batches.

  ``per_member``: each ensemble member's scores, ``(N, ensemble_size, H)``, instead of their
  mean. The last batch is padded to ``batch_size`` so only one program is compiled.
  """
  model = model_lib.TLPModel(model_config)

  @jax.jit
  def apply(params, x):
    return model.apply({"params": params}, x, per_member=per_member)

  def predict(params, features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    n = features.shape[0]
    shape = ((model_config.ensemble_size,) if per_member else ()) + (model_config.num_heads,)
    out = np.zeros((n,) + shape, np.float32)
    bs = max(1, min(batch_size, n))
    for start in range(0, n, bs):
      chunk = features[start:start + bs]
      m = chunk.shape[0]
      if m < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], np.float32)])
      out[start:start + m] = np.asarray(apply(params, chunk))[:m]
    return out

  return predict


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
  """What ``train_and_evaluate`` returns: the final state (host) and last validation metrics."""

  state: TrainState
  validation: dict[str, float]
  model_config: model_lib.TLPConfig
  hardware: tuple[str, ...]


def evaluate(p_eval_step: Callable, params: Any, split: Split, layout: BatchLayout,
             hardware: Sequence[str], ks: Sequence[int]) -> dict[str, float]:
  """Validation: per-head loss summed over sequential batches (as TLP), and quick top-k."""
  if split.size == 0:
    return {}
  steps = -(-split.size // layout.global_batch)
  order = np.zeros(steps * layout.global_batch, np.int32)
  order[:split.size] = np.arange(split.size, dtype=np.int32)
  valid = np.arange(order.size) < split.size
  loss_sum = np.zeros(len(hardware), np.float64)
  preds = np.zeros((steps * layout.global_batch, len(hardware)), np.float32)
  for s in range(steps):
    sl = layout.local_slice(s)
    batch = host_batch(split, order[sl], valid[sl], layout)
    p, per_head = first_replica(p_eval_step(params, *batch))
    preds[s * layout.global_batch:(s + 1) * layout.global_batch] = p
    loss_sum += per_head.astype(np.float64)
  preds = preds[:split.size]
  out = {"val_loss": float(loss_sum.sum())}
  for h, name in enumerate(hardware):
    out[f"val_loss/{name}"] = float(loss_sum[h])
  top = metrics.quick_top_ks(preds, split.scores, split.task_index, ks=tuple(ks), mask=split.mask)
  for k, per_head in top.items():
    for h, name in enumerate(hardware):
      out[f"val_top{k}/{name}"] = float(per_head[h])
  return out


def _load_dataset(config: ml_collections.ConfigDict) -> Any:
  from data_pipelines import loader  # pylint: disable=g-import-not-at-top
  return loader.load_arrays(config.data_dir, config.dataset)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset: Any | None = None,
                       devices: Sequence[Any] | None = None) -> TrainResult:
  """Trains (or resumes training), validating every ``config.eval_every_epochs`` epochs and
  after the last; checkpoints into ``workdir``.

  Args:
    config: training config (see ``configs/default.py``).
    workdir: output directory: checkpoints, TensorBoard events, model/dataset metadata. If it
      holds checkpoints of the same run, training resumes from the latest one.
    dataset: an ``loader.DatasetArrays`` (or an object with the same fields); loaded
      from ``config.data_dir`` / ``config.dataset`` when None.
    devices: local devices to use (default: all).

  Returns:
    The final state and validation metrics.
  """
  precision = config.get("matmul_precision", "default")
  if precision not in MATMUL_PRECISIONS:
    raise ValueError(f"config.matmul_precision must be one of {MATMUL_PRECISIONS}, "
                     f"got {precision!r}")
  batch_order = config.get("batch_order", "random")
  if batch_order not in BATCH_ORDERS:
    raise ValueError(f"config.batch_order must be one of {BATCH_ORDERS}, got {batch_order!r}")
  if int(config.get("eval_every_epochs", 1)) < 1:
    raise ValueError(f"config.eval_every_epochs must be >= 1, got {config.eval_every_epochs}")
  if (config.get("deterministic_gpu_ops", False) and jax.default_backend() == "gpu"
      and not runtime.deterministic_gpu_ops_enabled()):
    logging.warning("config.deterministic_gpu_ops is set but XLA_FLAGS lacks %s, and JAX has "
                    "started: this run is not reproducible across processes. Call "
                    "tlp_jax.train.runtime.enable_deterministic_gpu_ops() before JAX starts (train.py "
                    "does).", runtime.DETERMINISTIC_GPU_FLAG)
  # Steps are traced inside this context, so it sets the precision of every float32 matmul of
  # the model and loss ("default" is TF32 on Ampere/Hopper GPUs; "highest" is true float32).
  with jax.default_matmul_precision(precision):
    return _train_and_evaluate(config, workdir, dataset, devices)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, dataset: Any | None,
                        devices: Sequence[Any] | None) -> TrainResult:
  """``train_and_evaluate`` under the configured matmul precision."""
  # pmap wants the *global* device list in multi-process runs (its default); an explicit
  # subset is for single-process use (tests, 1-device runs).
  pmap_devices = list(devices) if devices is not None else None
  devices = list(devices) if devices is not None else jax.local_devices()
  layout = BatchLayout.create(int(config.batch_size), devices)
  eval_layout = BatchLayout.create(int(config.eval_batch_size), devices)
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  if dataset is None:
    dataset = _load_dataset(config)
  columns = head_columns(list(dataset.hardware), list(config.hardware))
  hardware = tuple(str(dataset.hardware[c]) for c in columns)
  train = select_split(dataset.train, columns)
  val = select_split(dataset.validation, columns)
  if train.size == 0:
    raise ValueError(f"no training records with labels for hardware {list(hardware)}")
  fs = config.few_shot
  train = dataclasses.replace(train, mask=few_shot_mask(train.mask, int(fs.num_labels),
                                                        float(fs.fraction), int(config.seed)))
  model_config = model_config_from(config, num_heads=len(hardware), dataset=dataset)
  loss_config = loss_config_from(config)
  optim_config = optim_config_from(config)

  steps_per_epoch = -(-train.size // layout.global_batch)
  num_epochs = int(config.num_epochs)
  total_steps = steps_per_epoch * num_epochs
  tx, schedule = make_optimizer(optim_config, steps_per_epoch, total_steps,
                                model_config.ensemble_size)

  # A workdir belongs to one run: refuse to mix runs (a different model or data would make
  # the checkpoints meaningless).
  _check_or_write_json(os.path.join(workdir, MODEL_CONFIG_FILE), model_config.to_dict(),
                       "model config", write=is_chief)
  _check_or_write_json(os.path.join(workdir, DATASET_META_FILE),
                       dataset_meta(dataset, hardware, reads_loop_tokens(config, dataset)),
                       "dataset", write=is_chief)
  if is_chief:
    _write_json(os.path.join(workdir, TRAIN_CONFIG_FILE), config.to_dict())
  run_identity = {"num_train": train.size, "global_batch": layout.global_batch,
                  "steps_per_epoch": steps_per_epoch, "seed": int(config.seed)}

  state = create_train_state(model_config, tx, int(config.seed))
  latest_mgr, best_mgr = checkpoint_managers(workdir, config.checkpoints_to_keep)
  best_val = math.inf
  validation: dict[str, Any] = {}
  if latest_mgr.latest_step() is not None or _step_entries(str(latest_mgr.directory)):
    state, meta = restore_checkpoint(latest_mgr, state)
    mismatch = {k: (meta.get(k), v) for k, v in run_identity.items() if meta.get(k) != v}
    if mismatch:
      raise CheckpointError(
          f"checkpoint {latest_mgr.directory}/{int(state.step)} comes from an incompatible run "
          f"(checkpoint vs now: {mismatch}); use another workdir")
    validation = dict(meta.get("validation") or {})
    best_val = meta.get("best_val_loss")
    best_val = math.inf if best_val is None else float(best_val)
    logging.info("resumed from %s at step %d (epoch %d, step %d in epoch)",
                 latest_mgr.directory, int(state.step), meta["epoch"], meta["step_in_epoch"])
  start_step = int(state.step)
  # Small datasets run many short epochs; validating and checkpointing each one can cost more
  # than the training steps (bench/README.md).
  eval_every = int(config.get("eval_every_epochs", 1))

  model = model_lib.TLPModel(model_config)
  step_kwargs = dict(model=model, tx=tx, loss_config=loss_config)
  placement = config.data_placement
  if placement == "auto":
    placement = "device" if train.nbytes <= int(config.device_data_max_bytes) else "host"
  if placement not in ("device", "host"):
    raise ValueError(f"data_placement must be 'auto', 'device' or 'host', got {placement!r}")
  if placement == "device":
    p_train = jax.pmap(functools.partial(train_step_resident, steps_per_epoch=steps_per_epoch,
                                         global_batch=layout.global_batch, **step_kwargs),
                       axis_name=AXIS, devices=pmap_devices, donate_argnums=(0,))
    resident = replicate_to_devices((train.features, train.scores, train.mask, train.task_index),
                                    devices)
  else:
    p_train = jax.pmap(functools.partial(train_step, **step_kwargs), axis_name=AXIS,
                       devices=pmap_devices, donate_argnums=(0,))
  p_eval = jax.pmap(functools.partial(eval_step, model=model, loss_config=loss_config),
                    axis_name=AXIS, devices=pmap_devices)
  logging.info("training %d records (%s), %d validation, heads %s, %d steps/epoch x %d epochs, "
               "batch %d on %d device(s), data on %s", train.size, model_config, val.size,
               hardware, steps_per_epoch, num_epochs, layout.global_batch, layout.num_devices,
               placement)

  writer = MetricWriter(workdir, enabled=is_chief)
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  rstate = replicate_to_devices(state, devices)

  def meta_for(step: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    epoch, in_epoch = divmod(step, steps_per_epoch)
    m = dict(run_identity, step=step, epoch=epoch, step_in_epoch=in_epoch,
             best_val_loss=best_val if math.isfinite(best_val) else None)
    m.update(extra or {})
    return m

  def host_state() -> TrainState:
    return first_replica(rstate)

  order_by_task = (train.task_index if config.get("batch_order", "random") == "by_task"
                   else None)
  bar = tqdm.tqdm(total=total_steps * layout.global_batch, initial=start_step * layout.global_batch,
                  unit="sample", unit_scale=True, dynamic_ncols=True, disable=not is_chief,
                  desc="train")
  pending: list[dict[str, jax.Array]] = []
  last_log_time, last_log_step = time.time(), start_step
  step = start_step
  try:
    for epoch in range(start_step // steps_per_epoch, num_epochs):
      order, valid = epoch_order(int(config.seed), epoch, train.size, steps_per_epoch,
                                 layout.global_batch, order_by_task)
      if placement == "device":
        d_order, d_valid = replicate_to_devices((order, valid), devices)
      for in_epoch in range(step - epoch * steps_per_epoch, steps_per_epoch):
        if placement == "device":
          rstate, m = p_train(rstate, resident, d_order, d_valid)
        else:
          sl = layout.local_slice(in_epoch)
          rstate, m = p_train(rstate, *host_batch(train, order[sl], valid[sl], layout))
        step += 1
        pending.append(m)
        bar.update(layout.global_batch)
        if step % int(config.log_every_steps) == 0 or in_epoch == steps_per_epoch - 1:
          got = [first_replica(p) for p in pending]
          now = time.time()
          scalars = {"train_loss": float(np.mean([g["loss"] for g in got])),
                     "grad_norm": float(np.mean([g["grad_norm"] for g in got])),
                     "learning_rate": float(schedule(step - 1)),
                     "samples_per_sec": (step - last_log_step) * layout.global_batch
                                        / max(now - last_log_time, 1e-9)}
          for h, name in enumerate(hardware):
            scalars[f"train_loss/{name}"] = float(np.mean([g["loss_per_head"][h] for g in got]))
          if not np.isfinite(scalars["train_loss"]):
            raise FloatingPointError(f"non-finite training loss at step {step}")
          writer.write_scalars(step, scalars)
          bar.set_postfix(loss=f"{scalars['train_loss']:.4g}", epoch=epoch)
          pending.clear()
          last_log_time, last_log_step = now, step
        every = int(config.checkpoint_every_steps)
        if every > 0 and step % every == 0 and in_epoch != steps_per_epoch - 1:
          save_checkpoint(latest_mgr, host_state(), meta_for(step))

      if (epoch + 1) % eval_every != 0 and epoch + 1 != num_epochs:
        continue
      validation = evaluate(p_eval, rstate.params, val,
                            eval_layout, hardware, config.eval_top_k)
      validation["epoch"] = epoch + 1
      writer.write_scalars(step, validation)
      hstate = host_state()
      target_loss = validation.get(f"val_loss/{hardware[0]}", math.nan)
      if val.size and math.isfinite(target_loss) and target_loss < best_val:
        best_val = target_loss
        save_checkpoint(best_mgr, hstate, meta_for(step, {"validation": validation}))
        # Orbax's multi-host barriers are named by step: let this save finish before the
        # latest manager saves the same step.
        best_mgr.wait_until_finished()
      save_checkpoint(latest_mgr, hstate, meta_for(step, {"validation": validation}))
  finally:
    bar.close()
    latest_mgr.wait_until_finished()
    best_mgr.wait_until_finished()
    latest_mgr.close()
    best_mgr.close()
    writer.close()
  return TrainResult(state=host_state(), validation=validation, model_config=model_config,
                     hardware=hardware)
