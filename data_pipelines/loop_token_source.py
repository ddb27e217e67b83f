"""Loop tokens of measure records from stored per-task skeletons: the build's side (no TVM).

The loop-token feature version (issue 15) needs, per record, its program's final loop nest. The
nest is replayed in pure Python from the record's steps over its task's skeleton
(:mod:`tlp_jax.core.replay`) and turned into ``(T, W)`` float16 tokens
(:mod:`tlp_jax.core.loop_tokens`). Skeletons come from a collection file extracted once with
TVM (``python -m tlp_jax.tvm.skeleton_extract --tenset_dir DIR``), by default
``DIR/network_info/skeletons.json``.

Per task file the records are replayed one by one (a record whose replay fails is skipped and
counted by reason, :class:`LoopTokenStats`) and their tokens are filled by one NumPy pass per
chunk (``replay_cache.fill_padded``: bit-identical to ``loop_tokens.loop_tokens`` per record, and
faster). The traced-template cache of :mod:`tlp_jax.core.replay_cache` is not used: a build
sees most templates about twice, and tracing costs more than it saves in one pass (measured on
the sample: 1,140 records/s plain vs 440/s with the cache).

Replay is the slow part of a build (~1k records/s per core): the build runs it per task file
in worker processes, with the reading and featurizing of the file
(:mod:`data_pipelines.file_stager`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines import schema
from tlp_jax.core import features as features_lib
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import records as records_lib
from tlp_jax.core import replay as rp
from tlp_jax.core import replay_cache
from tlp_jax.core import skeleton as sk

log = logging.getLogger(__name__)

# --loop_tokens: auto = when the skeleton file exists, on = required, off = never.
MODES = ("auto", "on", "off")
# Skip reasons (LoopTokenStats.skipped).
NO_SKELETON = "no_skeleton"  # the extractor listed the task as failed
REPLAY_ERROR = "replay_error"  # tlp_jax.core.replay.ReplayError (a step not applicable)
BAD_RECORD = "bad_record"  # the line has no step list where the replay reads it
# Any other exception of the replay / tokens is counted as "unexpected_<ExceptionName>".
MAX_EXAMPLES = 20
# Records per NumPy fill: the fill holds (chunk, L, L) arrays, L = loops of the longest nest.
_FILL_CHUNK = 512


class MissingSkeletonError(FileNotFoundError):
  """No skeleton file, or no skeleton for a task (the message names the extraction command)."""


def extract_hint(tenset_dir: str, path: str | None = None) -> str:
  """The command that writes the skeletons of a TenSet dir (needs the ``tvm`` extra)."""
  out = "" if path is None or path == sk.tenset_skeletons_path(tenset_dir) else f" --out {path}"
  return f"{sk.EXTRACT_COMMAND} {tenset_dir}{out}"


def resolve_skeletons(mode: str, tenset_dir: str, path: str | None = None) -> str | None:
  """The skeleton file a build uses for ``--loop_tokens mode``, or None (no loop tokens).

  Args:
    mode: ``auto`` (the file if it exists), ``on`` (the file, required) or ``off``.
    tenset_dir: TenSet root (default place of the file).
    path: ``--skeletons`` (default ``TENSET/network_info/skeletons.json``).

  Raises:
    MissingSkeletonError: ``on`` and the file does not exist.
    ValueError: unknown mode.
  """
  if mode not in MODES:
    raise ValueError(f"loop_tokens must be one of {MODES}, got {mode!r}")
  path = path or sk.tenset_skeletons_path(tenset_dir)
  if mode == "off":
    return None
  if os.path.isfile(path):
    return path
  if mode == "auto":
    log.info("%s: no skeleton file, building without loop tokens", path)
    return None
  raise MissingSkeletonError(
    f"{path}: no skeleton file; loop tokens need each task's skeleton, extracted once with "
    f"TVM: {extract_hint(tenset_dir, path)}"
  )


@dataclasses.dataclass
class LoopTokenStats:
  """What happened to the records given to the loop tokens; merge with ``+``.

  ``records == tokenized + sum(skipped.values())`` always holds.
  """

  records: int = 0
  tokenized: int = 0
  skipped: dict = dataclasses.field(default_factory=dict)
  cropped: int = 0  # tokenized records with more printed loops than T (outermost kept)
  examples: list = dataclasses.field(default_factory=list)  # "file:line: reason: message"

  def skip(self, reason: str, where: str, message: str) -> None:
    """Counts one skipped record (and keeps the first :data:`MAX_EXAMPLES` as examples)."""
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    if len(self.examples) < MAX_EXAMPLES:
      self.examples.append(f"{where}: {reason}: {message}".splitlines()[0][:300])

  def __add__(self, other: LoopTokenStats) -> LoopTokenStats:
    skipped = collections.Counter(self.skipped)
    skipped.update(other.skipped)
    return LoopTokenStats(
      self.records + other.records,
      self.tokenized + other.tokenized,
      dict(sorted(skipped.items())),
      self.cropped + other.cropped,
      (self.examples + other.examples)[:MAX_EXAMPLES],
    )

  def __radd__(self, other: Any) -> LoopTokenStats:
    if other == 0 or other is None:
      return self
    return NotImplemented

  def to_dict(self) -> dict:
    """Plain JSON dict (stored in the dataset metadata per hardware)."""
    return {
      "records": self.records,
      "tokenized": self.tokenized,
      "skipped": dict(sorted(self.skipped.items())),
      "cropped": self.cropped,
      "examples": list(self.examples),
    }


@dataclasses.dataclass
class FileTokens:
  """Loop tokens of some records of one task file."""

  ok: np.ndarray  # (n,) bool: the record got tokens
  tokens: np.ndarray  # (ok.sum(), T, W) float16, in record order
  stats: LoopTokenStats
  cropped: np.ndarray | None = None  # (ok.sum(),) bool: that record's nest was cropped to T
  reused: int = 0  # records whose tokens came from :class:`PriorTokens`, not a replay


@dataclasses.dataclass
class PriorTokens:
  """Loop tokens of one task already staged for another hardware, to reuse.

  A program's loop tokens depend only on its task's skeleton and its step list, not on the
  hardware that measured it, and TenSet measures the same programs of a task on every hardware
  of a platform: a build of several hardware replays each program once and copies its tokens
  for the other hardware (the same bytes as a replay; tests/data_pipelines check it).

  Attributes:
    workload_key: the task (tokens of another task are never used, whatever the keys).
    path: the staged ``(N, T, W)`` float16 token file of the earlier hardware.
    num_rows: ``N``.
    keys: ``(n,)`` uint64 program keys (``features.program_key``) of this task's rows there.
    rows: ``(n,)`` int64 their rows in ``path``.
    cropped: ``(n,)`` bool: that program's nest was cropped (for the stats).
  """

  workload_key: str
  path: str
  num_rows: int
  keys: np.ndarray
  rows: np.ndarray
  cropped: np.ndarray


def _reason(e: Exception) -> str:
  if isinstance(e, rp.ReplayError):
    return REPLAY_ERROR
  return f"unexpected_{type(e).__name__}"


def _prior_lookup(priors: Sequence[PriorTokens]) -> dict:
  """``{program key: (prior index, row, cropped)}``, the first prior holding a key winning."""
  lookup: dict = {}
  for i, p in enumerate(priors):
    for key, row, crop in zip(p.keys.tolist(), p.rows.tolist(), p.cropped.tolist()):
      lookup.setdefault(key, (i, row, crop))
  return lookup


def _read_prior_rows(priors: Sequence[PriorTokens], picks: list, max_tokens: int) -> np.ndarray:
  """The token rows ``picks`` = [(prior index, row)] of the priors' staged files, in order."""
  picks = np.asarray(picks, np.int64).reshape(-1, 2)
  out = np.empty((len(picks), max_tokens, lt.WIDTH), lt.DTYPE)
  for i in np.unique(picks[:, 0]):
    p = priors[i]
    at = picks[:, 0] == i
    staged = np.memmap(p.path, dtype=lt.DTYPE, mode="r", shape=(p.num_rows, max_tokens, lt.WIDTH))
    out[at] = staged[picks[at, 1]]
    del staged
  return out


