"""Training batches put on the devices ahead of the step that reads them
(``config.prefetch_to_device``, for ``data_placement="host"`` and ``"stream"``).

Without it each step is handed NumPy arrays, and ``pmap`` copies them to the devices while it
dispatches the step, so the training thread waits for its own batch's transfer every step. With
it the batches of the next ``size`` steps are already split over the local devices (pmap's
``(devices, per_device, ...)`` layout, ``data.shard_to_devices``) while the step runs; JAX's
dispatch is asynchronous, so the device computes step ``s`` while the host gathers and copies
step ``s + 1``. The batches and their order are the ones the step would have been handed, so
training is bit for bit the same as without prefetch.

Two ways to fill the look-ahead, as ``flax.jax_utils.prefetch_to_device`` does it or in a thread:

* inline (``thread=False``): asking for step ``s`` first fetches and puts step ``s + size - 1``,
  in the training thread; nothing runs concurrently with the caller but JAX's own dispatch;
* ``thread=True``: a background thread fetches and puts up to ``size`` batches ahead, so the
  gather and the copy overlap the training thread's own work too.

A streamed run checkpoints its grain iterator's state (``checkpoints.save_checkpoint``). The
iterator has run ahead by the look-ahead, so its live state is not the one of the step being
saved: the prefetcher records the iterator's state after each batch it fetches and hands the
checkpoint the state after the last batch the training loop took (``get_state``).
"""

from __future__ import annotations

import collections
import json
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tlp_jax.train import data

# How often (seconds) a waiting producer thread looks whether it should stop.
_POLL_S = 0.1


class DevicePrefetch:
  """The device batches of ``steps`` in order, each put on the devices ahead of its step.

  Args:
    fetch: ``step -> host batch`` (NumPy arrays laid out ``(local_devices, per_device, ...)``),
      called once per step, in order.
    steps: the steps, consecutive (``range(first_step, total_steps)``).
    devices: the local devices of the pmapped step, in its order.
    size: batches on the devices ahead of the step (>= 1).
    snapshot: ``() -> state`` (JSON-serialisable) of the source after each ``fetch``, for
      ``get_state``; None when the source has no state to checkpoint.
    thread: fill the look-ahead from a background thread instead of inline.
  """

  def __init__(
    self,
    fetch: Callable[[int], tuple[np.ndarray, ...]],
    steps: range,
    devices: Sequence[Any],
    size: int,
    snapshot: Callable[[], Any] | None = None,
    thread: bool = False,
  ):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    if steps.step != 1:
      raise ValueError(f"steps must be consecutive, got {steps}")
    self._fetch, self._steps, self._devices = fetch, steps, list(devices)
    self._size, self._snapshot = size, snapshot
    self._state = snapshot() if snapshot is not None else None
    self._next = steps.start  # the next step to fetch
    self._taken = steps.start  # the next step the caller may take
    self._inline: collections.deque = collections.deque()
    self._thread = None
    if thread:
      self._queue: queue.Queue = queue.Queue(maxsize=size)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._produce, name="device-prefetch", daemon=True)
      self._thread.start()

  def _one(self) -> tuple[int, tuple[Any, ...], Any]:
    """Fetches and puts the next step's batch: ``(step, device batch, source state after it)``."""
    step = self._next
    batch = data.shard_to_devices(self._fetch(step), self._devices)
    state = self._snapshot() if self._snapshot is not None else None
    self._next += 1
    return step, batch, state

  def _produce(self) -> None:
    try:
      while self._next < self._steps.stop and not self._stop.is_set():
        item = self._one()
        while not self._put(item):
          if self._stop.is_set():
            return
    except BaseException as e:  # handed to the training thread, which raises it
      self._put_final(e)

  def _put(self, item: Any) -> bool:
    try:
      self._queue.put(item, timeout=_POLL_S)
      return True
    except queue.Full:
      return False

  def _put_final(self, error: BaseException) -> None:
    while not self._stop.is_set() and not self._put(error):
      pass

  def next_batch(self, step: int) -> tuple[Any, ...]:
    """The device batch of ``step``, the next step of ``steps``.

    Raises:
      RuntimeError: ``step`` is not the next step, or ``steps`` has ended.
      Whatever ``fetch`` raised for this step or one ahead of it.
    """
    if step != self._taken or step >= self._steps.stop:
      raise RuntimeError(
        f"device prefetch asked for step {step}; its next step is {self._taken} of {self._steps}"
      )
    if self._thread is not None:
      item = self._queue.get()
      if isinstance(item, BaseException):
        raise item
    else:
      # Fill up to ``size`` batches on the devices (this one included), then take this one.
      while self._next < min(step + self._size, self._steps.stop):
        self._inline.append(self._one())
      item = self._inline.popleft()
    got, batch, self._state = item
    if got != step:  # cannot happen: steps are fetched in order; a guard against a broken source
      raise RuntimeError(f"device prefetch yielded step {got} for step {step}")
    self._taken += 1
    return batch

  def get_state(self) -> bytes:
    """The source's state after the last batch ``next_batch`` returned, as JSON bytes.

    This is what a checkpoint saves for the steps trained so far: grain's Orbax handler
    (``grain.checkpoint.CheckpointSave``) writes ``get_state()`` of an iterator that is not a
    grain ``DatasetIterator`` as these bytes, and restores them into the grain iterator itself.
    """
    if self._snapshot is None:
      raise RuntimeError("this prefetch's source has no state")
    return json.dumps(self._state, indent=4).encode()

  def close(self) -> None:
    """Stops the background thread (if any) and drops the batches fetched ahead."""
    if self._thread is not None:
      self._stop.set()
      while self._thread.is_alive():
        try:  # unblock a producer waiting on a full queue
          self._queue.get(timeout=_POLL_S)
        except queue.Empty:
          pass
      self._thread.join()
      self._thread = None
    self._inline.clear()
