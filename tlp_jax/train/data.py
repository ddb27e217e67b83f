"""What the trainer feeds the model: head selection, few-shot masks, epoch order, batch layout.

* The dataset (``data_pipelines.loader.DatasetArrays``) holds one label column per hardware; the
  configured heads are selected, target first (``head_columns``, ``select_heads``), and for
  MTL-TLP transfer all but N of the target head's training labels are masked (``few_shot_mask``).
* Every epoch visits a fresh permutation of the training set (NumPy, from ``(seed, epoch)``),
  padded to whole batches with masked rows (``epoch_order``).
* The global batch is split ``(devices, per_device, ...)`` over every device of every host
  (``BatchLayout``); batches are gathered on the host (``host_batch``) or, from arrays copied
  once to every device (``replicate_to_devices``), on the device (``step.train_step_resident``).
* The model's input size and export metadata follow from the dataset (``model_config_for``,
  ``dataset_meta``). A dataset's replayed loop tokens are kept apart from the step features
  (float16, also on device) and the model's input is assembled per batch
  (``loop_tokens.model_input`` on the host, ``step.model_input`` on device).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from data_pipelines import schema
from tlp_jax.core import loop_tokens as loop_tokens_lib
from tlp_jax.core import predictor, skeleton
from tlp_jax.train import model as model_lib

# The pmap axis over which the global batch is split.
AXIS = "batch"

# Independent random streams derived from the seed (numpy SeedSequence entropy tags).
_STREAM_SHUFFLE = 1
_STREAM_FEW_SHOT = 2


# ---------------------------------------------------------------------------------------------
# Heads and labels
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadArrays:
  """One split's arrays with the configured heads only (column 0 = target hardware)."""

  features: np.ndarray  # (N, L, E) float32
  scores: np.ndarray  # (N, H) float32
  mask: np.ndarray  # (N, H) bool
  task_index: np.ndarray  # (N,) int32
  # (N, T, W) float16 replayed loop tokens when the model reads them (the model's input is then
  # assembled per batch, ``loop_tokens.model_input``); None otherwise.
  loop_tokens: np.ndarray | None = None

  @property
  def size(self) -> int:
    return int(self.features.shape[0])

  @property
  def arrays(self) -> tuple[np.ndarray, ...]:
    """What a step reads: ``(features, [loop_tokens,] scores, mask, task_index)``."""
    tokens = () if self.loop_tokens is None else (self.loop_tokens,)
    return (self.features,) + tokens + (self.scores, self.mask, self.task_index)

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self.arrays)


def head_columns(dataset_hardware: Sequence[str], wanted: Sequence[str]) -> list[int]:
  """Column of each wanted hardware in the dataset's ``(N, H)`` arrays; all when none wanted."""
  dataset_hardware = [str(h) for h in dataset_hardware]
  if not wanted:
    return list(range(len(dataset_hardware)))
  missing = [h for h in wanted if h not in dataset_hardware]
  if missing:
    raise ValueError(
      f"config.hardware {list(wanted)}: {missing} not in the dataset's hardware {dataset_hardware}"
    )
  if len(set(wanted)) != len(wanted):
    raise ValueError(f"config.hardware has duplicates: {list(wanted)}")
  return [dataset_hardware.index(h) for h in wanted]


def select_heads(split: Any, columns: Sequence[int], loop_tokens: bool = False) -> HeadArrays:
  """Keeps the given head columns of a ``loader.SplitArrays``; drops rows with no label.

  ``loop_tokens``: keep the split's ``loop_tokens`` (float16) too.
  """
  cols = np.asarray(columns, dtype=np.int64)
  mask = np.asarray(split.mask, dtype=bool)[:, cols]
  keep = mask.any(axis=1)
  rows = None if keep.all() else np.flatnonzero(keep)

  def take(a):
    a = np.asarray(a)
    return a if rows is None else a[rows]

  tokens = None
  if loop_tokens:
    tokens = getattr(split, "loop_tokens", None)
    if tokens is None:
      raise ValueError("the dataset's metadata describes loop tokens but the split has none")
    tokens = np.ascontiguousarray(take(tokens), dtype=loop_tokens_lib.DTYPE)
  return HeadArrays(
    features=np.ascontiguousarray(take(split.features), dtype=np.float32),
    scores=np.ascontiguousarray(take(np.asarray(split.scores)[:, cols]), dtype=np.float32),
    mask=np.ascontiguousarray(take(mask)),
    task_index=np.ascontiguousarray(take(split.task_index), dtype=np.int32),
    loop_tokens=tokens,
  )


