"""TFDS builder for TenSet-layout measure records (array_record; builds and reads without TF).

A ``tfds.core.ShardBasedBuilder`` (see :class:`Tenset` for why not ``GeneratorBasedBuilder``).

One :class:`TensetConfig` per hardware folder of ``measure_records/`` plus a multi-hardware
config that joins the same program across hardware by ``(workload_key, program_key)``. Every
config has the same example structure, :mod:`data_pipelines.schema`. Feature versions:

* TLP's step features ``(L, E)``, always;
* loop tokens (the default whenever the TenSet dir has its skeletons,
  ``network_info/skeletons.json``: :func:`make_configs`'s ``loop_tokens="auto"``): a separate
  ``loop_tokens`` field, ``(T, W)`` float16 per example, replayed without TVM from the stored
  per-task skeletons (:mod:`data_pipelines.loop_token_source`); the layout goes to the metadata
  and the skeletons of the dataset's tasks to ``skeletons.json`` next to the shards. Records
  whose replay fails are skipped and counted by reason.

Splits (TLP's protocol): ``test`` = every record of a task occurring in a hold-out network;
the rest 90/10 ``train``/``validation`` with a seed, by record (by joined program in the multi
config; ``validation="by_record"``) or by whole task (``"by_task"``, TenSet's task-disjoint
split). Single-hardware configs keep duplicate programs, as TLP does; the multi config keeps the
first occurrence per hardware (counted in ``join_stats``).

Stored with the dataset (``metadata.json`` next to the TFDS files, ``builder.info.metadata``):
task table (workload keys, per-hardware min_cost, flop_ct, records), hold-out networks with their
task indices and weights, the feature vocabulary JSON, the read stats per hardware, seed,
hold-out list, crop and platform.

Each hardware is read and featurized once per build (:class:`RecordStaging`, flat arrays on
disk, shared by all configs of the build), so a build scales to TenSet's ~8.6M records per
hardware without holding features in memory. Whole task files are read, featurized and replayed
by ``workers`` processes (:mod:`data_pipelines.file_stager`), which write each file's rows to the
build's work dir; the main process takes the files' labels back in file order and appends their
rows to the staging files with a kernel copy (a few bytes per record pass through it), and the
same processes write the array_record shards, one shard per job, from the staged files
(:mod:`data_pipelines.shard_writer`): the dataset files are the same bytes for any number of
workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging as std_logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from absl import logging
from tensorflow_datasets.core import dataset_builder as tfds_dataset_builder

from data_pipelines import build_dir, file_stager, loop_token_source, schema, shard_writer
from tlp_jax.core import features as features_lib
from tlp_jax.core import loop_tokens as loop_tokens_lib
from tlp_jax.core import network_info as network_info_lib
from tlp_jax.core import records as records_lib
from tlp_jax.core import skeleton as skeleton_lib
from tlp_jax.core import tenset

# ~0.5 GB of llvm features per array_record shard.
SHARD_SIZE = 200_000

_CITATION = """\
@inproceedings{zhai2023tlp,
  title={TLP: A Deep Learning-Based Cost Model for Tensor Program Tuning},
  author={Zhai, Yi and Zhang, Yu and Liu, Shuo and others},
  booktitle={ASPLOS}, year={2023}}
@inproceedings{zheng2021tenset,
  title={TenSet: A Large-scale Program Performance Dataset for Learned Tensor Compilers},
  author={Zheng, Lianmin and Liu, Ruochen and Shao, Junru and others},
  booktitle={NeurIPS Datasets and Benchmarks}, year={2021}}