def tokens_of_lines(
  skeleton: sk.Skeleton | None,
  lines: Sequence[bytes],
  max_tokens: int,
  where: str,
  line_numbers: Sequence[int],
  no_skeleton_reason: str = "",
  program_keys: Sequence[int] | None = None,
  priors: Sequence[PriorTokens] = (),
) -> FileTokens:
  """Loop tokens of one task's record lines (replay + tokens, failures counted, not raised).

  ``skeleton`` None: every record is skipped as :data:`NO_SKELETON` with the reason given.
  ``priors`` (with ``program_keys``, one per line): tokens of this task's programs already
  staged for other hardware; a record whose program key is there gets those tokens instead of a
  replay (:class:`PriorTokens`). Only programs of *earlier* hardware are reused, never an
  earlier line of the same file, so every hardware's own programs are replayed once each.
  """
  n = len(lines)
  stats = LoopTokenStats(records=n)
  ok = np.zeros(n, bool)
  items = []
  lookup = _prior_lookup(priors) if priors and skeleton is not None else {}
  if lookup and (program_keys is None or len(program_keys) != n):
    raise ValueError(f"{where}: reusing prior tokens needs one program key per line")
  copied: list = []  # per ok record, in order: its tokens come from a prior (else a replay)
  picks: list = []  # (prior index, row) of the copied records, in order
  reused_cropped: list = []
  for k, (line, lineno) in enumerate(zip(lines, line_numbers)):
    at = f"{where}:{int(lineno)}"
    if skeleton is None:
      stats.skip(NO_SKELETON, at, no_skeleton_reason)
      continue
    # Parsed first, hit or not: a line the replay cannot read is skipped the same way whether
    # or not an earlier hardware staged its program.
    try:
      steps = features_lib.json_loads(line)["i"][1][1]
    except (ValueError, KeyError, IndexError, TypeError) as e:
      stats.skip(BAD_RECORD, at, f"{type(e).__name__}: {e}")
      continue
    hit = lookup.get(int(program_keys[k])) if lookup else None
    if hit is not None:
      ok[k] = True
      copied.append(True)
      picks.append(hit[:2])
      reused_cropped.append(hit[2])
      continue
    try:
      item = lt.plan_and_values(rp.replay(skeleton, steps))
    except Exception as e:  # pylint: disable=broad-except
      # Any failure of one record (a replay bug included) must skip that record, counted by
      # reason with an example, never abort a build of millions of records.
      stats.skip(_reason(e), at, f"{type(e).__name__}: {e}")
      continue
    ok[k] = True
    plan, ext = item[0], item[1]
    copied.append(False)
    items.append((item, int(((ext != 1) | plan.always).sum()) > max_tokens))
  replayed = np.zeros((len(items), max_tokens, lt.WIDTH), lt.DTYPE)
  for s in range(0, len(items), _FILL_CHUNK):
    chunk = [it for it, _ in items[s : s + _FILL_CHUNK]]
    replayed[s : s + _FILL_CHUNK] = replay_cache.fill_padded(chunk, max_tokens)
  replay_cropped = np.array([c for _, c in items], bool)
  if picks:
    copied_at = np.array(copied, bool)
    tokens = np.empty((len(copied), max_tokens, lt.WIDTH), lt.DTYPE)
    tokens[~copied_at] = replayed
    tokens[copied_at] = _read_prior_rows(priors, picks, max_tokens)
    cropped = np.empty(len(copied), bool)
    cropped[~copied_at] = replay_cropped
    cropped[copied_at] = reused_cropped
  else:
    tokens, cropped = replayed, replay_cropped
  stats.tokenized = len(copied)
  stats.cropped = int(cropped.sum())
  return FileTokens(ok, tokens, stats, cropped=cropped, reused=len(picks))


