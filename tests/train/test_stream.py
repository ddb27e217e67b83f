"""tlp_jax.train.stream: the grain pipeline of data_placement="stream" feeds host placement's
batches, passes memory-mapped arrays to its workers by file, and resumes from its saved state."""

import logging
import math
import os
import pickle
import shutil
import threading
import types

import jax
import numpy as np
import pytest

from tlp_jax.train import checkpoints, data, loop, stream


def _split(n=37, seed=0, tasks=6):
  rng = np.random.default_rng(seed)
  return data.HeadArrays(
    features=rng.standard_normal((n, 3, 2)).astype(np.float32),
    scores=rng.random((n, 2), np.float32),
    mask=rng.random((n, 2)) > 0.2,
    task_index=rng.integers(0, tasks, n).astype(np.int32),
    loop_tokens=rng.standard_normal((n, 2, 24)).astype(np.float16),
  )


def _host_batches(split, layout, seed, steps_per_epoch, steps, by_task):
  """Host placement's batches of ``steps`` (the loop's own code path)."""
  out = {}
  for step in steps:
    epoch, in_epoch = divmod(step, steps_per_epoch)
    order, valid = data.epoch_order(
      seed, epoch, split.size, steps_per_epoch, layout.global_batch,
      split.task_index if by_task else None,
    )  # fmt: skip
    sl = layout.local_slice(in_epoch)
    out[step] = data.host_batch(split, order[sl], valid[sl], layout)
  return out


@pytest.mark.parametrize("by_task", [True, False])
def test_each_process_streams_its_rows_of_host_placements_batches(by_task):
  split = _split()
  steps_per_epoch, total = 5, 12  # 37 rows, global batch 8: the last batch of an epoch is padded
  shares = []
  for process in (0, 1):
    layout = data.BatchLayout(8, 4, 2, process)  # 2 processes x 2 devices x 2 rows
    want = _host_batches(split, layout, 7, steps_per_epoch, range(3, total), by_task)
    ds = stream.pipeline(
      split, layout, seed=7, steps_per_epoch=steps_per_epoch, total_steps=total,
      by_task=by_task, first_step=3, num_workers=0, read_threads=2, prefetch_batches=3,
    )  # fmt: skip
    it = iter(ds)
    got = [stream.next_batch(it, step) for step in range(3, total)]
    for step, batch in zip(range(3, total), got):
      assert len(batch) == len(want[step]) == 4
      for a, b in zip(batch, want[step]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="ended before step 12"):
      stream.next_batch(it, total)
    shares.append(got)
  # The two processes' shares, stacked over their devices, are the whole global batch.
  whole = _host_batches(
    split, data.BatchLayout(8, 4, 4, 0), 7, steps_per_epoch, range(3, total), by_task
  )
  for i, step in enumerate(range(3, total)):
    for k in range(4):
      np.testing.assert_array_equal(
        np.concatenate([shares[0][i][k], shares[1][i][k]]), whole[step][k]
      )


def test_a_stream_at_another_step_is_an_error():
  split = _split()
  ds = stream.pipeline(
    split, data.BatchLayout(8, 1, 1, 0), seed=0, steps_per_epoch=5, total_steps=10,
    by_task=False, first_step=2, num_workers=0, read_threads=0, prefetch_batches=0,
  )  # fmt: skip
  with pytest.raises(RuntimeError, match="batch of step 2 where the run is at step 0"):
    stream.next_batch(iter(ds), 0)


