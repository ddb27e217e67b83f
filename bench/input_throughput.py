r"""The training input path's own ceiling, samples/s: host gather vs grain stream, no model step.

Feeds the batches a training run would feed (``tlp_jax.train.data``: ``epoch_order``,
``BatchLayout``, ``host_batch``) as fast as they can be made, over memory-mapped arrays of the
layout ``loader.load_arrays`` returns:

* ``host``: ``data_placement="host"``, each batch gathered in the training thread;
* ``stream``: ``data_placement="stream"`` (``tlp_jax.train.stream``), grain reading ahead with
  ``--read_threads`` threads in each of 0 / 2 / 4 / 8 worker processes (``--workers``).

The arrays are synthetic unless ``--data_dir`` names a built dataset: ``--rows`` random rows of
the default build's shapes (step features (25, 22) float32, loop tokens (40, 24) float16, so
the model's input is (65, 46) float32, 12 KB a row), written once as ``.npy`` files and read
back memory-mapped, their pages warmed first (the page cache, not the disk, is measured). Each
variant is timed over ``--steps`` batches after ``--warmup_steps``; with ``--to_device`` every
batch is also copied to the local JAX devices (the host-to-device link counts too).

    python -m bench.input_throughput [--rows 200000] [--workers 0,2,4,8] [--to_device]

On a GPU machine (grain is not in its image: carry the wheels of grain and portpicker, see
docs/TRAINING.md), one command writes the JSON under $OUT:

    python -m bench.input_throughput --to_device --out $OUT/input_throughput_gpu.json
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

from bench import common
from tlp_jax.core import loop_tokens as loop_tokens_lib
from tlp_jax.train import data, stream

_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_ROWS = flags.DEFINE_integer("rows", 200_000, "Synthetic training rows (without --data_dir).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "A built dataset to read instead (its train).")
_DATASET = flags.DEFINE_string("dataset", "epyc-9004", "The built config under --data_dir.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Global batch (config.batch_size).")
_DEVICES = flags.DEFINE_integer(
  "devices", 0, "Local devices the batch is split over (0: jax.local_device_count())."
)
_ORDER = flags.DEFINE_enum("batch_order", "by_task", ["by_task", "random"], "config.batch_order.")
_STEPS = flags.DEFINE_integer("steps", 300, "Timed batches per variant.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 20, "Untimed batches first (workers start).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2", "4", "8"], "stream.num_workers values.")
_THREADS = flags.DEFINE_integer("read_threads", 2, "stream.read_threads.")
_PREFETCH = flags.DEFINE_integer("prefetch_batches", 8, "stream.prefetch_batches.")
_TO_DEVICE = flags.DEFINE_bool("to_device", False, "Copy every batch to the local devices.")
_SCRATCH = flags.DEFINE_string("scratch_dir", "", "Where the synthetic arrays go (default tmp).")
_OUT = flags.DEFINE_string("out", None, "JSON (default results/input_throughput-<cpu>.json).")

STEP_CROP = (25, 22)  # the default model.seq_len, feature_dim


def synthetic_split(rows: int, folder: str, seed: int = 0) -> data.HeadArrays:
  """``rows`` random rows of the default build's arrays, saved in ``folder`` and memory-mapped
  back (tasks of ~100 programs, as TenSet's)."""
  rng = np.random.default_rng(seed)
  shapes = {
    "features": ((rows,) + STEP_CROP, np.float32),
    "loop_tokens": ((rows, loop_tokens_lib.DEFAULT_MAX_TOKENS, loop_tokens_lib.WIDTH), np.float16),
  }
  arrays: dict[str, Any] = {}
  chunk = 50_000
  for name, (shape, dtype) in shapes.items():
    path = os.path.join(folder, f"{name}.npy")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    for start in range(0, rows, chunk):
      n = min(chunk, rows - start)
      out[start : start + n] = rng.standard_normal((n,) + shape[1:], np.float32).astype(dtype)
    out.flush()
    del out
    arrays[name] = np.load(path, mmap_mode="r")
  return data.HeadArrays(
    features=arrays["features"],
    loop_tokens=arrays["loop_tokens"],
    scores=rng.random((rows, 1), np.float32),
    mask=np.ones((rows, 1), bool),
    task_index=np.sort(rng.integers(0, max(rows // 100, 1), rows)).astype(np.int32),
  )


def dataset_split(data_dir: str, name: str) -> data.HeadArrays:
  """The training split of a built dataset, every head, loop tokens when it has them."""
  from data_pipelines import loader

  ds = loader.load_arrays(data_dir, name)
  tokens = data.reads_loop_tokens("auto", ds)
  return data.select_heads(ds.train, list(range(len(ds.hardware))), tokens)


def warm_page_cache(split: data.HeadArrays) -> None:
  for a in split.arrays:
    if isinstance(getattr(a, "base", None), np.memmap) or isinstance(a, np.memmap):
      for start in range(0, a.shape[0], 65_536):
        np.asarray(a[start : start + 65_536]).sum()


class Feeder:
  """Copies each batch to the local devices as pmap's inputs (``--to_device``), or nothing."""

  def __init__(self, enabled: bool, layout: data.BatchLayout):
    self.enabled = enabled
    if enabled:
      import jax

      self.jax = jax
      self.devices = jax.local_devices()[: layout.local_devices]

  def __call__(self, batch: tuple[np.ndarray, ...]) -> None:
    if not self.enabled:
      return
    out = [self.jax.device_put_sharded(list(a), self.devices) for a in batch]
    self.jax.block_until_ready(out)


def time_host(split, layout, steps_per_epoch, by_task, feed, warmup, steps) -> dict[str, Any]:
  """Host placement's loop without the step: epoch order, then gather per step."""

  def batches():
    epoch = 0
    while True:
      order, valid = data.epoch_order(
        0,
        epoch,
        split.size,
        steps_per_epoch,
        layout.global_batch,
        split.task_index if by_task else None,
      )
      for s in range(steps_per_epoch):
        sl = layout.local_slice(s)
        yield data.host_batch(split, order[sl], valid[sl], layout)
      epoch += 1

  it = batches()
  for _ in range(warmup):
    feed(next(it))
  return _timed(lambda: feed(next(it)), steps, layout)


def time_stream(
  split, layout, steps_per_epoch, by_task, feed, warmup, steps, workers
) -> dict[str, Any]:
  """The grain pipeline of ``data_placement="stream"``, iterated as the loop does."""
  total = warmup + steps
  t0 = time.perf_counter()
  ds = stream.pipeline(
    split,
    layout,
    seed=0,
    steps_per_epoch=steps_per_epoch,
    total_steps=total,
    by_task=by_task,
    first_step=0,
    num_workers=workers,
    read_threads=_THREADS.value,
    prefetch_batches=_PREFETCH.value,
  )
  it = iter(ds)
  step = 0
  feed(stream.next_batch(it, step))
  first_batch_s = time.perf_counter() - t0
  for step in range(1, warmup):
    feed(stream.next_batch(it, step))
  counter = iter(range(warmup, total))
  result = _timed(lambda: feed(stream.next_batch(it, next(counter))), steps, layout)
  if hasattr(it, "close"):
    it.close()
  result["first_batch_s"] = first_batch_s
  return result


def _timed(one_step, steps: int, layout: data.BatchLayout) -> dict[str, Any]:
  wall0, cpu0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    one_step()
  wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
  samples = steps * layout.per_process
  return {
    "steps": steps,
    "wall_s": wall,
    "samples_per_s": samples / wall,
    # CPU time of this (the training) process only: worker processes are not in it.
    "main_process_cpu_s": cpu,
  }


def main(argv):
  del argv
  common.log_to_stderr()
  scratch = None
  if _DATA_DIR.value:
    split = dataset_split(_DATA_DIR.value, _DATASET.value)
    source = {"data_dir": _DATA_DIR.value, "dataset": _DATASET.value, "synthetic": False}
  else:
    scratch = tempfile.mkdtemp(prefix="input_throughput-", dir=_SCRATCH.value or None)
    split = synthetic_split(_ROWS.value, scratch)
    source = {"synthetic": True, "rows": _ROWS.value, "note": "random values, default shapes"}
  try:
    warm_page_cache(split)
    local = _DEVICES.value
    if local <= 0:
      import jax

      local = jax.local_device_count()
    layout = data.BatchLayout(_BATCH.value, local, local, 0)
    if _BATCH.value % local:
      raise SystemExit(f"--batch {_BATCH.value} is not divisible by {local} devices")
    steps_per_epoch = -(-split.size // layout.global_batch)
    by_task = _ORDER.value == "by_task"
    feed = Feeder(_TO_DEVICE.value, layout)
    row_bytes = sum(a.nbytes for a in split.arrays) / split.size
    one_row = data.host_batch(
      split, np.zeros(1, np.int32), np.ones(1, bool), data.BatchLayout(1, 1, 1, 0)
    )
    input_row_bytes = one_row[0][0, 0].nbytes  # the model's input of one row, float32
    results: dict[str, Any] = {}
    load0 = os.getloadavg()[0]
    logging.info(
      "host: %d rows, batch %d over %d device(s)", split.size, layout.global_batch, local
    )
    results["host"] = time_host(
      split, layout, steps_per_epoch, by_task, feed, _WARMUP.value, _STEPS.value
    )
    logging.info("host: %.0f samples/s", results["host"]["samples_per_s"])
    for w in [int(x) for x in _WORKERS.value]:
      key = f"stream_workers{w}"
      results[key] = time_stream(
        split, layout, steps_per_epoch, by_task, feed, _WARMUP.value, _STEPS.value, w
      )
      logging.info("%s: %.0f samples/s", key, results[key]["samples_per_s"])
    report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": common.machine_info(loadavg_1m_start=load0, loadavg_1m_end=os.getloadavg()[0]),
      "what": "samples/s of the training input path alone (no model step), page cache warm",
      "source": source,
      "rows": split.size,
      "stored_bytes_per_row": row_bytes,
      "model_input_bytes_per_row": input_row_bytes,
      "batch": layout.global_batch,
      "local_devices": local,
      "batch_order": _ORDER.value,
      "to_device": _TO_DEVICE.value,
      "stream": {"read_threads": _THREADS.value, "prefetch_batches": _PREFETCH.value},
      "results": results,
    }
    if _TO_DEVICE.value:
      report["device"] = common.device_info()
    out = _OUT.value or os.path.join(
      _RESULTS, f"input_throughput-{common.slug(common.cpu_model())}-{os.cpu_count()}core.json"
    )
    common.write_json(out, report)
    print(f"{'input path':<20} {'samples/s':>12} {'main CPU s':>11}")
    for k, r in results.items():
      print(f"{k:<20} {r['samples_per_s']:>12,.0f} {r['main_process_cpu_s']:>11.1f}")
  finally:
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