class LoopTokenSource:
  """The skeletons of a build and the replay of its task files' records.

  Attributes:
    path: the skeleton collection file.
    tenset_dir: the TenSet root (for error messages).
    max_tokens: ``T``; tokens are ``(T, WIDTH)`` float16.
  """

  def __init__(self, path: str, tenset_dir: str, max_tokens: int = lt.DEFAULT_MAX_TOKENS):
    if max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    self.path = path
    self.tenset_dir = tenset_dir
    self.max_tokens = int(max_tokens)
    self.skeletons = sk.load_collection(path)
    self.failed = sk.load_failed(path)

  def layout(self) -> dict:
    """The dataset metadata entry :data:`schema.LOOP_TOKENS_META` of tokens made here."""
    return {
      "layout_version": lt.LAYOUT_VERSION,
      "max_tokens": self.max_tokens,
      "width": lt.WIDTH,
      "columns": list(lt.COLUMNS),
      "dtype": np.dtype(schema.LOOP_TOKENS_DTYPE).name,
      "skeletons_file": schema.SKELETONS_FILE,
    }

  def check(self, workload_key: str, where: str) -> None:
    """Raises :class:`MissingSkeletonError` when the collection does not know the task."""
    if workload_key not in self.skeletons and workload_key not in self.failed:
      raise MissingSkeletonError(
        f"{self.path}: no skeleton for workload {workload_key} (task file {where}); "
        f"extract the skeletons of this TenSet dir again: "
        f"{extract_hint(self.tenset_dir, self.path)}"
      )

  def check_task_files(self, paths: Sequence[str]) -> list[str | None]:
    """Checks every task file's workload key up front (reads one line per file); returns them
    (None for a file without a well-formed record)."""
    keys = []
    for path in paths:
      first = records_lib.first_record(path)
      keys.append(None if first is None else first.workload_key)
      if first is not None:
        self.check(first.workload_key, os.path.basename(path))
    return keys

  def subset(self, workload_keys: Sequence[str]) -> dict[str, sk.Skeleton]:
    """``{key: skeleton}`` of the given tasks that have one."""
    return {k: self.skeletons[k] for k in workload_keys if k in self.skeletons}

  def tokens(
    self,
    workload_key: str,
    lines: Sequence[bytes],
    where: str,
    line_numbers: Sequence[int],
    program_keys: Sequence[int] | None = None,
    priors: Sequence[PriorTokens] = (),
  ) -> FileTokens:
    """The loop tokens of one task file's record lines (in this process); ``program_keys`` and
    ``priors``: see :func:`tokens_of_lines`.

    Raises:
      MissingSkeletonError: the collection does not know the task.
    """
    self.check(workload_key, where)
    if workload_key not in self.skeletons:
      return tokens_of_lines(
        None, lines, self.max_tokens, where, line_numbers, self.failed[workload_key]
      )
    # A program key hashes the steps only: the same steps in another task replay differently.
    priors = [p for p in priors if p.workload_key == workload_key]
    skeleton = self.skeletons[workload_key]
    try:
      return tokens_of_lines(
        skeleton,
        lines,
        self.max_tokens,
        where,
        line_numbers,
        program_keys=program_keys,
        priors=priors,
      )
    finally:
      # A build reads each task's records in one call per hardware: the replay's memo of this
      # task is not needed after it. Kept, the memos of all the tasks a process has read would
      # grow with the records (bench/README.md, "Build memory").
      rp.drop_cache(skeleton)


__all__ = [
  "MODES",
  "NO_SKELETON",
  "REPLAY_ERROR",
  "BAD_RECORD",
  "MissingSkeletonError",
  "LoopTokenStats",
  "FileTokens",
  "PriorTokens",
  "LoopTokenSource",
  "tokens_of_lines",
  "resolve_skeletons",
  "extract_hint",
]