def few_shot_mask(mask: np.ndarray, num_labels: int, fraction: float, seed: int) -> np.ndarray:
  """Masks all but ``num_labels`` (or ``fraction``) of the target head's (column 0) labels.

  The kept labels are a uniformly random subset of the present ones, fixed by ``seed``.
  ``num_labels < 0`` and ``fraction >= 1`` keep everything; with both set the smaller count wins.
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


# ---------------------------------------------------------------------------------------------
# The model's input and the export metadata, from the dataset
# ---------------------------------------------------------------------------------------------


def loop_token_shape(dataset: Any) -> tuple[int, int]:
  """``(T, W)`` of the dataset's replayed loop tokens (``metadata["loop_tokens"]``), stored
  apart from the step features (``SplitArrays.loop_tokens``); ``(0, 0)`` when it has none.

  Raises:
    ValueError: the tokens' layout is not the one this code reads (``loop_tokens.LAYOUT_VERSION``).
  """
  meta = getattr(dataset, "metadata", None) or {}
  shape = schema.loop_token_shape(meta)
  if shape is None:
    return 0, 0
  version, width = int(meta[schema.LOOP_TOKENS_META]["layout_version"]), shape[1]
  if version != loop_tokens_lib.LAYOUT_VERSION or width != loop_tokens_lib.WIDTH:
    raise ValueError(
      f"dataset {getattr(dataset, 'config_name', '')!r} has loop tokens of layout "
      f"version {version} ({width} columns); this code reads version "
      f"{loop_tokens_lib.LAYOUT_VERSION} ({loop_tokens_lib.WIDTH} columns): "
      "rebuild the dataset"
    )
  return shape


def crop_loop_tokens(dataset: Any, max_tokens: int) -> Any:
  """``dataset`` as a model reading each program's first ``max_tokens`` loop tokens sees it
  (``config.max_loop_tokens``; 0 = all it stores): its metadata says ``max_tokens``, so the
  model's input size (``model_config_for``) and the export (``dataset_meta``) follow.

  The arrays stay as stored (memory-mapped where they are): the model reads the first
  ``seq_len`` rows of its input (``TLPModel`` crops, as TLP does), so the tokens past
  ``max_tokens`` are dropped there, and the predictor crops them the same way. Tokens are
  stored outermost loop first, so this equals a build with ``max_tokens``."""
  num_tokens = loop_token_shape(dataset)[0]
  if max_tokens <= 0 or num_tokens <= max_tokens:
    if num_tokens and max_tokens > num_tokens:
      logging.info(
        "config.max_loop_tokens=%d: the dataset stores %d loop tokens; the model reads them all",
        max_tokens,
        num_tokens,
      )
    return dataset
  layout = dict(dataset.metadata[schema.LOOP_TOKENS_META], max_tokens=int(max_tokens))
  return _replace(
    dataset,
    metadata={**dataset.metadata, schema.LOOP_TOKENS_META: layout},
    loop_token_layout=layout,
  )


def _replace(obj: Any, **changes: Any) -> Any:
  # A loader dataclass, or any object with these attributes (a SimpleNamespace in tests).
  if dataclasses.is_dataclass(obj):
    return dataclasses.replace(obj, **changes)
  return types.SimpleNamespace(**{**vars(obj), **changes})


def reads_loop_tokens(loop_tokens: str, dataset: Any) -> bool:
  """Whether a model with ``config.loop_tokens`` reads ``dataset``'s replayed loop tokens.

  Raises:
    ValueError: ``loop_tokens='required'`` and the dataset has none (the message names the
      skeleton extraction command), or its tokens are of another layout.
  """
  if loop_tokens == "off":  # the tokens' layout does not matter to a model that ignores them
    return False
  has = bool(loop_token_shape(dataset)[0])
  if loop_tokens == "required" and not has:
    meta = getattr(dataset, "metadata", None) or {}
    tenset_dir = meta.get("tenset_dir") or "TENSET_DIR"
    raise ValueError(
      f"config.loop_tokens='required' but dataset {getattr(dataset, 'config_name', '')!r} has "
      "no loop tokens; they are replayed from each task's skeleton, extracted once with TVM "
      f"(pip install -e '.[tvm]'): {skeleton.EXTRACT_COMMAND} {tenset_dir}, then rebuild "
      f"the dataset: python -m data_pipelines.build --tenset_dir {tenset_dir} ..."
    )
  return has


def model_config_for(
  model: model_lib.TLPConfig,
  loop_tokens: str,
  dataset: Any,
  num_hardware_heads: int,
  reads_tokens: bool | None = None,
) -> model_lib.TLPConfig:
  """The ``TLPConfig`` trained on ``dataset``: ``config.model`` with its heads and input size,
  and its dtype made concrete for this process's backend (``model.resolve_dtype``).

  ``model.seq_len`` / ``feature_dim`` are the step-token crop (TLP's ``step_size`` /
  ``fea_size``). When the model reads the dataset's loop tokens (``reads_loop_tokens``), its
  input grows by them (``predictor.input_shape``): they are assembled per batch after the
  dataset's step crop, so the model's step crop must equal the dataset's.
  """
  seq_len, feature_dim = model.seq_len, model.feature_dim
  # ``reads_tokens``: the caller's ``reads_loop_tokens(loop_tokens, dataset)``, not decided twice.
  if reads_loop_tokens(loop_tokens, dataset) if reads_tokens is None else reads_tokens:
    loop_shape, step_crop = loop_token_shape(dataset), tuple(dataset.crop)
    if (seq_len, feature_dim) != step_crop:
      raise ValueError(
        f"the dataset's loop tokens follow its {step_crop} step features, but the model's "
        f"step crop is ({seq_len}, {feature_dim}); set model.seq_len={step_crop[0]}, "
        f"model.feature_dim={step_crop[1]}, or loop_tokens='off'"
      )
    seq_len, feature_dim = predictor.input_shape(step_crop, loop_shape)
  return dataclasses.replace(
    model,
    seq_len=seq_len,
    feature_dim=feature_dim,
    num_hardware_heads=num_hardware_heads,
    dtype=model_lib.resolve_dtype(model.dtype, jax.default_backend()),
  )


def dataset_meta(dataset: Any, hardware: Sequence[str], loop_tokens: bool) -> dict[str, Any]:
  """What the exporter needs about the model's input: head hardware, platform, crop, vocabulary,
  and the loop tokens it reads.

  ``crop`` is the model's input: for loop tokens the step crop grown by ``(T, W)``, and
  ``loop_tokens`` = ``{"layout_version", "max_tokens", "width"}``. ``loop_tokens=False``: the
  model reads only the step tokens, so its export is a TLP model (the step crop, no loop fields).
  """
  crop = dataset.crop
  num_tokens, width = loop_token_shape(dataset) if loop_tokens else (0, 0)
  if num_tokens:
    crop = predictor.input_shape(crop, (num_tokens, width))
  meta = {
    "hardware": list(hardware),
    "platform": str(dataset.platform),
    "crop": [int(c) for c in crop] if crop is not None else None,
    "vocab_json": dataset.vocab_json,
  }
  if num_tokens:
    meta["loop_tokens"] = {
      "layout_version": loop_tokens_lib.LAYOUT_VERSION,
      "max_tokens": num_tokens,
      "width": width,
    }
  return meta


# ---------------------------------------------------------------------------------------------
# Epoch order and batch layout
# ---------------------------------------------------------------------------------------------


def epoch_order(
  seed: int,
  epoch: int,
  n: int,
  steps_per_epoch: int,
  global_batch: int,
  task_index: np.ndarray | None = None,
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
  def create(cls, global_batch: int, devices: Sequence[Any] | None = None) -> BatchLayout:
    """Layout for ``devices`` (default: all local devices, over ``jax.process_count()`` hosts)."""
    local = list(devices) if devices is not None else jax.local_devices()
    num_devices = len(local) * jax.process_count()
    if global_batch <= 0 or global_batch % num_devices:
      raise ValueError(
        f"batch size {global_batch} is not divisible by the number of devices "
        f"{num_devices} ({jax.process_count()} process(es) x {len(local)} local "
        "devices); choose a multiple of the device count"
      )
    return cls(global_batch, num_devices, len(local), jax.process_index())

  def local_slice(self, step_in_epoch: int) -> slice:
    """This process's rows of a step's global batch, as a slice of the epoch order."""
    start = step_in_epoch * self.global_batch + self.process_index * self.per_process
    return slice(start, start + self.per_process)


def host_batch(
  split: HeadArrays, rows: np.ndarray, valid: np.ndarray, layout: BatchLayout
) -> tuple[np.ndarray, ...]:
  """Gathers ``rows`` on the host as ``(local_devices, per_device, ...)`` arrays: the model's
  input (assembled from steps and loop tokens when the split has them), scores, mask, tasks."""
  shape = (layout.local_devices, layout.per_device)
  mask = split.mask[rows] & valid[:, None]
  x = split.features[rows]
  if split.loop_tokens is not None:
    x = loop_tokens_lib.model_input(x, split.loop_tokens[rows])
  return (
    x.reshape(shape + x.shape[1:]),
    split.scores[rows].reshape(shape + split.scores.shape[1:]),
    mask.reshape(shape + mask.shape[1:]),
    split.task_index[rows].reshape(shape),
  )


# ---------------------------------------------------------------------------------------------
# Device placement
# ---------------------------------------------------------------------------------------------

# ``device_data_max_bytes="auto"``: the resident training arrays may take this fraction of the
# smallest local device's free memory (the rest is for the step's activations, parameters and
# optimizer state: ~2 GB at batch 1024 with loop tokens, and it grows with the batch).
AUTO_DEVICE_DATA_FRACTION = 0.5


def has_cudnn_attention(device: Any) -> bool:
  """Whether cuDNN's fused attention runs on ``device``: an NVIDIA GPU (ROCm GPUs are "gpu"
  too) of compute capability 8.0 or newer (cuDNN's flash attention needs Ampere)."""
  if device.platform != "gpu" or "cuda" not in str(device.client.platform_version).lower():
    return False
  try:
    major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
  except ValueError:
    return False
  return major >= 8


def device_free_bytes(device: Any) -> int | None:
  """Free memory the device reports (``memory_stats()``: ``bytes_limit - bytes_in_use``), or
  None when it reports none (e.g. JAX's CPU devices)."""
  try:
    stats = device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def host_memory_bytes() -> int | None:
  """Physical memory of this host (where "device" arrays of CPU devices live), or None."""
  try:
    return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
  except (ValueError, OSError, AttributeError):
    return None


def device_data_budget(max_bytes: int | str, devices: Sequence[Any]) -> int:
  """Bytes of training arrays that ``data_placement="auto"`` puts on every device.

  ``max_bytes``: an explicit byte count, or "auto": ``AUTO_DEVICE_DATA_FRACTION`` of the
  smallest free memory among ``devices`` (each holds a full copy), from the device's own report;
  devices that report none (CPU) use the host's physical memory.

  Raises:
    ValueError: ``max_bytes`` is neither "auto" nor a non-negative integer, or "auto" finds
      no memory size at all.
  """
  if isinstance(max_bytes, str):
    if max_bytes != "auto":
      raise ValueError(f"device_data_max_bytes must be 'auto' or a byte count, got {max_bytes!r}")
    free = [device_free_bytes(d) for d in devices]
    if any(f is None for f in free):
      host = host_memory_bytes()
      if host is None:
        raise ValueError(
          "device_data_max_bytes='auto': the devices report no memory size and the host's "
          "is unknown; set a byte count"
        )
      free = [host if f is None else f for f in free]
    budget = int(AUTO_DEVICE_DATA_FRACTION * min(free))
    logging.info("device data budget: %.2f GiB per device (auto)", budget / 2**30)
    return budget
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
    raise ValueError(f"device_data_max_bytes must be 'auto' or a byte count, got {max_bytes!r}")
  return max_bytes


def first_replica(tree: Any) -> Any:
  """NumPy copy of this process's first device's slice of pmapped (replicated) outputs.

  Reads only a local shard: indexing the global array (``x[0]``) would run a computation over
  all processes' devices, which in a multi-host run only process 0 can answer alone and which
  desynchronises the processes' collective programs.
  """
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def pmap_sharding(devices: Sequence[Any]) -> jax.sharding.NamedSharding:
  """The sharding of pmap's ``(devices, ...)`` arrays over ``devices``: the leading axis split,
  one slice per device."""
  # The same sharding (mesh axis named like pmap's axis) as pmap's outputs, so a step compiled
  # for these inputs is reused when the state it returns is fed back.
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def shard_to_devices(tree: Any, devices: Sequence[Any]) -> Any:
  """Puts host arrays laid out ``(len(devices), ...)`` (``host_batch``'s) on ``devices``, slice
  ``i`` on device ``i``, as pmap reads its inputs; the copies run asynchronously."""
  return jax.device_put(tree, pmap_sharding(devices))


def replicate_to_devices(tree: Any, devices: Sequence[Any]) -> Any:
  """Copies every array of ``tree`` to each device, as pmap's ``(devices, ...)`` inputs.

  Unlike ``flax.jax_utils.replicate`` no ``(devices, ...)`` host copy is made, so a large
  training set needs only its own size in host memory.
  """
  sharding = pmap_sharding(devices)

  def put(x):
    x = np.asarray(x)
    shards = [jax.device_put(x[None], d) for d in devices]
    return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding, shards)

  return jax.tree_util.tree_map(put, tree)
