r"""The training input path's own ceiling, samples/s: host gather vs grain stream, no model step.

Feeds the batches a training run would feed (``tlp_jax.train.data``: ``epoch_order``,
``BatchLayout``, ``host_batch``) as fast as they can be made, over memory-mapped arrays of the
layout ``loader.load_arrays`` returns:

* ``host``: ``data_placement="host"``, each batch gathered in the training thread;
* ``stream``: ``data_placement="stream"`` (``tlp_jax.train.stream``), grain reading ahead with
  ``--read_threads`` threads in each of 0 / 2 / 4 / 8 worker processes (``--workers``).

The arrays are synthetic unless ``--data_dir`` names a built dataset: ``--rows`` random rows of
the default build's shapes (step features (25, 22) float32, loop tokens (40, 24) float16, so
the assembled input is (65, 46) float32, 12 KB a row; the default model reads its first 64
rows), written once as ``.npy`` files and read
back memory-mapped, their pages warmed first (the page cache, not the disk, is measured). Each
variant is timed over ``--steps`` batches after ``--warmup_steps``; with ``--to_device`` every
batch is also put on the local JAX devices (the host-to-device link counts too), three ways:
waited for batch by batch (``+copy``, what a step waits for without prefetch), and put
``--prefetch_to_device`` batches ahead by ``tlp_jax.train.prefetch.DevicePrefetch`` filled inline
or from a thread (``+prefetch_inline``, ``+prefetch_thread``; ``config.prefetch_to_device``).

Next to these ceilings, ``--train_rows N`` times the trainer itself (``train_and_evaluate``,
``configs/default.py``) on N rows tiled from ``--train_data_dir``'s built dataset, for each
``placement:prefetch_to_device[:stream workers]`` of ``--train_runs``: the median of its own
logged ``train/samples_per_sec`` windows, the first (compilation) left out.

    python -m bench.input_throughput [--rows 200000] [--workers 0,2,4,8] [--to_device]

On a GPU machine (grain, portpicker, ml_collections and tensorboardX are not in its image: carry
their wheels, see docs/TRAINING.md), one command writes the JSON under $OUT:

    python -m bench.input_throughput --to_device --workers 0,4 \
        --train_rows 300000 --train_data_dir /tmp/d/epyc --out $OUT/input_throughput_gpu.json
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import os
import shutil
import struct
import tempfile
import time
from typing import Any

import numpy as np
from absl import app, flags, logging

from bench import common
from tlp_jax.core import loop_tokens as loop_tokens_lib
from tlp_jax.train import data, runtime, stream

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
_TO_DEVICE = flags.DEFINE_bool(
  "to_device",
  False,
  "Also copy every batch to the local devices: waited for batch by batch, and with device "
  "prefetch (inline and in a thread).",
)
_PREFETCH_TO_DEVICE = flags.DEFINE_integer(
  "prefetch_to_device", 2, "config.prefetch_to_device of the prefetched --to_device variants."
)
_TRAIN_ROWS = flags.DEFINE_integer(
  "train_rows",
  0,
  "Also train configs/default.py with the trainer itself (train_and_evaluate) on this many "
  "training rows tiled from --train_data_dir's, for each of --train_runs; 0: skip.",
)
_TRAIN_RUNS = flags.DEFINE_list(
  "train_runs",
  ["host:0", "host:2"],
  "placement:prefetch_to_device[:stream workers] of the trainer runs.",
)
_TRAIN_DATA_DIR = flags.DEFINE_string(
  "train_data_dir", "", "The built dataset (--dataset) tiled for --train_rows (default --data_dir)."
)
_TRAIN_EPOCHS = flags.DEFINE_integer("train_epochs", 2, "Epochs of each trainer run.")
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


def step_source(split, layout, steps_per_epoch, by_task, total, workers, stream_source):
  """``(fetch, close)``: ``fetch(step)`` is host placement's batch of ``step``
  (``stream.StepBatch``,
  the gather the trainer's host placement runs) or the next batch of a grain pipeline of
  ``total`` steps with ``workers`` worker processes."""
  if not stream_source:
    step_batch = stream.StepBatch(split, layout, 0, steps_per_epoch, by_task)
    return (lambda step: step_batch(step)[1:]), (lambda: None)
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
  return (lambda step: stream.next_batch(it, step)), it.close


# --to_device: how each batch reaches the devices. "copy": put on the devices and waited for,
# batch by batch (what each step waits for without prefetch); "prefetch_inline" /
# "prefetch_thread": tlp_jax.train.prefetch.DevicePrefetch, --prefetch_to_device batches ahead,
# filled in the caller's thread / a background thread (config.prefetch_to_device).
DEVICE_MODES = ("copy", "prefetch_inline", "prefetch_thread")


def time_input(
  split, layout, steps_per_epoch, by_task, warmup, steps, workers, stream_source, mode
) -> dict[str, Any]:
  """samples/s of one input path: host gather or grain stream, then (``mode``) nothing or the
  copy to the local devices, with or without device prefetch."""
  total = warmup + steps
  t0 = time.perf_counter()
  fetch, close = step_source(split, layout, steps_per_epoch, by_task, total, workers, stream_source)
  feed = None
  if mode == "none":
    take = fetch
  else:
    import jax

    from tlp_jax.train import prefetch

    devices = jax.local_devices()[: layout.local_devices]
    if mode == "copy":
      take = lambda step: jax.block_until_ready(data.shard_to_devices(fetch(step), devices))  # noqa: E731
    else:
      feed = prefetch.DevicePrefetch(
        fetch,
        range(total),
        devices,
        _PREFETCH_TO_DEVICE.value,
        thread=mode == "prefetch_thread",
      )
      take = lambda step: jax.block_until_ready(feed.next_batch(step))  # noqa: E731
  try:
    take(0)
    first_batch_s = time.perf_counter() - t0
    for step in range(1, warmup):
      take(step)
    counter = iter(range(warmup, total))
    result = _timed(lambda: take(next(counter)), steps, layout)
  finally:
    if feed is not None:
      feed.close()
    close()
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


def tiled_dataset(data_dir: str, name: str, rows: int) -> Any:
  """The built dataset with ``rows`` training rows tiled from its own: row ``r`` is real row
  ``r % N``, each copy's tasks renumbered as new tasks (so by-task batches keep the real task
  sizes); validation and everything else as built."""
  from data_pipelines import loader

  ds = loader.load_arrays(data_dir, name)
  train, n = ds.train, len(ds.train)
  r = np.arange(rows, dtype=np.int64)
  real = r % n
  tasks = np.asarray(train.task_index, np.int64)
  tiled = dataclasses.replace(
    train,
    features=np.asarray(train.features)[real],
    scores=np.asarray(train.scores)[real],
    mask=np.asarray(train.mask)[real],
    min_cost=np.asarray(train.min_cost)[real],
    task_index=(tasks[real] + (int(tasks.max()) + 1) * (r // n)).astype(np.int32),
    loop_tokens=None if train.loop_tokens is None else np.asarray(train.loop_tokens)[real],
  )
  return dataclasses.replace(ds, train=tiled)


def logged_samples_per_s(workdir: str) -> list[float]:
  """The ``train/samples_per_sec`` scalars a run wrote to its TensorBoard events, in order."""
  from tensorboardX.proto import event_pb2

  values = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents*"))):
    with open(path, "rb") as f:
      raw = f.read()
    pos = 0
    while pos < len(raw):  # TFRecord framing: length, its crc, data, its crc
      (n,) = struct.unpack("<Q", raw[pos : pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(raw[pos + 12 : pos + 12 + n])
      values += [v.simple_value for v in event.summary.value if v.tag == "train/samples_per_sec"]
      pos += 12 + n + 4
  return values


def time_trainer(data_dir: str, name: str, rows: int, runs: list[str]) -> dict[str, Any]:
  """samples/s of ``train_and_evaluate`` itself: configs/default.py (validation only after the
  last epoch, no step checkpoints) on ``rows`` tiled rows, for each ``placement:prefetch[:workers]``
  of ``runs``. The rate is the median of the trainer's own logged windows
  (``train/samples_per_sec``, every ``log_every_steps`` steps), the first (compilation) left out."""
  from configs import default as default_config
  from tlp_jax.train import loop

  ds = tiled_dataset(data_dir, name, rows)
  out: dict[str, Any] = {"rows": rows, "epochs": _TRAIN_EPOCHS.value, "runs": {}}
  scratch = tempfile.mkdtemp(prefix="input_throughput-train-", dir=_SCRATCH.value or None)
  try:
    for run in runs:
      placement, prefetch_size, *rest = run.split(":")
      config = default_config.get_config()
      config.data_dir = data_dir
      config.dataset = name
      config.num_epochs = config.eval_every_epochs = _TRAIN_EPOCHS.value
      config.checkpoint_every_steps = 0
      config.data_placement = placement
      config.prefetch_to_device = int(prefetch_size)
      config.stream.num_workers = int(rest[0]) if rest else 0
      workdir = os.path.join(scratch, run.replace(":", "_"))
      t0 = time.perf_counter()
      loop.train_and_evaluate(config, workdir, dataset=ds)
      wall = time.perf_counter() - t0
      windows = logged_samples_per_s(workdir)
      steady = windows[1:] or windows
      out["runs"][run] = {
        "placement": placement,
        "prefetch_to_device": config.prefetch_to_device,
        "stream_workers": config.stream.num_workers,
        "samples_per_s": float(np.median(steady)),
        "logged_windows_samples_per_s": windows,
        "wall_s_with_compile_and_validation": wall,
      }
      logging.info("trainer %s: %.0f samples/s", run, out["runs"][run]["samples_per_s"])
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return out


def main(argv):
  del argv
  common.log_to_stderr()
  # As train.py: the default recipe's reproducible GPU kernels, set before JAX starts.
  runtime.enable_deterministic_gpu_ops()
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
    workers = [int(x) for x in _WORKERS.value]
    modes = DEVICE_MODES if _TO_DEVICE.value else ("none",)
    sources = [("host", 0, False)] + [(f"stream_workers{w}", w, True) for w in workers]
    for name, w, is_stream in sources:
      for mode in modes:
        key = name if mode == "none" else f"{name}+{mode}"
        results[key] = time_input(
          split, layout, steps_per_epoch, by_task, _WARMUP.value, _STEPS.value, w, is_stream, mode
        )
        logging.info("%s: %.0f samples/s", key, results[key]["samples_per_s"])
    trainer = {}
    if _TRAIN_ROWS.value:
      train_data_dir = _TRAIN_DATA_DIR.value or _DATA_DIR.value
      if not train_data_dir:
        raise app.UsageError("--train_rows needs --train_data_dir: a built dataset (loop tokens)")
      trainer = time_trainer(train_data_dir, _DATASET.value, _TRAIN_ROWS.value, _TRAIN_RUNS.value)
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
    if trainer:
      report["trainer"] = trainer
    if _TO_DEVICE.value:
      report["device"] = common.device_info()
    out = _OUT.value or os.path.join(
      _RESULTS, f"input_throughput-{common.slug(common.cpu_model())}-{os.cpu_count()}core.json"
    )
    common.write_json(out, report)
    print(f"{'input path':<32} {'samples/s':>12} {'main CPU s':>11}")
    for k, r in results.items():
      print(f"{k:<32} {r['samples_per_s']:>12,.0f} {r['main_process_cpu_s']:>11.1f}")
    for k, r in trainer.get("runs", {}).items():
      print(f"trainer {k:<24} {r['samples_per_s']:>12,.0f}")
  finally:
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
