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

The arrays of a file (its kept records' step features and loop tokens, ~4 KB per record) do not
travel back: the process that read the file writes them to files named by the file's index in
the caller's folder (:meth:`StagedFile.write_rows`), and only the few bytes per record the
labels need (costs, program keys, line numbers, which records replayed) and the stats come back
through the pool. The caller appends each file's rows to its staging files in file order
(:meth:`StagedFile.move_rows`: a copy inside the kernel, not through the caller), so the main
process's work per record no longer grows with the size of a record.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import itertools
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

  The staged rows are the records :attr:`keep` marks (with loop tokens: those that replayed;
  else every valid record). Once :meth:`write_rows` has run, they are in ``features_file``
  (raw float32 ``(rows, L, E)``) and ``tokens_file`` (raw float16 ``(rows, T, W)``, with loop
  tokens), and ``task.features`` / ``tokens.tokens`` are None: what is left is a few bytes per
  record.
  """

  path: str
  task: records_lib.TaskFile
  tokens: loop_token_source.FileTokens | None
  grew: bool = False
  row_shape: tuple[int, ...] = ()  # (L, E) of a feature row
  token_row_shape: tuple[int, ...] = ()  # (T, W) of a loop-token row
  features_file: str | None = None
  tokens_file: str | None = None

  @property
  def keep(self) -> np.ndarray:
    """``(len(task),)`` bool: the records whose rows are staged."""
    if self.tokens is not None:
      return self.tokens.ok
    return np.ones(len(self.task), bool)

  @property
  def rows(self) -> int:
    """Number of staged rows."""
    return int(self.keep.sum())

  def write_rows(self, features_file: str, tokens_file: str | None) -> None:
    """Writes the staged feature rows (and the loop tokens still in memory) to these files and
    drops the arrays. ``tokens_file`` names the tokens' file even when they were written
    already (a file re-read by the parent keeps its worker's tokens)."""
    feats = np.asarray(self.task.features, dtype=np.float32)
    self.row_shape = tuple(feats.shape[1:])
    keep = self.keep
    _write_array(features_file, feats if keep.all() else feats[keep])
    self.task.features = None
    self.features_file = features_file
    if self.tokens is not None:
      if self.tokens.tokens is not None:
        self.token_row_shape = tuple(self.tokens.tokens.shape[1:])
        _write_array(tokens_file, self.tokens.tokens)
        self.tokens.tokens = None
      self.tokens_file = tokens_file

  def move_rows(self, features_out, tokens_out) -> None:
    """Appends the staged rows (:meth:`write_rows`) to ``features_out`` and ``tokens_out``
    (binary files opened with ``buffering=0``, :func:`append_file`) and deletes their files.

    Raises:
      FileStageError: a file does not hold exactly the rows it should (names the task file).
    """
    files = [(self.features_file, features_out, self.row_shape, np.float32)]
    if self.tokens_file is not None:
      files.append((self.tokens_file, tokens_out, self.token_row_shape, np.float16))
    for path, out, shape, dtype in files:
      size = append_file(out, path)
      want = self.rows * int(np.prod(shape)) * np.dtype(dtype).itemsize
      if size != want:
        raise FileStageError(
          f"{self.path}: {path} holds {size} bytes, not {self.rows} rows of {shape} "
          f"{np.dtype(dtype).name} ({want} bytes)"
        )
      os.remove(path)


def _write_array(path: str, a: np.ndarray) -> None:
  with open(path, "wb") as f:
    np.ascontiguousarray(a).tofile(f)


# Errors of copy_file_range meaning "not between these files" (EBADF: ``out`` was opened for
# appending): copy through this process.
_NO_KERNEL_COPY = {
  errno.EBADF,
  errno.EXDEV,
  errno.ENOSYS,
  errno.EINVAL,
  errno.EOPNOTSUPP,
  errno.ENOTSUP,
}


def append_file(out, path: str) -> int:
  """Appends the bytes of file ``path`` to ``out`` (a binary file opened with ``buffering=0``:
  the copy moves the OS file position); returns their number.

  The copy runs in the kernel (``copy_file_range``: the bytes do not pass through this
  process) where the file system allows, else through a 16 MiB buffer.
  """
  dst = out.fileno()
  with open(path, "rb", buffering=0) as f:
    size = os.fstat(f.fileno()).st_size
    done = 0
    try:
      while done < size:
        n = os.copy_file_range(f.fileno(), dst, size - done)
        if n == 0:
          break
        done += n
    except OSError as e:
      if done or e.errno not in _NO_KERNEL_COPY:
        raise
      while block := f.read(1 << 24):
        view = memoryview(block)
        while view:  # an unbuffered write may write less than it is given
          view = view[out.write(view) :]
        done += len(block)
  if done != size:
    raise OSError(f"{path}: appended {done} of {size} bytes (file changed while copied?)")
  return done


def stage_file(
  path: str,
  hardware: str,
  featurizer: features_lib.Featurizer,
  token_source: loop_token_source.LoopTokenSource | None,
  out: str | None = None,
  priors: Sequence[loop_token_source.PriorTokens] = (),
) -> StagedFile:
  """Reads one task file with ``featurizer`` and, with a token source, makes its loop tokens.

  ``out``: write the staged rows to ``out + ".f32"`` (and ``".f16"``) and drop the arrays
  (:meth:`StagedFile.write_rows`); None keeps them in memory. ``priors``: this task's tokens
  staged for earlier hardware, reused for the same programs
  (:func:`loop_token_source.tokens_of_lines`).

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
        tf.workload_key,
        records_lib.lines_at(path, lines),
        os.path.basename(path),
        lines,
        program_keys=tf.program_keys,
        priors=priors,
      )
    staged = StagedFile(path, tf, tokens, grew=featurizer.vocab.to_json() != before)
    if out is not None and len(tf):
      staged.write_rows(out + ".f32", out + ".f16")
  except FileStageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # One line naming the file, whichever process it happened in (the pool re-raises it).
    raise FileStageError(f"{path}: {type(e).__name__}: {e}") from e
  return staged


# Per worker process: the token source and the featurizer of the current vocabulary snapshot.
_WORKER: dict = {}


def _init_worker(skeletons: str | None, tenset_dir: str, max_tokens: int) -> None:
  _WORKER["source"] = (
    loop_token_source.LoopTokenSource(skeletons, tenset_dir, max_tokens=max_tokens)
    if skeletons
    else None
  )
  _WORKER["featurizers"] = {}


def _work(
  path: str, out: str, hardware: str, platform: str, crop, vocab_json: str, priors
) -> StagedFile:
  cache = _WORKER["featurizers"]
  key = (platform, crop, vocab_json)
  fz = cache.pop(key, None)
  if fz is None:
    cache.clear()  # one snapshot at a time: its step-row cache is what makes reading fast
    vocab = features_lib.Vocabulary.from_json(vocab_json)
    fz = features_lib.Featurizer(platform, crop=crop, vocab=vocab)
  got = stage_file(path, hardware, fz, _WORKER["source"], out, priors)
  if not got.grew:  # a grown featurizer no longer matches its snapshot
    cache[key] = fz
  return got


class FileStager:
  """Stages task files in file order, in ``workers`` processes (1 = in this process); the same
  pool runs the build's other per-item jobs (:meth:`map_ordered`: the shard writing).

  Use as a context manager (it owns the pool). At most ``2 * workers`` files are in flight,
  so memory (and the disk of the per-file row files) is bounded by a few files' arrays
  whatever the record count.
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
    self,
    paths: Sequence[str],
    hardware: str,
    featurizer: features_lib.Featurizer,
    out_dir: str,
    priors: Iterable[Sequence[loop_token_source.PriorTokens]] | None = None,
  ) -> Iterator[StagedFile]:
    """Yields each file of ``paths`` staged, in order, as the one-process read makes it.

    ``priors``: per file of ``paths`` (consumed lazily, in step), the task's loop tokens
    staged for earlier hardware, to reuse (:func:`stage_file`); None: replay every record.

    ``featurizer`` is the shared (growing) featurizer of the platform; it grows as it would
    reading the files one by one in this process. Each file's staged rows are written to
    ``out_dir`` (``<file index>.f32`` / ``.f16``, :meth:`StagedFile.write_rows`) by the process
    that read it; the caller takes them with :meth:`StagedFile.move_rows`. When a file fails,
    or the caller stops early, the files still being read are stopped (the pool is terminated)
    before the error propagates: nothing keeps writing into ``out_dir``.
    """
    outs = [os.path.join(out_dir, f"{i:07d}") for i in range(len(paths))]
    prior_of = iter(priors) if priors is not None else itertools.repeat(())
    if self.workers == 1:
      for path, out, prior in zip(paths, outs, prior_of):
        yield stage_file(path, hardware, featurizer, self.token_source, out, prior)
      return
    pool = self._pool_or_start()
    crop = featurizer.crop
    pending: collections.deque = collections.deque()
    todo = iter(zip(paths, outs, prior_of))
    snapshot = featurizer.vocab.to_json()
    done = False
    try:
      while True:
        while len(pending) < 2 * self.workers:
          path, out, prior = next(todo, (None, None, None))
          if path is None:
            break
          args = (path, out, hardware, featurizer.platform, crop, snapshot, prior)
          pending.append((pool.apply_async(_work, args), featurizer.layout))
        if not pending:
          done = True
          return
        job, layout = pending.popleft()
        got = job.get()
        if got.grew or layout != featurizer.layout:
          got = self._redo(got, hardware, featurizer)
          snapshot = featurizer.vocab.to_json()
        yield got
    finally:
      if not done:
        self.close()

  def _redo(self, got: StagedFile, hardware: str, featurizer) -> StagedFile:
    """Re-reads a worker's file with the parent's featurizer (the one-process result) and
    writes its feature rows over the worker's; the worker's loop tokens, which do not depend
    on the vocabulary, are kept."""
    self.redone += 1
    again = stage_file(got.path, hardware, featurizer, None)
    if not np.array_equal(again.task.line_numbers, got.task.line_numbers):
      raise FileStageError(f"{got.path}: kept other records when read again (file changed?)")
    again.tokens = got.tokens
    again.token_row_shape = got.token_row_shape
    if got.features_file is not None:
      try:
        again.write_rows(got.features_file, got.tokens_file)
      except OSError as e:
        raise FileStageError(f"{got.path}: {type(e).__name__}: {e}") from e
    return again


__all__ = ["FileStageError", "StagedFile", "FileStager", "append_file", "stage_file"]
