"""Reading, featurizing and loop-tokenizing whole task files, in worker processes (no TFDS/JAX).

The expensive part of a build is per task file: parse the records, make TLP's step features
(:func:`records.read_task_file`) and, with loop tokens, replay every kept record
(:mod:`data_pipelines.loop_token_source`). :class:`FileStager` runs that per file, in this
process (``workers=1``) or in a ``spawn`` pool, and hands the results back **in file order**.

The one thing that is not per file is the step vocabulary: it grows in file order (a new step
kind widens every feature vector, a new string token gets the next id), so a file's features
depend on every file before it. Workers therefore featurize with a *snapshot* of the parent's
vocabulary, and the parent, taking results in file order, keeps a result only when it is what
the one-process build would have made:

* the file added nothing to the snapshot (its steps use only known kinds and tokens, whose ids
  never change: the vocabulary is append-only), and
* the snapshot's one-hot width is the parent's current one (no kind added since).

Otherwise the parent re-reads that file itself with its own featurizer (exactly the
one-process read; the loop tokens, which do not depend on the vocabulary, are kept) and later
submissions carry the grown vocabulary. On TenSet the vocabulary settles in the first files,
so almost every file is taken from a worker; the output is the same bytes for any worker count.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from data_pipelines import loop_token_source
from tlp_jax.core import features as features_lib
from tlp_jax.core import records as records_lib

T = TypeVar("T")
R = TypeVar("R")
_END = object()


class FileStageError(RuntimeError):
  """Reading one task file failed (the message starts with the file's path)."""


@dataclasses.dataclass
class StagedFile:
  """One task file read, featurized and (with loop tokens) replayed.

  ``grew``: the featurizer's vocabulary grew while reading it (see the module docstring).
  """

  path: str
  task: records_lib.TaskFile
  tokens: loop_token_source.FileTokens | None
  grew: bool = False


def stage_file(
  path: str,
  hardware: str,
  featurizer: features_lib.Featurizer,
  token_source: loop_token_source.LoopTokenSource | None,
) -> StagedFile:
  """Reads one task file with ``featurizer`` and, with a token source, makes its loop tokens.

  Raises:
    FileStageError: anything failed; the message names the file.
  """
  before = featurizer.vocab.to_json()
  try:
    tf = records_lib.read_task_file(path, hardware=hardware, featurizer=featurizer)
    tokens = None
    if token_source is not None and len(tf):
      lines = tf.line_numbers
      tokens = token_source.tokens(
        tf.workload_key, records_lib.lines_at(path, lines), os.path.basename(path), lines
      )
  except FileStageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # One line naming the file, whichever process it happened in (the pool re-raises it).
    raise FileStageError(f"{path}: {type(e).__name__}: {e}") from e
  return StagedFile(path, tf, tokens, grew=featurizer.vocab.to_json() != before)


# Per worker process: the token source and the featurizer of the current vocabulary snapshot.
_WORKER: dict = {}


def _init_worker(skeletons: str | None, tenset_dir: str, max_tokens: int) -> None:
  _WORKER["source"] = (
    loop_token_source.LoopTokenSource(skeletons, tenset_dir, max_tokens=max_tokens)
    if skeletons
    else None
  )
  _WORKER["featurizers"] = {}


def _work(path: str, hardware: str, platform: str, crop, vocab_json: str) -> StagedFile:
  cache = _WORKER["featurizers"]
  key = (platform, crop, vocab_json)
  fz = cache.pop(key, None)
  if fz is None:
    cache.clear()  # one snapshot at a time: its step-row cache is what makes reading fast
    vocab = features_lib.Vocabulary.from_json(vocab_json)
    fz = features_lib.Featurizer(platform, crop=crop, vocab=vocab)
  out = stage_file(path, hardware, fz, _WORKER["source"])
  if not out.grew:  # a grown featurizer no longer matches its snapshot
    cache[key] = fz
  return out


class FileStager:
  """Stages task files in file order, in ``workers`` processes (1 = in this process); the same
  pool runs the build's other per-item jobs (:meth:`map_ordered`: the shard writing).

  Use as a context manager (it owns the pool). At most ``2 * workers`` files are in flight,
  so memory is bounded by a few files' arrays whatever the record count.
  """

  def __init__(
    self, workers: int = 1, token_source: loop_token_source.LoopTokenSource | None = None
  ):
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}")
    self.workers = int(workers)
    self.token_source = token_source
    self._pool = None
    self.redone = 0  # files a worker read under an outdated vocabulary, re-read here

  def __enter__(self) -> FileStager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Stops the worker processes (if any)."""
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()
      self._pool = None

  def _pool_or_start(self):
    if self._pool is None:
      src = self.token_source
      # spawn, not fork: the parent may run threads (TFDS, JAX in tests) that fork would copy
      # mid-operation.
      ctx = multiprocessing.get_context("spawn")
      init = (src.path, src.tenset_dir, src.max_tokens) if src is not None else (None, "", 0)
      self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=init)
    return self._pool

  def map_ordered(self, fn: Callable[[T], R], jobs: Iterable[T]) -> Iterator[R]:
    """Yields ``fn(job)`` for each job, in job order, run by the workers (1: in this process).

    ``fn`` must be a module-level function (it is pickled by reference to the ``spawn``
    workers). At most ``2 * workers`` jobs are in flight. When a job fails, or the caller stops
    early, the jobs still running are stopped (the pool is terminated; a later call starts a
    new one) before the error propagates: nothing keeps writing behind a failed build.
    """
    if self.workers == 1:
      for job in jobs:
        yield fn(job)
      return
    pool = self._pool_or_start()
    pending: collections.deque = collections.deque()
    todo = iter(jobs)
    done = False
    try:
      while True:
        while len(pending) < 2 * self.workers:
          job = next(todo, _END)
          if job is _END:
            break
          pending.append(pool.apply_async(fn, (job,)))
        if not pending:
          done = True
          return
        yield pending.popleft().get()
    finally:
      if not done:
        self.close()

  def stage(
    self, paths: Sequence[str], hardware: str, featurizer: features_lib.Featurizer
  ) -> Iterator[StagedFile]:
    """Yields each file of ``paths`` staged, in order, as the one-process read makes it.

    ``featurizer`` is the shared (growing) featurizer of the platform; it grows as it would
    reading the files one by one in this process.
    """
    if self.workers == 1:
      for path in paths:
        yield stage_file(path, hardware, featurizer, self.token_source)
      return
    pool = self._pool_or_start()
    crop = featurizer.crop
    pending: collections.deque = collections.deque()
    todo = iter(paths)
    snapshot = featurizer.vocab.to_json()
    while True:
      while len(pending) < 2 * self.workers:
        path = next(todo, None)
        if path is None:
          break
        job = pool.apply_async(_work, (path, hardware, featurizer.platform, crop, snapshot))
        pending.append((path, job, featurizer.layout))
      if not pending:
        return
      path, job, layout = pending.popleft()
      got = job.get()
      if got.grew or layout != featurizer.layout:
        got = self._redo(got, hardware, featurizer)
        snapshot = featurizer.vocab.to_json()
      yield got

  def _redo(self, got: StagedFile, hardware: str, featurizer) -> StagedFile:
    """Re-reads a worker's file with the parent's featurizer (the one-process result)."""
    self.redone += 1
    again = stage_file(got.path, hardware, featurizer, None)
    if not np.array_equal(again.task.line_numbers, got.task.line_numbers):
      raise FileStageError(f"{got.path}: kept other records when read again (file changed?)")
    again.tokens = got.tokens
    return again


__all__ = ["FileStageError", "StagedFile", "FileStager", "stage_file"]