"""


class DatasetBuildError(RuntimeError):
  """The TenSet directory cannot be turned into a dataset (with the reason)."""


@dataclasses.dataclass(eq=False)
class TensetConfig(tfds.core.BuilderConfig):
  """One dataset configuration: which hardware, how to split, how to featurize.

  Attributes:
    hardware: hardware folder names under ``measure_records/`` (one = single-hardware config).
    platform: ``"llvm"`` or ``"cuda"`` (all hardware of a config share it).
    crop: ``(L, E)`` feature crop; ``None`` = the featurizer's default for ``platform``.
    holdout: hold-out specs ``NAME[@SIZE]``; empty = :func:`network_info.default_holdout`.
    seed: seed of the train/validation split.
    train_fraction: share of non-hold-out examples in ``train``.
    loop_tokens: add the ``loop_tokens`` field, replayed from the skeletons of ``skeletons``.
    skeletons: the skeleton collection file of a config with ``loop_tokens`` (None without).
    validation: ``by_record`` (TLP) or ``by_task`` (whole tasks, TenSet's task-disjoint split).
  """

  hardware: tuple[str, ...] = ()
  platform: str = "llvm"
  crop: tuple[int, int] | None = None
  holdout: tuple[str, ...] = ()
  seed: int = 0
  train_fraction: float = network_info_lib.TRAIN_FRACTION
  loop_tokens: bool = False
  skeletons: str | None = None
  validation: str = "by_record"


# ---------------------------------------------------------------------------------------------
# Reading: each hardware once per build, featurized, into flat on-disk arrays.


@dataclasses.dataclass
class StagedHardware:
  """All valid records of one hardware, in (sorted task file, line) order.

  ``features`` is a read-only memmap; the others are in memory (a few bytes per record).
  """

  hardware: str
  platform: str
  features: np.ndarray  # (N, L, E) float32
  scores: np.ndarray  # (N,) float32
  program_keys: np.ndarray  # (N,) uint64
  record_task: np.ndarray  # (N,) int32, index into task_keys
  task_keys: list[str]  # workload keys of the task files with valid records
  task_min_cost: np.ndarray  # (T,) float64 seconds
  task_files: list[str]
  stats: Any  # records.ReadStats
  layout: int  # featurizer one-hot width the features were made with
  loop_tokens: np.ndarray | None = None  # (N, T, W) float16 read-only memmap, if made
  loop_token_stats: Any = None  # loop_token_source.LoopTokenStats, if made
  loop_token_cropped: np.ndarray | None = None  # (N,) bool: the nest was cropped to T tokens
  loop_tokens_reused: int = 0  # rows copied from an earlier hardware's, not replayed

  @property
  def num_records(self) -> int:
    return int(self.scores.shape[0])

  @functools.cached_property
  def rows_by_task(self) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """``(order, bounds, task of key)``: the rows of task ``t`` are ``order[bounds[t] :
    bounds[t + 1]]`` (computed once; later hardware of a build look their tasks up here)."""
    order = np.argsort(self.record_task, kind="stable")
    bounds = np.searchsorted(self.record_task[order], np.arange(len(self.task_keys) + 1))
    return order, bounds, {k: t for t, k in enumerate(self.task_keys)}


def detect_platform(tenset_dir: str, hardware: str) -> str:
  """``llvm``/``cuda`` from the target of the first well-formed record of a hardware folder."""
  for path in tenset.task_files(tenset_dir, hardware):
    first = records_lib.first_record(path)
    if first is not None:
      return features_lib.platform_of_target(first.target)
  raise DatasetBuildError(
    f"{hardware}: no parsable record in {tenset.measure_records_dir(tenset_dir, hardware)}"
  )


class RecordStaging:
  """Reads and featurizes each hardware once; shared by all configs of one build.

  All hardware of a platform share one growing :class:`features.Vocabulary` (the original TLP
  tables first). A new step kind widens the one-hot block and so changes the layout of every
  feature vector; hardware staged under an older layout is re-read by :meth:`get_all` so the
  features of one config always share one layout, matching the vocabulary stored with it.

  Loop tokens are replayed once per program, not once per hardware: TenSet measures the same
  programs of a task on every hardware, so a hardware staged after others copies the tokens of
  the programs they staged (:class:`loop_token_source.PriorTokens`, matched by task and program
  key) and replays only the rest; the staged bytes are the same (``reuse_tokens=False`` replays
  everything, for the tests that check it).
  """

  def __init__(
    self,
    tenset_dir: str,
    work_dir: str,
    crop: tuple[int, int] | None = None,
    token_source: loop_token_source.LoopTokenSource | None = None,
    workers: int = 1,
    reuse_tokens: bool = True,
  ):
    self.tenset_dir = tenset_dir
    self.token_source = token_source
    self.reuse_tokens = reuse_tokens
    self.work_dir = work_dir
    self.crop = tuple(crop) if crop else None
    self._featurizers: dict[str, Any] = {}
    self._staged: dict[str, StagedHardware] = {}
    self._stager = file_stager.FileStager(workers, token_source)

  def close(self) -> None:
    """Stops the worker processes (if any)."""
    self._stager.close()

  def map_ordered(self, fn, jobs):
    """Runs ``fn`` over ``jobs`` in the staging's worker processes, results in job order
    (:meth:`file_stager.FileStager.map_ordered`)."""
    return self._stager.map_ordered(fn, jobs)

  def featurizer(self, platform: str):
    """The shared featurizer (and vocabulary, ``.vocab``) of a platform."""
    if platform not in self._featurizers:
      self._featurizers[platform] = features_lib.Featurizer(
        platform, crop=self.crop, vocab=features_lib.Vocabulary.original(platform)
      )
    return self._featurizers[platform]

  def get(self, hardware: str) -> StagedHardware:
    """The staged records of one hardware (read on first use)."""
    if hardware not in self._staged:
      self._staged[hardware] = self._stage(hardware)
    return self._staged[hardware]

  def get_all(self, hardware: Sequence[str]) -> list[StagedHardware]:
    """Staged records of several hardware, all in the current feature layout."""
    for _ in range(3):
      staged = [self.get(hw) for hw in hardware]
      stale = [s.hardware for s in staged if s.layout != self.featurizer(s.platform).layout]
      if not stale:
        return staged
      logging.warning("vocabulary grew a step kind after %s was read; re-reading it", stale)
      for hw in stale:
        del self._staged[hw]
    raise DatasetBuildError(f"feature layout of {list(hardware)} did not settle")

  @property
  def loop_tokens(self) -> bool:
    """Whether staged records get loop tokens."""
    return self.token_source is not None

  def _stage(self, hardware: str) -> StagedHardware:
    platform = detect_platform(self.tenset_dir, hardware)
    featurizer = self.featurizer(platform)
    paths = tenset.task_files(self.tenset_dir, hardware)
    src = self.token_source
    priors = None
    if src is not None:
      # A missing skeleton fails now, not hours into the build.
      file_keys = src.check_task_files(paths)
      if self.reuse_tokens:
        priors = self._priors(file_keys, exclude=hardware)
    os.makedirs(self.work_dir, exist_ok=True)
    # Fresh files per read: a re-read must not truncate a file an older memmap still maps.
    feat_path = self._new_file(hardware, ".f32")
    tok_path = self._new_file(hardware, ".f16") if src is not None else None
    acc = _StageAccumulator(src is not None)
    layouts = set()
    # Whole task files are read, featurized and replayed by the stager's workers, which write
    # each file's rows to its own files in rows_dir; results come back in file order, as the
    # one-process read makes them (data_pipelines.file_stager), and their rows are appended
    # to the staging files in that order.
    rows_dir = tempfile.mkdtemp(prefix=f"{hardware}.files.", dir=self.work_dir)
    try:
      with (
        open(feat_path, "wb", buffering=0) as feat_out,
        open(tok_path, "wb", buffering=0) if tok_path else contextlib.nullcontext() as tok_out,
      ):
        staged_files = _named_errors(
          self._stager.stage(paths, hardware, featurizer, rows_dir, priors=priors)
        )
        for got in tqdm.tqdm(
          staged_files, total=len(paths), desc=f"reading {hardware}", unit=" files", mininterval=2
        ):
          path, tf = got.path, got.task
          acc.stats = tf.stats if acc.stats is None else acc.stats + tf.stats
          if not len(tf):
            continue
          costs = np.asarray(tf.costs, dtype=np.float64)
          if not (np.isfinite(costs) & (costs > 0)).all():
            # records.py keeps valid measurements only; anything else is a bug, not data to drop.
            raise DatasetBuildError(f"{path}: the reader kept a record without a valid cost")
          if tf.platform != platform:
            raise DatasetBuildError(
              f"{path}: target platform {tf.platform} differs from "
              f"{platform} of the rest of {hardware}"
            )
          layouts.add(tf.layout)
          self._finish_file(acc, feat_out, tok_out, got)
    finally:
      shutil.rmtree(rows_dir, ignore_errors=True)
    if not acc.task_keys:
      read = _stats_line(stats_to_json(acc.stats)) if acc.stats is not None else "no files"
      raise DatasetBuildError(
        f"{hardware}: no valid measurement in {len(paths)} task files (read: {read})"
      )
    scores, task_min, record_task, keys, keep = _label(acc, hardware)
    cropped = np.concatenate(acc.cropped) if src is not None and acc.cropped else None
    if cropped is not None:
      cropped = cropped[keep]
    if not keep.all():
      feat_path = self._compact(hardware, feat_path, ".f32", keep, acc.shape, np.float32)
      if src is not None:
        tok_shape = (src.max_tokens, loop_tokens_lib.WIDTH)
        tok_path = self._compact(hardware, tok_path, ".f16", keep, tok_shape, np.float16)
    n = int(scores.size)
    no_tokens = sum(acc.token_stats.skipped.values()) if src is not None else 0
    if acc.stats.kept != n + no_tokens:
      # Every record read is staged, or counted under a reason: checked, not assumed.
      raise DatasetBuildError(
        f"{hardware}: {acc.stats.kept} records kept but {n} staged and {no_tokens} skipped "
        "without loop tokens"
      )
    features = np.memmap(feat_path, dtype=np.float32, mode="r", shape=(n,) + tuple(acc.shape))
    loop_tokens = None
    if src is not None:
      loop_tokens = np.memmap(
        tok_path,
        dtype=schema.LOOP_TOKENS_DTYPE,
        mode="r",
        shape=(n, src.max_tokens, loop_tokens_lib.WIDTH),
      )
      st = acc.token_stats
      logging.info(
        "%s loop tokens: %d of %d records (%d replayed, %d copied from the same programs "
        "of hardware staged before), skipped %s, %d cropped to %d tokens",
        hardware,
        st.tokenized,
        st.records,
        st.tokenized - acc.reused,
        acc.reused,
        st.skipped or "none",
        st.cropped,
        src.max_tokens,
      )
    logging.info(
      "%s: %d valid records in %d tasks (%d files)", hardware, n, len(acc.task_keys), len(paths)
    )
    return StagedHardware(
      hardware=hardware,
      platform=platform,
      features=features,
      scores=scores,
      program_keys=keys,
      record_task=record_task,
      task_keys=acc.task_keys,
      task_min_cost=task_min,
      task_files=acc.task_files,
      stats=acc.stats,
      # A kind first seen mid-way leaves earlier files in an older layout: -1 = stale.
      layout=layouts.pop() if len(layouts) == 1 else -1,
      loop_tokens=loop_tokens,
      loop_token_stats=acc.token_stats,
      loop_token_cropped=cropped,
      loop_tokens_reused=acc.reused,
    )

  def _priors(self, file_keys, exclude: str):
    """Per task file (workload keys ``file_keys``), lazily: the loop tokens of its task staged
    for the hardware staged before (not ``exclude``), as :class:`loop_token_source.PriorTokens`;
    a program staged by several counts once (the first hardware's row)."""
    earlier = [
      s
      for s in self._staged.values()
      if s.hardware != exclude and s.loop_tokens is not None and s.loop_token_cropped is not None
    ]
    for key in file_keys:
      out, covered = [], None
      for s in earlier:
        order, bounds, tasks = s.rows_by_task
        t = tasks.get(key)
        if t is None:
          continue
        rows = order[bounds[t] : bounds[t + 1]]
        keys = s.program_keys[rows]
        if covered is not None:
          new = ~np.isin(keys, covered)
          rows, keys = rows[new], keys[new]
        if not rows.size:
          continue
        covered = keys if covered is None else np.concatenate([covered, keys])
        out.append(
          loop_token_source.PriorTokens(
            workload_key=key,
            path=s.loop_tokens.filename,
            num_rows=int(s.loop_tokens.shape[0]),
            keys=keys,
            rows=rows,
            cropped=s.loop_token_cropped[rows],
          )
        )
      yield out

  def _new_file(self, hardware: str, suffix: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"{hardware}.", suffix=suffix, dir=self.work_dir)
    try:
      os.fchmod(fd, build_dir.umask_mode())  # as open() would: not mkstemp's 0600
    finally:
      os.close(fd)
    return path

  def _compact(self, hardware: str, path: str, suffix: str, keep, row_shape, dtype) -> str:
    """A new staged file with only the rows of ``path`` where ``keep``; deletes ``path``."""
    rows = np.memmap(path, dtype=dtype, mode="r", shape=(keep.size,) + tuple(row_shape))
    out_path = self._new_file(hardware, suffix)
    with open(out_path, "wb") as out:
      for start in range(0, keep.size, 65536):
        sel = keep[start : start + 65536]
        out.write(np.ascontiguousarray(rows[start : start + sel.size][sel]).tobytes())
    del rows
    os.remove(path)
    return out_path

  def _finish_file(
    self, acc: _StageAccumulator, feat_out, tok_out, got: file_stager.StagedFile
  ) -> None:
    """Appends one task file's staged rows (valid and, with loop tokens, replayed) to the
    staging files and collects its labels."""
    tf = got.task
    if got.tokens is not None:
      acc.token_stats += got.tokens.stats
      acc.reused += got.tokens.reused
    keep = got.keep
    try:
      got.move_rows(feat_out, tok_out)
    except file_stager.FileStageError as e:
      raise DatasetBuildError(str(e)) from e
    except OSError as e:
      raise DatasetBuildError(f"{got.path}: staging its rows: {type(e).__name__}: {e}") from e
    if not keep.any():
      return  # every record of the task failed to replay (counted in the token stats)
    if acc.shape is None:
      acc.shape = got.row_shape
    elif got.row_shape != acc.shape:
      raise DatasetBuildError(f"{got.path}: feature shape {got.row_shape} != {acc.shape}")
    # Labels are per task (workload key), not per file: a task split over several files is
    # normalised once, by its best cost over all of them (:func:`_label`).
    task = acc.task_index.setdefault(tf.workload_key, len(acc.task_keys))
    if task == len(acc.task_keys):
      acc.task_keys.append(tf.workload_key)
      acc.task_num_files.append(0)
    acc.task_num_files[task] += 1
    acc.costs.append(np.asarray(tf.costs, dtype=np.float64)[keep])
    acc.keys.append(np.asarray(tf.program_keys, dtype=np.uint64)[keep])
    if got.tokens is not None:
      acc.cropped.append(got.tokens.cropped)
    acc.rec_task.append(np.full(int(keep.sum()), task, np.int32))
    acc.task_files.append(os.path.basename(got.path))


def _named_errors(results, error=file_stager.FileStageError):
  """The results of a worker pool, with a job's ``error`` (a file's or a shard's, naming it) as
  a :class:`DatasetBuildError`."""
  try:
    yield from results
  except error as e:
    raise DatasetBuildError(str(e)) from e


@dataclasses.dataclass
class _StageAccumulator:
  """What :meth:`RecordStaging._stage` collects per task file, in file order."""

  loop_tokens: bool
  stats: Any = None
  token_stats: Any = None
  shape: tuple | None = None
  costs: list = dataclasses.field(default_factory=list)  # per file: (n,) float64 seconds
  keys: list = dataclasses.field(default_factory=list)
  rec_task: list = dataclasses.field(default_factory=list)
  task_keys: list = dataclasses.field(default_factory=list)  # unique, in first-file order
  task_index: dict = dataclasses.field(default_factory=dict)  # workload key -> task
  task_num_files: list = dataclasses.field(default_factory=list)
  task_files: list = dataclasses.field(default_factory=list)
  cropped: list = dataclasses.field(default_factory=list)  # per file: (rows,) bool
  reused: int = 0

  def __post_init__(self):
    if self.loop_tokens:
      self.token_stats = loop_token_source.LoopTokenStats()


def _label(acc: _StageAccumulator, hardware: str):
  """TLP's labels of one hardware's staged records, per task over all of its files.

  ``score = min_cost(task) / cost`` in float32. A score that underflows float32 to 0 (costs of
  one task spanning more than float32's range; records.py already refuses costs outside it) is
  dropped and counted in the read stats as ``score_underflow``, never dropped silently.

  Returns:
    (scores, task_min_cost, record_task, program_keys, keep) of the records kept; ``keep``
    marks them among the staged rows.
  """
  costs = np.concatenate(acc.costs)
  record_task = np.concatenate(acc.rec_task)
  keys = np.concatenate(acc.keys)
  task_min = np.full(len(acc.task_keys), np.inf)
  np.minimum.at(task_min, record_task, costs)
  # The same float64 division (then float32 rounding) as records.read_task_file's per-file one.
  scores = (task_min[record_task] / costs).astype(np.float32)
  keep = scores > 0
  split = [k for k, n in zip(acc.task_keys, acc.task_num_files) if n > 1]
  if split:
    logging.warning(
      "%s: %d tasks are split over several files; each is labelled over all of its files, e.g. %s",
      hardware,
      len(split),
      split[0],
    )
  dropped = int((~keep).sum())
  if dropped:
    acc.stats.failed[records_lib.SCORE_UNDERFLOW] += dropped
    acc.stats.kept -= dropped
    logging.warning(
      "%s: %d records skipped as %s (score below float32's range)",
      hardware,
      dropped,
      records_lib.SCORE_UNDERFLOW,
    )
  return scores[keep], task_min, record_task[keep], keys[keep], keep


# ---------------------------------------------------------------------------------------------
# Planning: task table, cross-hardware join, splits.


@dataclasses.dataclass
class ExamplePlan:
  """Which staged records make up each example, and the split of every example."""

  task_keys: list[str]  # (T,) sorted workload keys
  task_min_cost: np.ndarray  # (T, H) seconds, NaN where the task has no record on h
  task_records: np.ndarray  # (T, H) records kept per task and hardware
  rows: np.ndarray  # (M, H) int64 row into staged[h], -1 = not measured
  task_index: np.ndarray  # (M,) int32
  splits: dict[str, np.ndarray]  # split -> sorted example indices
  join_stats: dict[str, int]


def plan_examples(
  staged: Sequence[StagedHardware],
  holdout_keys: frozenset[str],
  seed: int,
  train_fraction: float = network_info_lib.TRAIN_FRACTION,
  validation: str = "by_record",
) -> ExamplePlan:
  """Joins the staged hardware into examples and splits them (TLP hold-out + 90/10).

  ``validation``: ``by_record`` (TLP: a seeded 10% of the non-hold-out examples) or
  ``by_task`` (a seeded 10% of the non-hold-out tasks, with all their examples).
  """
  if validation not in schema.VALIDATION_MODES:
    raise DatasetBuildError(
      f"validation must be one of {schema.VALIDATION_MODES}, got {validation!r}"
    )
  num_hw = len(staged)
  task_keys = sorted(set().union(*(s.task_keys for s in staged)))
  key_to_task = {k: i for i, k in enumerate(task_keys)}
  num_tasks = len(task_keys)
  task_min = np.full((num_tasks, num_hw), np.nan)
  task_records = np.zeros((num_tasks, num_hw), np.int64)
  per_hw_task = []
  for h, s in enumerate(staged):
    local_to_global = np.array([key_to_task[k] for k in s.task_keys], np.int64)
    task_min[local_to_global, h] = s.task_min_cost
    per_hw_task.append(local_to_global[s.record_task])
  join_stats = {"duplicate_programs_dropped": 0}
  if num_hw == 1:
    # TLP keeps every record of a hardware, duplicates included.
    rows = np.arange(staged[0].num_records, dtype=np.int64)[:, None]
    task_index = per_hw_task[0]
  else:
    all_task = np.concatenate(per_hw_task)
    all_key = np.concatenate([s.program_keys for s in staged])
    all_hw = np.concatenate([np.full(s.num_records, h, np.int64) for h, s in enumerate(staged)])
    all_row = np.concatenate([np.arange(s.num_records, dtype=np.int64) for s in staged])
    order = np.lexsort((all_row, all_hw, all_key, all_task))
    t, k, hw, row = all_task[order], all_key[order], all_hw[order], all_row[order]
    new_group = np.ones(t.size, bool)
    new_group[1:] = (t[1:] != t[:-1]) | (k[1:] != k[:-1])
    group = np.cumsum(new_group) - 1
    first_of_hw = new_group.copy()
    first_of_hw[1:] |= hw[1:] != hw[:-1]
    join_stats["duplicate_programs_dropped"] = int((~first_of_hw).sum())
    rows = np.full((int(group[-1]) + 1, num_hw), -1, np.int64)
    rows[group[first_of_hw], hw[first_of_hw]] = row[first_of_hw]
    task_index = t[new_group]
    measured_on = (rows >= 0).sum(axis=1)
    for c in range(1, num_hw + 1):
      join_stats[f"programs_on_{c}_hardware"] = int((measured_on == c).sum())
  for h in range(num_hw):
    task_records[:, h] = np.bincount(task_index[rows[:, h] >= 0], minlength=num_tasks)

  is_test_task = np.array([k in holdout_keys for k in task_keys], bool)
  example_is_test = is_test_task[task_index] if task_index.size else np.zeros(0, bool)
  test = np.flatnonzero(example_is_test)
  rest = np.flatnonzero(~example_is_test)
  if validation == "by_task":
    train_pos, val_pos = network_info_lib.train_validation_split_by_task(
      task_index[rest], seed, train_fraction
    )
  else:
    train_pos, val_pos = network_info_lib.train_validation_split(rest.size, seed, train_fraction)
  splits = {"train": rest[train_pos], "validation": rest[val_pos], "test": test}
  # The hold-out guarantee everything downstream relies on; checked, not assumed.
  for name in ("train", "validation"):
    leaked = np.unique(task_index[splits[name]][is_test_task[task_index[splits[name]]]])
    if leaked.size:
      raise DatasetBuildError(
        f"hold-out tasks leaked into {name}: {[task_keys[i] for i in leaked[:5]]}"
      )
  if set(np.unique(task_index[test]).tolist()) != set(np.flatnonzero(is_test_task).tolist()):
    raise DatasetBuildError("some hold-out task with records is missing from test")
  return ExamplePlan(
    task_keys=task_keys,
    task_min_cost=task_min,
    task_records=task_records,
    rows=rows,
    task_index=task_index.astype(np.int32),
    splits=splits,
    join_stats=join_stats,
  )


# ---------------------------------------------------------------------------------------------
# Metadata.


def _json_float(x: float) -> float | None:
  return float(x) if math.isfinite(x) else None


def stats_to_json(stats) -> dict:
  """``records.ReadStats`` -> plain JSON dict (records read/kept/skipped by reason)."""
  if hasattr(stats, "to_dict"):
    return stats.to_dict()
  return json.loads(json.dumps(dataclasses.asdict(stats), default=str))


def build_metadata(
  config: TensetConfig,
  plan: ExamplePlan,
  staged: Sequence[StagedHardware],
  networks: Sequence[network_info_lib.NetworkInfo],
  holdout: Sequence[str],
  holdout_nets: Sequence[network_info_lib.NetworkInfo],
  vocab_json: str,
  crop: Sequence[int],
  tenset_dir: str,
  loop_token_layout: Mapping[str, Any] | None = None,
) -> dict:
  """The JSON metadata stored with a config (see module docstring).

  ``crop`` is the examples' step-feature shape. ``loop_token_layout``: the layout of the loop
  tokens (``LoopTokenSource.layout()``) or None.
  """
  flop_ct = {}
  for net in networks:
    for t in net.tasks:
      # TVM's flop_ct is -1 where it cannot count; that is "unknown" (None) in the table.
      flop_ct.setdefault(t.workload_key, t.flop_ct if t.flop_ct >= 0 else float("nan"))
  key_to_task = {k: i for i, k in enumerate(plan.task_keys)}
  nets_json = []
  for net in holdout_nets:
    present = [t for t in net.tasks if t.workload_key in key_to_task]
    nets_json.append(
      {
        "name": net.name,
        "batch_size": net.batch_size,
        "input_size": net.input_size,
        "label": net.label,
        "task_indices": [key_to_task[t.workload_key] for t in present],
        "weights": [t.weight for t in present],
        "missing_workload_keys": [
          t.workload_key for t in net.tasks if t.workload_key not in key_to_task
        ],
      }
    )
  return {
    "format": schema.METADATA_FORMAT,
    "config": config.name,
    "hardware": list(config.hardware),
    "platform": config.platform,
    "crop": [int(c) for c in crop],
    # The loop-token version: None, or the layout of the ``loop_tokens`` field.
    schema.LOOP_TOKENS_META: loop_token_layout,
    schema.LOOP_TOKEN_STATS_META: {
      s.hardware: s.loop_token_stats.to_dict() for s in staged if s.loop_token_stats is not None
    },
    "seed": int(config.seed),
    "train_fraction": float(config.train_fraction),
    schema.VALIDATION_META: config.validation,
    "holdout": list(holdout),
    "tenset_dir": os.path.abspath(tenset_dir),
    "tasks": {
      "workload_keys": plan.task_keys,
      "min_cost": [[_json_float(v) for v in row] for row in plan.task_min_cost],
      "flop_ct": [_json_float(flop_ct.get(k, float("nan"))) for k in plan.task_keys],
      "num_records": plan.task_records.tolist(),
    },
    "networks": nets_json,
    "examples": {name: int(idx.size) for name, idx in plan.splits.items()},
    "vocab_json": vocab_json,
    "read_stats": {s.hardware: stats_to_json(s.stats) for s in staged},
    "join_stats": plan.join_stats,
  }


def format_summary(meta: Mapping[str, Any]) -> str:
  """Human-readable summary of one config's metadata (the build CLI prints it)."""
  loop = ""
  tok = meta.get(schema.LOOP_TOKENS_META)
  if tok:
    loop = (
      f", loop tokens ({tok['max_tokens']}, {tok['width']}) {tok['dtype']} v{tok['layout_version']}"
    )
  lines = [
    f"config {meta['config']}: hardware {', '.join(meta['hardware'])} "
    f"({meta['platform']}, crop {tuple(meta['crop'])}{loop}, seed {meta['seed']}, "
    f"validation {meta.get(schema.VALIDATION_META, 'by_record')})",
    f"  hold-out: {', '.join(meta['holdout'])}",
    f"  tasks: {len(meta['tasks']['workload_keys'])}; examples: "
    + ", ".join(f"{k} {v}" for k, v in meta["examples"].items()),
  ]
  records = np.asarray(meta["tasks"]["num_records"]).reshape(-1, len(meta["hardware"]))
  for h, hw in enumerate(meta["hardware"]):
    st = meta["read_stats"].get(hw, {})
    lines.append(
      f"  {hw}: {int(records[:, h].sum())} examples measured, "
      f"{int((records[:, h] > 0).sum())} tasks; read: " + _stats_line(st)
    )
    if hw in (meta.get(schema.LOOP_TOKEN_STATS_META) or {}):
      st = meta[schema.LOOP_TOKEN_STATS_META][hw]
      skipped = ", ".join(f"{k} {v}" for k, v in st["skipped"].items()) or "none"
      lines.append(
        f"  {hw} loop tokens: {st['tokenized']} of {st['records']} records; "
        f"skipped: {skipped}; cropped to {tok['max_tokens'] if tok else '?'} "
        f"tokens: {st['cropped']}"
      )
      n_skipped = sum(st["skipped"].values())
      if n_skipped:
        # The records read and kept that are not in the dataset: say so, with the sum.
        kept = meta["read_stats"].get(hw, {}).get("kept", 0)
        lines.append(
          f"  {hw}: kept {kept} = {kept - n_skipped} written + {n_skipped} skipped without "
          "loop tokens"
        )
      for ex in st["examples"][:3]:
        lines.append(f"    e.g. {ex}")
  if len(meta["hardware"]) > 1:
    lines.append("  join: " + ", ".join(f"{k} {v}" for k, v in meta["join_stats"].items()))
  for net in meta["networks"]:
    lines.append(
      f"  hold-out {net['label']}: {len(net['task_indices'])} tasks with records, "
      f"{len(net['missing_workload_keys'])} without"
    )
  return "\n".join(lines)


def _stats_line(st: Mapping[str, Any]) -> str:
  parts = []
  for k, v in st.items():
    if isinstance(v, (int, float)):
      parts.append(f"{k} {v}")
    elif isinstance(v, Mapping) and v and all(isinstance(x, (int, float)) for x in v.values()):
      parts.append(f"{k} {{" + ", ".join(f"{a}: {b}" for a, b in sorted(v.items())) + "}")
  return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# The TFDS builder.


class _DropTfdsChatter(std_logging.Filter):
  """Drops TFDS's own log lines below ERROR (they name the staging paths and repeat the config
  repr); this module logs what a build did."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.ERROR or (
      f"{os.sep}tensorflow_datasets{os.sep}" not in (record.pathname or "")
    )


@contextlib.contextmanager
def _quiet_tfds():
  """Silences TFDS's informational logging for the duration of a build."""
  flt = _DropTfdsChatter()
  loggers = [logging.get_absl_logger(), std_logging.getLogger()]
  handlers = [h for lg in loggers for h in lg.handlers]
  for lg in loggers:
    lg.addFilter(flt)
  for h in handlers:
    h.addFilter(flt)  # records propagated from child loggers skip the loggers' filters
  try:
    yield
  finally:
    for lg in loggers:
      lg.removeFilter(flt)
    for h in handlers:
      h.removeFilter(flt)


class Tenset(tfds_dataset_builder.FileReaderBuilder):
  """TenSet measure records as TLP examples (see the module docstring).

  Shard-based writing, as TFDS's ``ShardBasedBuilder`` does it (a shard plan made up front, no
  shuffle), but each shard written by one job of the build's worker pool
  (:mod:`data_pipelines.shard_writer`) instead of one after another in this process; the files
  are the same bytes for any number of workers. Not a ``GeneratorBasedBuilder``: its shuffler
  spills splits over 1 GB to disk through ``tf.io.gfile`` (tensorflow_datasets/core/shuffle.py),
  i.e. it needs TensorFlow at TenSet scale; shard-based writing needs no TF, skips the shuffle
  pass (the trainer shuffles anyway) and keeps examples in plan order (test grouped by task).
  """

  VERSION = tfds.core.Version(schema.VERSION)

  def __init__(
    self,
    *,
    tenset_dir: str,
    staging: RecordStaging | None = None,
    shard_size: int = SHARD_SIZE,
    token_source: loop_token_source.LoopTokenSource | None = None,
    workers: int = 1,
    **kwargs,
  ):
    """Args: tenset_dir: TenSet root; staging: shared reader (one is made if None);
    shard_size: examples per array_record shard; token_source: the skeletons of a config with
    ``loop_tokens`` (the staging's when it is given); workers: processes of the staging made
    when none is given (a given staging's workers read and write)."""
    self._tenset_dir = tenset_dir
    self._staging = staging
    self._token_source = staging.token_source if staging is not None else token_source
    self._task_keys: list[str] = []
    self._own_staging_dir = None
    self._shard_size = int(shard_size)
    self._workers = int(workers)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    crop = tuple(cfg.crop) if cfg.crop else tuple(features_lib.DEFAULT_CROP[cfg.platform])
    token_shape = None
    if cfg.loop_tokens:
      if self._token_source is None:
        raise DatasetBuildError(f"{cfg.name}: loop_tokens=True but no skeletons were given")
      token_shape = (self._token_source.max_tokens, loop_tokens_lib.WIDTH)
    return tfds.core.DatasetInfo(
      builder=self,
      description="TenSet measure records with TLP primitive features.",
      features=shard_writer.features_dict(crop, len(cfg.hardware), token_shape),
      homepage="https://github.com/zhaiyi000/tlp",
      citation=_CITATION,
      metadata=tfds.core.MetadataDict(),
    )

  def _log_download_bytes(self) -> None:
    # TFDS prints "Downloading and preparing dataset ..." to stdout; nothing is downloaded here.
    logging.info("%s: writing %s", self.builder_config.name, self.data_dir)

  def _log_download_done(self) -> None:
    # TFDS prints "Dataset ... downloaded and prepared to <staging path>" to stdout.
    logging.info("%s: written", self.builder_config.name)

  def _download_and_prepare(self, dl_manager, download_config=None):
    # TFDS calls this with self.data_dir = its incomplete dir, renamed to the dataset's folder
    # after dataset_info.json and features.json are written next to our files.
    del dl_manager, download_config
    try:
      plan, staged = self._plan()
      self.info.set_splits(self._write_splits(plan, staged))
      if self.builder_config.loop_tokens:
        # Inside TFDS's incomplete dir: appears with the dataset, atomically.
        skeleton_lib.save_collection(
          os.path.join(self.data_dir, schema.SKELETONS_FILE),
          self._token_source.subset(self._task_keys),
        )
    finally:
      if self._own_staging_dir:
        self._staging.close()
        shutil.rmtree(self._own_staging_dir, ignore_errors=True)
        self._own_staging_dir = None
        self._staging = None

  def _plan(self) -> tuple[ExamplePlan, list[StagedHardware]]:
    """Reads (or reuses) the staged hardware, plans the splits and fills the metadata."""
    cfg = self.builder_config
    networks = network_info_lib.load_network_infos(self._tenset_dir)
    holdout = tuple(cfg.holdout) or network_info_lib.default_holdout(networks)
    holdout_nets = network_info_lib.select_holdout(networks, holdout)
    held_keys = network_info_lib.holdout_workload_keys(holdout_nets)
    if self._staging is None:
      self._own_staging_dir = tempfile.mkdtemp(prefix="tenset_staging_")
      self._staging = RecordStaging(
        self._tenset_dir,
        self._own_staging_dir,
        crop=cfg.crop,
        token_source=(self._token_source if cfg.loop_tokens else None),
        workers=self._workers,
      )
    staging = self._staging
    if staging.loop_tokens != cfg.loop_tokens:
      raise DatasetBuildError(
        f"{cfg.name}: config asks for loop_tokens={cfg.loop_tokens}, the "
        f"shared staging has {staging.loop_tokens}"
      )
    staged = staging.get_all(cfg.hardware)
    for s in staged:
      if s.platform != cfg.platform:
        raise DatasetBuildError(
          f"{s.hardware} is {s.platform}, config {cfg.name} is {cfg.platform}"
        )
    crop = staged[0].features.shape[1:]
    plan = plan_examples(staged, held_keys, cfg.seed, cfg.train_fraction, cfg.validation)
    self._task_keys = list(plan.task_keys)
    self.info.metadata.update(
      build_metadata(
        cfg,
        plan,
        staged,
        networks,
        [str(h) for h in network_info_lib.parse_holdout(holdout)],
        holdout_nets,
        staging.featurizer(cfg.platform).vocab.to_json(),
        crop,
        self._tenset_dir,
        loop_token_layout=staging.token_source.layout() if cfg.loop_tokens else None,
      )
    )
    logging.info("%s: %s examples", cfg.name, self.info.metadata["examples"])
    empty = [name for name in schema.SPLITS if not plan.splits[name].size]
    if len(empty) == len(schema.SPLITS):
      raise DatasetBuildError(f"{cfg.name}: no examples at all")
    if empty:
      # TFDS cannot write an empty split; the loader reads a missing split as zero examples.
      logging.warning("%s: splits %s are empty and are not written", cfg.name, empty)
    return plan, staged

  def _write_splits(
    self, plan: ExamplePlan, staged: Sequence[StagedHardware]
  ) -> tfds.core.SplitDict:
    """Writes every split's shards with the staging's workers; returns TFDS's split records.

    The shard plan (``ceil(n / shard_size)`` near-equal shards per split, examples in plan
    order) and the split records are TFDS's ``ShardBasedBuilder``'s; only who writes differs.
    """
    cfg = self.builder_config
    splits = {name: plan.splits[name] for name in schema.SPLITS if plan.splits[name].size}
    table_dir = tempfile.mkdtemp(prefix=f"shards_{cfg.name}_", dir=self._staging.work_dir)
    try:
      shard_writer.save_table(
        table_dir,
        plan.rows,
        plan.task_index,
        [s.scores for s in staged],
        plan.task_min_cost,
        splits,
      )
      sources = tuple(shard_writer.StagedSource.of(s) for s in staged)
      tokens = staged[0].loop_tokens
      jobs, templates = [], {}
      for name, idx in splits.items():
        template = self._get_filename_template(split_name=name).replace(split=name)
        templates[name] = template
        ranges = shard_writer.shard_ranges(idx.size, self._shard_size)
        for k, (start, stop) in enumerate(ranges):
          path = template.sharded_filepath(shard_index=k, num_shards=len(ranges))
          jobs.append(
            shard_writer.ShardJob(
              table_dir=table_dir,
              split=name,
              start=start,
              stop=stop,
              path=os.fspath(path),
              sources=sources,
              feature_shape=tuple(staged[0].features.shape[1:]),
              loop_token_shape=None if tokens is None else tuple(tokens.shape[1:]),
            )
          )
      lengths: dict[str, list[int]] = {name: [] for name in splits}
      total = sum(idx.size for idx in splits.values())
      with tqdm.tqdm(
        total=total, desc=f"writing {cfg.name}", unit=" ex", mininterval=2, leave=False
      ) as bar:
        written = self._staging.map_ordered(shard_writer.write_shard, jobs)
        # Consumed to its end (not zipped with jobs): a pool generator left unfinished stops
        # the pool.
        for k, n in enumerate(_named_errors(written, shard_writer.ShardWriteError)):
          lengths[jobs[k].split].append(n)
          bar.update(n)
    finally:
      shutil.rmtree(table_dir, ignore_errors=True)
    infos = []
    for name, template in templates.items():
      num_shards = len(lengths[name])
      paths = [
        template.sharded_filepath(shard_index=k, num_shards=num_shards) for k in range(num_shards)
      ]
      infos.append(
        tfds.core.SplitInfo(
          name=name,
          shard_lengths=lengths[name],
          num_bytes=sum(p.stat().length for p in paths),
          filename_template=template,
        )
      )
    return tfds.core.SplitDict(infos)


# ---------------------------------------------------------------------------------------------
# Configs and whole builds.


def multi_config_name(hardware: Sequence[str], all_hardware: Sequence[str]) -> str:
  """``all`` when the config covers every hardware folder, else the names joined by ``+``."""
  return "all" if sorted(hardware) == sorted(all_hardware) else "+".join(hardware)


def make_configs(
  tenset_dir: str,
  hardware: Sequence[str] | None = None,
  holdout: Sequence[str] = (),
  seed: int = 0,
  crop: tuple[int, int] | None = None,
  train_fraction: float = network_info_lib.TRAIN_FRACTION,
  multi: bool = True,
  loop_tokens: str | bool = "auto",
  skeletons: str | None = None,
  validation: str = "by_record",
) -> list[TensetConfig]:
  """One config per hardware (default: every folder) plus the multi-hardware join config.

  ``loop_tokens``: ``auto`` (the default: loop tokens when the skeleton file exists), ``on``
  (required: a missing file is a :class:`loop_token_source.MissingSkeletonError` naming the
  extraction command) or ``off`` (TLP's step features only); ``True`` / ``False`` mean
  ``on`` / ``off``. ``skeletons``: the skeleton collection file (default
  ``TENSET_DIR/network_info/skeletons.json``). ``validation``: see :class:`TensetConfig`.

  The multi config is made when there are at least two hardware of the same platform; with
  mixed platforms there is one per platform (named ``all-<platform>``).
  """
  all_hw = tenset.hardware_folders(tenset_dir)
  hardware = list(hardware) if hardware else all_hw
  unknown = [h for h in hardware if h not in all_hw]
  if unknown:
    raise DatasetBuildError(f"unknown hardware {unknown}; available: {', '.join(all_hw)}")
  platforms = {hw: detect_platform(tenset_dir, hw) for hw in hardware}
  # Resolve the hold-out now: a bad spec fails before any existing dataset is replaced, and the
  # config names the networks actually held out.
  networks = network_info_lib.load_network_infos(tenset_dir)
  holdout = tuple(holdout) or network_info_lib.default_holdout(networks)
  network_info_lib.select_holdout(networks, holdout)
  holdout = tuple(str(h) for h in network_info_lib.parse_holdout(holdout))
  if isinstance(loop_tokens, bool):
    loop_tokens = "on" if loop_tokens else "off"
  skeletons = loop_token_source.resolve_skeletons(loop_tokens, tenset_dir, skeletons)
  if validation not in schema.VALIDATION_MODES:
    raise DatasetBuildError(
      f"validation must be one of {schema.VALIDATION_MODES}, got {validation!r}"
    )
  common = dict(
    holdout=holdout,
    seed=seed,
    crop=tuple(crop) if crop else None,
    train_fraction=train_fraction,
    loop_tokens=skeletons is not None,
    skeletons=skeletons,
    validation=validation,
  )
  configs = [
    TensetConfig(
      name=hw,
      version=schema.VERSION,
      hardware=(hw,),
      platform=platforms[hw],
      description=f"{hw} measure records",
      **common,
    )
    for hw in hardware
  ]
  if multi:
    groups: dict[str, list[str]] = {}
    for hw in hardware:
      groups.setdefault(platforms[hw], []).append(hw)
    for platform, hws in sorted(groups.items()):
      if len(hws) < 2:
        continue
      name = multi_config_name(hws, all_hw)
      if len(groups) > 1 and name == "all":
        name = f"all-{platform}"
      configs.append(
        TensetConfig(
          name=name,
          version=schema.VERSION,
          hardware=tuple(hws),
          platform=platform,
          description=f"programs joined across {', '.join(hws)}",
          **common,
        )
      )
  return configs


def build(
  tenset_dir: str,
  data_dir: str,
  configs: Sequence[TensetConfig],
  shard_size: int = SHARD_SIZE,
  token_source: loop_token_source.LoopTokenSource | None = None,
  workers: int = 1,
) -> list[dict]:
  """Builds (replacing) every config into ``data_dir``, all or nothing; returns their metadata.

  The configs are built into a staging folder inside ``data_dir`` and swapped in together only
  when all of them are complete (:mod:`data_pipelines.build_dir`): a failed or killed build
  leaves the datasets already in ``data_dir`` untouched, and the next build deletes (or, when
  it was complete, finishes) what a killed one left. Hardware shared by several configs is
  read once (the featurized records are kept in the staging folder during the build). Configs
  with ``loop_tokens`` replay their records over the skeletons of ``token_source`` when given,
  else of the configs' ``skeletons`` file.

  ``workers`` processes read, featurize and replay whole task files
  (:mod:`data_pipelines.file_stager`) and write the shards (:mod:`data_pipelines.shard_writer`);
  the dataset files are the same bytes for any number of workers. A failed shard is a
  :class:`DatasetBuildError` naming it, and nothing of the build is committed.
  """
  crops = {c.crop for c in configs}
  if len(crops) > 1:
    raise DatasetBuildError(f"configs of one build must share the crop, got {crops}")
  tokens = {c.loop_tokens for c in configs}
  if len(tokens) > 1:
    raise DatasetBuildError(f"configs of one build must share loop_tokens, got {tokens}")
  with_tokens = next(iter(tokens), False)
  if with_tokens and token_source is None:
    paths = {c.skeletons for c in configs}
    if len(paths) != 1 or None in paths:
      raise DatasetBuildError(
        "loop_tokens=True needs the per-task skeletons (one skeletons file for all configs, "
        f"or a LoopTokenSource); extract them once with TVM: "
        f"{loop_token_source.extract_hint(tenset_dir)}"
      )
    token_source = loop_token_source.LoopTokenSource(next(iter(paths)), tenset_dir)
  with (
    build_dir.StagedBuild(data_dir) as staged_build,
    _quiet_tfds(),
    contextlib.ExitStack() as stack,
  ):
    staging = RecordStaging(
      tenset_dir,
      staged_build.work_dir,
      crop=next(iter(crops)),
      token_source=token_source if with_tokens else None,
      workers=workers,
    )
    stack.callback(staging.close)
    metas = []
    for cfg in configs:
      builder = Tenset(
        tenset_dir=tenset_dir,
        staging=staging,
        config=cfg,
        data_dir=staged_build.out_dir,
        file_format="array_record",
        shard_size=shard_size,
      )
      builder.download_and_prepare(
        download_dir=os.path.join(staged_build.work_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS,
          compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
      )
      metas.append(dict(builder.info.metadata))
    staged_build.commit([cfg.name for cfg in configs])
  return metas