def test_memory_mapped_arrays_travel_to_workers_by_file(tmp_path):
  split = _split(n=400)
  mapped = {}
  for name in ("features", "loop_tokens"):
    path = str(tmp_path / f"{name}.npy")
    np.save(path, getattr(split, name))
    # As data.select_heads keeps them: a contiguous view of the loader's read-only memmap.
    mapped[name] = np.ascontiguousarray(np.load(path, mmap_mode="r"))
  on_disk = data.HeadArrays(**dict(vars(split), **mapped))
  # A row slice starts inside the file: its offset must be carried too.
  sliced = data.HeadArrays(**{k: v[100:] for k, v in vars(on_disk).items()})
  layout = data.BatchLayout(16, 1, 1, 0)
  for arrays in (on_disk, sliced):
    fn = stream.StepBatch(
      arrays, layout, seed=1, steps_per_epoch=-(-arrays.size // 16), by_task=True
    )
    blob = pickle.dumps(fn)
    in_memory = sum(getattr(arrays, k).nbytes for k in ("scores", "mask", "task_index"))
    assert len(blob) < in_memory + 4096  # the mapped arrays are not in it
    again = pickle.loads(blob)
    assert isinstance(again.split.features.base, np.memmap)
    for step in (0, 3, 7):
      for a, b in zip(fn(step), again(step)):
        np.testing.assert_array_equal(a, b)


def test_stream_trains_like_host_and_resumes_from_its_saved_iterator_state(
  new_test_config, tmp_path, monkeypatch, caplog
):
  devices = jax.devices()[:2]

  def config_for(placement, workers=0):
    config = new_test_config()
    config.num_epochs, config.data_placement = 1, placement
    config.stream.num_workers = workers
    return config

  host = loop.train_and_evaluate(config_for("host"), str(tmp_path / "host"), devices=devices)
  steps = int(host.state.step)
  assert steps > 20  # checkpoints at steps 10 and 20 (configs/test.py), then the epoch's end

  # The streamed run (2 grain worker processes) dies at step 13, after the checkpoint of step 10.
  real_next = stream.next_batch

  def dies_at_13(iterator, step):
    if step == 13:
      raise KeyboardInterrupt("killed")
    return real_next(iterator, step)

  killed = str(tmp_path / "killed")
  monkeypatch.setattr(stream, "next_batch", dies_at_13)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config_for("stream", 2), killed, devices=devices)
  monkeypatch.setattr(stream, "next_batch", real_next)
  latest = os.path.join(killed, "checkpoints", "latest")
  assert sorted(os.listdir(latest)) == ["10"]
  assert "process_0-of-1.json" in os.listdir(os.path.join(latest, "10", "data"))
  other_workers = str(tmp_path / "other_workers")
  shutil.copytree(killed, other_workers)

  for workdir, workers, log in (
    (killed, 2, "restored its iterator state at step 10"),
    # Another number of workers cannot read that state: a new pipeline starts at step 10.
    (other_workers, 0, "with 2 grain worker(s), now 0"),
  ):
    caplog.clear()
    with caplog.at_level(logging.INFO):
      resumed = loop.train_and_evaluate(config_for("stream", workers), workdir, devices=devices)
    assert log in caplog.text
    assert int(resumed.state.step) == steps
    # The same batches in the same order: the same parameters, bit for bit.
    for a, b in zip(
      jax.tree_util.tree_leaves(resumed.state.params), jax.tree_util.tree_leaves(host.state.params)
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert math.isclose(resumed.validation["val_loss"], host.validation["val_loss"])


def _record_iterators(monkeypatch):
  """Patches ``stream.pipeline``: returns the list of the iterators the loop opens from it, each
  as ``{"closed": bool}``."""
  opened = []
  real_pipeline = stream.pipeline

  class Recorded:
    def __init__(self, ds):
      self.ds = ds

    def __iter__(self):
      it, record = iter(self.ds), {"closed": False}
      real_close = it.close

      def close():
        record["closed"] = True
        real_close()

      it.close = close
      opened.append(record)
      return it

  monkeypatch.setattr(stream, "pipeline", lambda *a, **k: Recorded(real_pipeline(*a, **k)))
  return opened


def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "device-prefetch" and t.is_alive()]


def test_a_run_failing_before_its_first_step_leaves_no_input_thread_or_iterator_open(
  new_test_config, tmp_path, monkeypatch
):
  assert not _prefetch_threads()
  opened = _record_iterators(monkeypatch)

  def broken(*args, **kwargs):
    raise OSError("no space left for the metrics")

  monkeypatch.setattr(loop.writer_lib, "MetricWriter", broken)
  config = new_test_config()
  config.data_placement, config.prefetch_to_device = "stream", 2
  with pytest.raises(OSError, match="no space left"):
    loop.train_and_evaluate(config, str(tmp_path / "wd"), devices=jax.devices()[:2])
  assert all(r["closed"] for r in opened), opened
  assert not _prefetch_threads()


def test_a_failed_iterator_restore_closes_the_iterator_it_opened(monkeypatch):
  opened = _record_iterators(monkeypatch)

  def corrupt(manager, step, iterator):
    raise ValueError("unreadable iterator state")

  monkeypatch.setattr(checkpoints, "restore_data_iterator", corrupt)
  config = types.SimpleNamespace(
    seed=0,
    batch_order="random",
    stream=types.SimpleNamespace(num_workers=0, read_threads=1, prefetch_batches=2),
  )
  layout = data.BatchLayout(8, 2, 2, 0)
  meta = {"stream_first_step": 0, "stream_workers": 0}
  with pytest.raises(ValueError, match="unreadable iterator state"):
    loop._open_stream(config, _split(), layout, 5, 10, None, meta, 5)
  assert opened == [{"closed": True}]


def test_auto_placement_streams_a_training_set_over_the_device_budget(
  new_test_config, tmp_path, caplog
):
  """Over the budget, "auto" streams (measured fastest off the device, docs/TRAINING.md): the
  run logs it and its latest checkpoint holds the grain iterator's state."""
  config = new_test_config()
  config.num_epochs, config.data_placement, config.device_data_max_bytes = 1, "auto", "1"
  with caplog.at_level(logging.INFO):
    loop.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert "data placement auto: stream" in caplog.text
  latest = os.path.join(str(tmp_path / "run"), "checkpoints", "latest")
  steps = os.listdir(latest)
  assert steps
  for step in steps:
    assert "process_0-of-1.json" in os.listdir(os.path.join(latest, step, "data"))
