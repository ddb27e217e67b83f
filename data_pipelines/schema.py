"""The built dataset's on-disk schema, shared by the builder (tenset_tfds) and the loader.

Where a config lives: ``DATA_DIR/tenset/CONFIG/VERSION/`` with TFDS's ``dataset_info.json``
and ``features.json``, our ``metadata.json`` (format :data:`METADATA_FORMAT`, written by
``tenset_tfds.build_metadata``) and array_record shards ``tenset-SPLIT.array_record-*``.

One example (``H`` = hardware of the config, ``(L, E)`` = the feature shape)::

    features   (L, E) float32   TLP primitive features (the step tokens)
    score      (H,)   float32   min_cost / cost per hardware (0 where not measured)
    mask       (H,)   bool      program has a valid measurement on that hardware
    min_cost   (H,)   float32   the task's best cost (s) on that hardware (0 if none there)
    task_index ()     int32     row of the task table in the dataset metadata
    loop_tokens (T, W) float16  loop tokens (tlp_jax.core.loop_tokens), only in a build with
                                them (metadata key :data:`LOOP_TOKENS_META` is not None)

The loader returns a split as arrays named :data:`ARRAY_NAMES` (``score`` -> ``scores``), plus
``loop_tokens`` (None in a build without them).

Stored next to the shards of a loop-token build: :data:`SKELETONS_FILE`, the skeletons of the
dataset's tasks (``tlp_jax.core.skeleton`` collection format), so export can embed them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np

BUILDER_NAME = "tenset"
VERSION = "1.0.0"
SPLITS = ("train", "validation", "test")
METADATA_FORMAT = 1
METADATA_FILE = "metadata.json"
DATASET_INFO_FILE = "dataset_info.json"

# Example fields, in the order the builder declares them.
FEATURES = "features"
SCORE = "score"
MASK = "mask"
MIN_COST = "min_cost"
TASK_INDEX = "task_index"
EXAMPLE_FIELDS = (FEATURES, SCORE, MASK, MIN_COST, TASK_INDEX)
# Optional example field: present exactly when the metadata's LOOP_TOKENS_META is not None.
LOOP_TOKENS = "loop_tokens"
LOOP_TOKENS_DTYPE = np.float16
OPTIONAL_FIELDS = (LOOP_TOKENS,)

# Metadata keys of the loop-token version (see tenset_tfds.build_metadata):
#   "loop_tokens": None, or {"layout_version", "max_tokens", "width", "columns", "dtype",
#                  "skeletons_file"};
#   "loop_token_stats": {hardware: {"records", "tokenized", "skipped": {reason: n},
#                        "cropped", "examples"}};
#   "validation": "by_record" | "by_task".
LOOP_TOKENS_META = "loop_tokens"
LOOP_TOKEN_STATS_META = "loop_token_stats"
VALIDATION_META = "validation"
SKELETONS_FILE = "skeletons.json"
VALIDATION_MODES = ("by_record", "by_task")

# Loader array name of each example field (the attributes of loader.SplitArrays); the order is
# the loader's, and the names are those of its .npy cache files.
ARRAY_NAMES = {
  FEATURES: "features",
  SCORE: "scores",
  MASK: "mask",
  TASK_INDEX: "task_index",
  MIN_COST: "min_cost",
}
OPTIONAL_ARRAY_NAMES = {LOOP_TOKENS: "loop_tokens"}
FIELDS = tuple(ARRAY_NAMES.values()) + tuple(OPTIONAL_ARRAY_NAMES.values())


def example_specs(
  feature_shape: Sequence[int], num_hardware: int, loop_token_shape: Sequence[int] | None = None
) -> dict[str, tuple[tuple[int, ...], type]]:
  """``{field: (shape, dtype)}`` of one example, in :data:`EXAMPLE_FIELDS` order, then
  ``loop_tokens`` ``(T, W)`` float16 when ``loop_token_shape`` is given."""
  per_hw = (int(num_hardware),)
  specs = {
    FEATURES: (tuple(int(d) for d in feature_shape), np.float32),
    SCORE: (per_hw, np.float32),
    MASK: (per_hw, np.bool_),
    MIN_COST: (per_hw, np.float32),
    TASK_INDEX: ((), np.int32),
  }
  if loop_token_shape is not None:
    specs[LOOP_TOKENS] = (tuple(int(d) for d in loop_token_shape), LOOP_TOKENS_DTYPE)
  return specs


def loop_token_shape(meta) -> tuple[int, int] | None:
  """``(T, W)`` of a dataset's loop tokens from its metadata dict (None: a build without)."""
  lt = meta.get(LOOP_TOKENS_META)
  if not lt:
    return None
  return int(lt["max_tokens"]), int(lt["width"])


def config_dir(data_dir: str, config_name: str) -> str:
  """``DATA_DIR/tenset/CONFIG`` (holds one folder per version)."""
  return os.path.join(data_dir, BUILDER_NAME, config_name)


def dataset_dir(data_dir: str, config_name: str, version: str = VERSION) -> str:
  """Where TFDS puts a config: ``DATA_DIR/tenset/CONFIG/VERSION``."""
  return os.path.join(config_dir(data_dir, config_name), version)


def shard_files(ds_dir: str, split: str) -> list[str]:
  """The array_record shards of one split, in order."""
  return sorted(glob.glob(os.path.join(ds_dir, f"{BUILDER_NAME}-{split}.array_record-*")))
