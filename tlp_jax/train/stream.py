"""The streamed input path (``data_placement="stream"``): a grain pipeline of training batches.

For training sets that do not fit on the device: the batches of host placement (the same rows,
in the same order, laid out the same way), gathered ahead of the step by grain, in background
threads of the training process or in grain worker processes, and resumable from its own saved
iterator state.

* One element of the pipeline is one process's share of one global training step:
  ``(step, x, scores, mask, task_index)``, made by ``data.epoch_order`` (the epoch's row order),
  ``BatchLayout.local_slice`` (this process's rows of the global batch) and ``data.host_batch``
  (the gather), exactly as host placement makes it, so both train the same parameters. The
  dataset is ``MapDataset.range(first_step, total_steps).map(StepBatch)``: random access by
  step, deterministic whatever the number of threads or workers.
* Multi-host: every process runs its own pipeline over its own rows of each global batch (host
  placement's split), so no process reads another's rows; grain's per-process iterator state
  (``process_<i>-of-<n>.json``) goes into each checkpoint (``checkpoints.save_checkpoint``).
* Worker processes (``stream.num_workers``) are spawned by grain and receive the pipeline
  pickled: arrays memory-mapped from the dataset's array cache (``loader.load_arrays``) travel as
  a reference to their file and are mapped again in the worker, never copied; arrays held in
  memory are copied into every worker (a warning says how much).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import numpy as np

from tlp_jax.train import data

# In-memory arrays above this size copied into every worker process are worth a warning.
_WORKER_COPY_WARN_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class _MappedArray:
  """A C-contiguous array that lives in a memory-mapped file, as pickled for a worker."""

  filename: str
  offset: int
  dtype: str
  shape: tuple[int, ...]

  def open(self) -> np.ndarray:
    if not self.shape or 0 in self.shape:
      return np.zeros(self.shape, self.dtype)
    return np.asarray(
      np.memmap(self.filename, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
    )


def _mapped(a: np.ndarray | None) -> _MappedArray | None:
  """``a``'s file and position when it is a C-contiguous view of an ``np.memmap``, else None."""
  if a is None or not a.flags.c_contiguous:
    return None
  base = a
  while base is not None and not isinstance(base, np.memmap):
    base = getattr(base, "base", None)
  if base is None or getattr(base, "filename", None) is None or not base.flags.c_contiguous:
    return None
  start = a.__array_interface__["data"][0] - base.__array_interface__["data"][0]
  if start < 0 or start + a.nbytes > base.nbytes:
    return None
  return _MappedArray(str(base.filename), int(base.offset) + int(start), a.dtype.str, a.shape)


class StepBatch:
  """``step -> (step, x, scores, mask, task_index)``: this process's rows of the global batch of
  training step ``step`` (counted over the whole run), as ``data.host_batch`` gathers them.

  The epoch's row order (``data.epoch_order``) is computed once per epoch and process (or worker)
  and kept while the epoch lasts.
  """

  def __init__(
    self,
    split: data.HeadArrays,
    layout: data.BatchLayout,
    seed: int,
    steps_per_epoch: int,
    by_task: bool,
  ):
    self.split = split
    self.layout = layout
    self.seed = seed
    self.steps_per_epoch = steps_per_epoch
    self.by_task = by_task
    self._lock = threading.Lock()
    self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

  def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    # Reader threads share the cache: one computes an epoch's order, the others wait for it.
    with self._lock:
      if self._epoch is None or self._epoch[0] != epoch:
        order, valid = data.epoch_order(
          self.seed,
          epoch,
          self.split.size,
          self.steps_per_epoch,
          self.layout.global_batch,
          self.split.task_index if self.by_task else None,
        )
        self._epoch = (epoch, order, valid)
      return self._epoch[1], self._epoch[2]

  def __call__(self, step: Any) -> tuple[np.ndarray, ...]:
    step = int(step)
    epoch, in_epoch = divmod(step, self.steps_per_epoch)
    order, valid = self._order(epoch)
    sl = self.layout.local_slice(in_epoch)
    return (np.int64(step),) + data.host_batch(self.split, order[sl], valid[sl], self.layout)

  def __getstate__(self) -> dict[str, Any]:
    arrays, copied = {}, 0
    for field in dataclasses.fields(self.split):
      a = getattr(self.split, field.name)
      ref = _mapped(a)
      arrays[field.name] = ref if ref is not None else a
      if ref is None and a is not None:
        copied += a.nbytes
    if copied > _WORKER_COPY_WARN_BYTES:
      logging.warning(
        "stream: %.2f GiB of training arrays are held in memory, not memory-mapped, and are "
        "copied into every grain worker process; use fewer workers (config.stream.num_workers) "
        "or a dataset whose arrays are all memory-mapped",
        copied / 2**30,
      )
    state = dict(self.__dict__, split=arrays, _epoch=None)
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    arrays = {
      k: v.open() if isinstance(v, _MappedArray) else v for k, v in state.pop("split").items()
    }
    self.__dict__.update(state, split=data.HeadArrays(**arrays), _lock=threading.Lock())


def pipeline(
  split: data.HeadArrays,
  layout: data.BatchLayout,
  *,
  seed: int,
  steps_per_epoch: int,
  total_steps: int,
  by_task: bool,
  first_step: int,
  num_workers: int,
  read_threads: int,
  prefetch_batches: int,
) -> Any:
  """The grain ``IterDataset`` of this process's batches of steps ``first_step..total_steps-1``.

  ``read_threads`` threads gather batches in each process (0: the caller's thread, when it asks
  for the next one); ``prefetch_batches`` batches are gathered ahead per process;
  ``num_workers`` grain worker processes (0: none, the training process gathers), each working on
  every ``num_workers``-th step.
  """
  import grain  # only the streamed path needs grain
  from absl import flags

  if not flags.FLAGS.is_parsed():
    # grain reads its settings from absl flags; a caller without absl's app.run (tests, a
    # notebook) has parsed none, and grain's threads would fail reading them: use the defaults.
    flags.FLAGS.mark_as_parsed()
  if not 0 <= first_step <= total_steps:
    raise ValueError(f"first_step {first_step} outside the run's {total_steps} steps")
  fn = StepBatch(split, layout, seed, steps_per_epoch, by_task)
  ds = grain.MapDataset.range(first_step, total_steps).map(fn)
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
  )
  if num_workers > 0:
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=1)
    )
  return ds


def next_batch(iterator: Any, step: int) -> tuple[np.ndarray, ...]:
  """The batch of ``step`` from a ``pipeline`` iterator, checking that it is that step's.

  Raises:
    RuntimeError: the iterator is at another step (a restored state that does not belong to
      this run's pipeline), or it ended early.
  """
  try:
    got, *batch = next(iterator)
  except StopIteration:
    raise RuntimeError(f"the input stream ended before step {step}") from None
  if int(got) != step:
    raise RuntimeError(
      f"the input stream yielded the batch of step {int(got)} where the run is at step {step}; "
      "its restored iterator state does not match the run"
    )
  return tuple(batch)
