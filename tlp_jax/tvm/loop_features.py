"""Loop-nest features: Ansor's per-buffer-store features of each program (needs TVM).

TLP reads a program only through its schedule primitives. What decides its speed is the loop
nest those primitives produce: the extent of the vectorized innermost loop, how many iterations
run in parallel after fusion, what gets unrolled, how buffers are touched. TLP's step tokens
imply these only through several steps (a split's factors, a later reorder, an annotation on an
iterator index), and with tens of candidates per task the model does not learn them
(docs/ACCURACY.md, round 2). Ansor computes them directly from the lowered loop nest: one
164-number vector per buffer store (``tvm.auto_scheduler.feature``, already log-scaled).

This module replays each record's steps with TVM and returns those vectors, padded or cropped to
``max_stores`` per program. :func:`tlp_jax.core.features.append_loop_features` then appends them to
the TLP step features as extra tokens (the "loop" feature version; ``--loop_stores`` of
``data_pipelines.build``).

TVM must know each workload's compute DAG to replay a record. TenSet ships them in
``network_info/all_tasks.pkl``; :func:`tlp_jax.tvm.search_tasks.register_tenset_tasks` registers
them (restricted unpickler: only the TVM classes of a ``SearchTask`` pickle are built).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from tlp_jax.core import tenset
from tlp_jax.tvm import tvm_import


class LoopFeatureError(RuntimeError):
  """Loop-nest features cannot be computed (missing tasks file, unknown workload)."""


@functools.lru_cache(maxsize=1)
def _tvm_feature_names() -> tuple[str, ...]:
  # Fixed for a TVM build: asked once per process, not on every call of the tuner's path.
  tvm_import.require_tvm()
  from tvm.auto_scheduler import feature
  return tuple(str(n) for n in feature.get_per_store_feature_names())


def feature_names() -> list[str]:
  """Names of the values of one store vector in this TVM (164 in TVM 0.19)."""
  return list(_tvm_feature_names())


def feature_dim() -> int:
  """Width of one store vector in this TVM (164 in TVM 0.19)."""
  return len(_tvm_feature_names())


@dataclasses.dataclass(frozen=True)
class BufferLayout:
  """Where the per-buffer blocks ``B0. .. B{n-1}.`` sit in a store vector."""
  starts: tuple[int, ...]
  width: int
  lines: int   # offset of ``lines`` inside a block
  bytes: int   # offset of ``bytes`` inside a block

  @classmethod
  def from_names(cls, names: Sequence[str]) -> "BufferLayout":
    starts, b = [], 0
    while f"B{b}.acc_type.kRead" in names:
      starts.append(names.index(f"B{b}.acc_type.kRead"))
      b += 1
    if len(starts) < 2:
      raise LoopFeatureError(f"unexpected store feature names (buffer blocks at {starts})")
    width = starts[1] - starts[0]
    block = [n[len("B0."):] for n in names[starts[0]:starts[0] + width]]
    return cls(tuple(starts), width, block.index("lines"), block.index("bytes"))


def canonical_order(stores: np.ndarray, layout: BufferLayout) -> np.ndarray:
  """One program's ``(k, D)`` store vectors in an order that depends only on their values.

  TVM 0.19 does not return them deterministically: stores come out in the iteration order of
  a hash map keyed by buffer pointers, and buffers of equal importance (``lines``, ``bytes``)
  in an order its unstable sort leaves. Two calls on the same program, even in one process,
  differ for ~15% of tenset-mini's programs. So buffer blocks are re-sorted within each store
  by Ansor's own key (``lines``, then ``bytes``, descending), ties by all their values, and
  stores by all their values (descending), which makes the vectors a function of the program.
  """
  x = np.array(stores, dtype=np.float32, copy=True).reshape(-1, stores.shape[-1])
  if x.shape[0] == 0:
    return x
  starts = np.asarray(layout.starts)
  cols = starts[:, None] + np.arange(layout.width)[None, :]          # (B, W)
  blocks = x[:, cols]                                                  # (k, B, W)
  for i in range(x.shape[0]):
    b = blocks[i]
    keys = [-b[:, c] for c in range(layout.width - 1, -1, -1)]
    keys += [-b[:, layout.bytes], -b[:, layout.lines]]  # primary key last for lexsort
    blocks[i] = b[np.lexsort(keys)]
  x[:, cols] = blocks
  order = np.lexsort([-x[:, c] for c in range(x.shape[1] - 1, -1, -1)])
  return x[order]


@dataclasses.dataclass
class LoopFeatureStats:
  """Programs featurized, and how many had more stores than kept or none at all."""
  programs: int = 0
  cropped: int = 0
  no_store: int = 0
  max_stores_seen: int = 0

  def __add__(self, other: "LoopFeatureStats") -> "LoopFeatureStats":
    return LoopFeatureStats(self.programs + other.programs, self.cropped + other.cropped,
                            self.no_store + other.no_store,
                            max(self.max_stores_seen, other.max_stores_seen))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def pad_stores(per_program: Sequence[np.ndarray], max_stores: int, dim: int
               ) -> tuple[np.ndarray, LoopFeatureStats]:
  """``[(k_i, dim)]`` -> ``(n, max_stores, dim)`` float32: first stores kept, zero padding.

  Cropping keeps the first ``max_stores`` rows (give them in :func:`canonical_order`); cropped
  programs are counted, like TLP's step crop.
  """
  out = np.zeros((len(per_program), max_stores, dim), np.float32)
  stats = LoopFeatureStats(programs=len(per_program))
  for i, f in enumerate(per_program):
    f = np.asarray(f, np.float32).reshape(-1, dim) if np.size(f) else np.zeros((0, dim))
    k = f.shape[0]
    stats.max_stores_seen = max(stats.max_stores_seen, k)
    stats.no_store += k == 0
    stats.cropped += k > max_stores
    out[i, :min(k, max_stores)] = f[:max_stores]
  return out, stats


def store_features_from_lines(lines: Sequence[bytes], max_stores: int, where: str = "<lines>"
                              ) -> tuple[np.ndarray, LoopFeatureStats]:
  """Loop-nest features of measure-record lines (their workloads must be registered).

  Args:
    lines: raw JSON record lines (already known to parse: the TLP reader kept them;
      ``tlp_jax.core.records.lines_at`` reads them).
    max_stores: stores kept per program.
    where: file name for error messages.

  Returns:
    ``(len(lines), max_stores, feature_dim())`` float32 and the crop counts.
  """
  tvm_import.require_tvm()
  from tvm.auto_scheduler import feature
  from tvm.auto_scheduler import measure_record
  dim = feature_dim()
  if not lines:
    return np.zeros((0, max_stores, dim), np.float32), LoopFeatureStats()
  inputs, results = [], []
  for line in lines:
    try:
      inp, res = measure_record.load_record_from_string(line.decode())
    except Exception as e:  # TVM raises its own error types; any of them means "cannot read"
      raise LoopFeatureError(f"{where}: TVM cannot read a record the TLP reader kept "
                             f"({type(e).__name__}: {str(e)[:200]})") from e
    inputs.append(inp)
    results.append(res)
  try:
    feats, _, _ = feature.get_per_store_features_from_measure_pairs(inputs, results)
  except Exception as e:  # TVM raises its own error types; any of them means "cannot replay"
    raise LoopFeatureError(f"{where}: TVM could not replay the records (is the workload in "
                           f"{tenset.ALL_TASKS_FILE}?): {type(e).__name__}: {str(e)[:300]}") from e
  return _canonical_padded(feats, max_stores)


@functools.lru_cache(maxsize=1)
def _tvm_buffer_layout() -> BufferLayout:
  return BufferLayout.from_names(_tvm_feature_names())


def _canonical_padded(feats, max_stores: int) -> tuple[np.ndarray, LoopFeatureStats]:
  layout = _tvm_buffer_layout()
  dim = feature_dim()
  return pad_stores([canonical_order(np.asarray(f, np.float32).reshape(-1, dim), layout)
                     for f in feats], max_stores, dim)


def store_features_from_states(task, states: Sequence, max_stores: int
                               ) -> tuple[np.ndarray, LoopFeatureStats]:
  """Loop-nest features of auto-scheduler ``states`` of ``task`` (the tuner's path)."""
  tvm_import.require_tvm()
  from tvm.auto_scheduler import feature
  dim = feature_dim()
  if not len(states):  # len(): states may be a TVM Array, whose truth value is not its size
    return np.zeros((0, max_stores, dim), np.float32), LoopFeatureStats()
  feats = feature.get_per_store_features_from_states(list(states), task)
  return _canonical_padded(feats, max_stores)
