"""Writing a config's array_record shards in worker processes, byte for byte as TFDS would.

TFDS's non-Beam ``ShardBasedBuilder`` writes the shards one after another in the building
process (``SplitBuilder.submit_shard_based_generation``); at TenSet scale that is the build's
bottleneck (~5,000 examples/s). Here each shard is one job of the build's worker pool
(:class:`file_stager.FileStager`; ``workers=1`` runs the same job in this process):

* the main process saves the plan's per-example table (:func:`save_table`: a few bytes per
  example, ``.npy`` files in the build's work dir) and never holds an example's features;
* a job (:func:`write_shard`) memory-maps that table and the staged feature / loop-token files
  **by path**, makes each example of its index range and encodes, serializes and writes it with
  TFDS's own ``FeaturesDict.encode_example``, ``ExampleSerializer`` and array_record file
  adapter, as TFDS's ``ShardWriter.write`` does, with two differences: the ``tf.train.Example``
  is serialized deterministically (TFDS's ``SerializeToString()`` orders the feature map by a
  per-process hash, so TFDS's own shards differ from run to run; ours are the same bytes in
  every process and run), and no ``itertools.tee`` (TFDS's holds a whole shard's examples in
  memory until the shard is written);
* the builder records the shards as TFDS does (``SplitInfo`` with the shard lengths, the
  files' total bytes and the filename template).

The shard plan (which examples, in which order, in which file) is made by the builder before
any job runs, so the files are the same bytes for any number of workers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer, file_adapters

from data_pipelines import schema

# Examples gathered from the staged memmaps at a time (one read per hardware per chunk).
_CHUNK = 1024

# Table files (per example unless noted); see :func:`save_table`.
_TABLE_FIELDS = ("feature_hw", "feature_row", "score", "mask", "task_index", "min_cost")


class ShardWriteError(RuntimeError):
  """Writing one shard failed (the message starts with the shard's file name)."""


def features_dict(
  feature_shape: Sequence[int], num_hardware: int, loop_token_shape: Sequence[int] | None = None
) -> tfds.features.FeaturesDict:
  """The dataset's TFDS features, from :func:`schema.example_specs` (the builder's ``_info``
  and the shard writers use this one definition)."""
  fields = {}
  specs = schema.example_specs(feature_shape, num_hardware, loop_token_shape)
  for name, (shape, dtype) in specs.items():
    if name in (schema.FEATURES, schema.LOOP_TOKENS):
      # Raw bytes decode with one np.frombuffer (the array loader's fast path).
      fields[name] = tfds.features.Tensor(
        shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES
      )
    elif not shape:
      fields[name] = tfds.features.Scalar(dtype=dtype)
    else:
      fields[name] = tfds.features.Tensor(shape=shape, dtype=dtype)
  return tfds.features.FeaturesDict(fields)


@dataclasses.dataclass(frozen=True)
class StagedSource:
  """Where one hardware's staged rows are: file paths and row shapes (no arrays)."""

  features_path: str
  features_shape: tuple[int, ...]  # (N, L, E) float32
  tokens_path: str | None = None
  tokens_shape: tuple[int, ...] | None = None  # (N, T, W) float16

  @classmethod
  def of(cls, staged) -> StagedSource:
    """From a ``tenset_tfds.StagedHardware`` (its read-only memmaps)."""
    tokens = staged.loop_tokens
    return cls(
      features_path=staged.features.filename,
      features_shape=tuple(staged.features.shape),
      tokens_path=None if tokens is None else tokens.filename,
      tokens_shape=None if tokens is None else tuple(tokens.shape),
    )


@dataclasses.dataclass(frozen=True)
class ShardJob:
  """One shard: examples ``split_index[start:stop]`` of ``table_dir`` into ``path``."""

  table_dir: str
  split: str
  start: int
  stop: int
  path: str
  sources: tuple[StagedSource, ...]
  feature_shape: tuple[int, ...]
  loop_token_shape: tuple[int, ...] | None


def save_table(
  table_dir: str,
  rows: np.ndarray,
  task_index: np.ndarray,
  scores: Sequence[np.ndarray],
  task_min_cost: np.ndarray,
  splits: Mapping[str, np.ndarray],
) -> None:
  """Saves what the shard jobs need of an example plan, as ``.npy`` files in ``table_dir``.

  Args:
    rows: ``(M, H)`` staged row of each example per hardware, ``-1`` = not measured.
    task_index: ``(M,)`` task of each example.
    scores: per hardware, the ``(N_h,)`` float32 scores of its staged rows.
    task_min_cost: ``(T, H)`` seconds, NaN where the task has no record on that hardware.
    splits: split name -> example indices, in the order they are written.

  An example's step features (and loop tokens) are those of the first hardware it was measured
  on: the same program featurizes identically on every hardware.
  """
  os.makedirs(table_dir, exist_ok=True)
  rows = np.asarray(rows)
  mask = rows >= 0
  feature_hw = np.argmax(mask, axis=1).astype(np.int8)
  feature_row = rows[np.arange(rows.shape[0]), feature_hw]
  score = np.zeros(rows.shape, np.float32)
  for h, s in enumerate(scores):
    score[mask[:, h], h] = s[rows[mask[:, h], h]]
  arrays = {
    "feature_hw": feature_hw,
    "feature_row": feature_row,
    "score": score,
    "mask": mask,
    "task_index": np.asarray(task_index, np.int32),
    # Per task (T, H): an unmeasured hardware's best cost is 0 in the examples.
    "min_cost": np.nan_to_num(task_min_cost, nan=0.0).astype(np.float32),
  }
  for name, a in arrays.items():
    np.save(os.path.join(table_dir, f"{name}.npy"), a, allow_pickle=False)
  for name, idx in splits.items():
    np.save(os.path.join(table_dir, f"split_{name}.npy"), np.asarray(idx, np.int64))


def shard_ranges(num_examples: int, shard_size: int) -> list[tuple[int, int]]:
  """``(start, stop)`` of each shard of a split: ``ceil(n / shard_size)`` near-equal parts, as
  ``np.array_split`` cuts them (the shard plan of every earlier build)."""
  num_shards = -(-num_examples // shard_size)
  base, extra = divmod(num_examples, num_shards)
  bounds = np.cumsum([0] + [base + (i < extra) for i in range(num_shards)])
  return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# Per process: the encoder of the current features and the open table (one build at a time).
_CACHE: dict = {}


def _encoder(feature_shape, num_hw, loop_token_shape):
  key = ("encoder", tuple(feature_shape), num_hw, loop_token_shape)
  if key not in _CACHE:
    features = features_dict(feature_shape, num_hw, loop_token_shape)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    _CACHE.clear()
    _CACHE[key] = (features, serializer)
  return _CACHE[key]


def _load(table_dir: str, name: str) -> np.ndarray:
  return np.load(os.path.join(table_dir, f"{name}.npy"), mmap_mode="r", allow_pickle=False)


def _examples(job: ShardJob):
  """Yields the shard's ``(example index, example)`` pairs, in index order."""
  t = {name: _load(job.table_dir, name) for name in _TABLE_FIELDS}
  index = _load(job.table_dir, f"split_{job.split}")[job.start : job.stop]
  feats = [np.memmap(s.features_path, np.float32, "r", shape=s.features_shape) for s in job.sources]
  tokens = [
    np.memmap(s.tokens_path, schema.LOOP_TOKENS_DTYPE, "r", shape=s.tokens_shape)
    if s.tokens_path
    else None
    for s in job.sources
  ]
  for lo in range(0, index.size, _CHUNK):
    idx = np.asarray(index[lo : lo + _CHUNK])
    hw = np.asarray(t["feature_hw"][idx])
    row = np.asarray(t["feature_row"][idx])
    task = np.asarray(t["task_index"][idx])
    score, mask = np.asarray(t["score"][idx]), np.asarray(t["mask"][idx])
    min_cost = np.asarray(t["min_cost"])[task]
    f = np.empty((idx.size,) + tuple(job.feature_shape), np.float32)
    tok = None
    if job.loop_token_shape is not None:
      tok = np.empty((idx.size,) + tuple(job.loop_token_shape), schema.LOOP_TOKENS_DTYPE)
    for h in np.unique(hw):
      sel = hw == h
      f[sel] = feats[h][row[sel]]
      if tok is not None:
        tok[sel] = tokens[h][row[sel]]
    for k in range(idx.size):
      ex = {
        schema.FEATURES: f[k],
        schema.SCORE: score[k],
        schema.MASK: mask[k],
        schema.MIN_COST: min_cost[k],
        schema.TASK_INDEX: task[k],
      }
      if tok is not None:
        ex[schema.LOOP_TOKENS] = tok[k]
      yield int(idx[k]), ex


def write_shard(job: ShardJob) -> int:
  """Writes one shard file (TFDS's encoding, serializer and array_record adapter); returns its
  number of examples.

  Raises:
    ShardWriteError: anything failed; the message names the shard file.
  """
  try:
    features, serializer = _encoder(job.feature_shape, len(job.sources), job.loop_token_shape)
    count = [0]

    def serialized():
      for key, ex in _examples(job):
        count[0] += 1
        # TFDS's serializer, but deterministic: its plain SerializeToString writes the
        # Example's feature map in a per-process hash order, so the same example would be
        # other bytes in each worker (and in each run).
        proto = serializer.get_tf_example(features.encode_example(ex))
        yield key, proto.SerializeToString(deterministic=True)

    adapter = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
    adapter.write_examples(job.path, serialized())
  except Exception as e:  # pylint: disable=broad-except
    # One line naming the shard, whichever process it happened in (the pool re-raises it).
    raise ShardWriteError(f"{os.path.basename(job.path)}: {type(e).__name__}: {e}") from e
  if count[0] != job.stop - job.start:
    raise ShardWriteError(
      f"{os.path.basename(job.path)}: wrote {count[0]} examples, planned {job.stop - job.start}"
    )
  return count[0]


__all__ = [
  "ShardJob",
  "ShardWriteError",
  "StagedSource",
  "features_dict",
  "save_table",
  "shard_ranges",
  "write_shard",
]
