r"""Dataset build and array-loader throughput.

  python -m bench.dataset_build --tenset_dir /work/shared/tenset-mini \
      [--scale_records 1000000] [--out bench/results/dataset_build.json]
  python -m bench.dataset_build --tenset_dir /work/shared/tenset-mini \
      --skeletons data/skeletons/tenset-mini.json --workers_runs 1,2 \
      --out bench/results/dataset_build_workers.json
  python -m bench.dataset_build --tenset_dir SYNTHETIC_DIR --workers_runs 1,2,4,8,16 \
      [--shard_size 10000] --out $OUT/dataset_build_sweep.json

``--workers_runs``: only the parallel build (``data_pipelines.build --workers N``, every config,
loop tokens from ``--skeletons``, default ``TENSET_DIR/network_info/skeletons.json``), once per
N, each in a fresh process: records/s, peak RSS (the build process and its workers, summed,
sampled every 0.1 s), the time spent staging (reading + featurizing + replaying) and writing
the shards, the main process's CPU seconds in each, the load average before and after, and two
digests of every config: the decoded arrays + metadata, and the bytes of every dataset file
(shards, dataset_info.json, ...); the runs must agree on both. ``--holdout`` (default: the
``holdout_flag`` of a synthetic dir's ``synthetic.json``, else the build's default) and
``--shard_size`` (examples per shard) are the build's. The projection to more cores assumes
the staging and the writing scale with the workers (the writing by whole shards) and the main
process's share of each does not. On a synthetic TenSet-scale dir (``bench.make_tenset_scale``)
on a machine without TFDS: ``bench/device_build_sweep.sh``.

1. Builds every config of ``--tenset_dir`` (all hardware + the multi config) and times it.
2. Array loader: first load (decode + write the .npy cache) and cached loads (open, and a full
   pass over every array), in examples/s.
3. TenSet scale (``--scale_records`` > 0): **replicated** data, not real measurements. The
   first hardware's task files are copied with fresh workload keys (the task hash in the key is
   replaced; lines repeated to TenSet's ~4,000 records per task) until ``--scale_records``
   records, then built (single-hardware config only) and loaded. Real TenSet has ~8.6M records
   per hardware; use ``--scale_records 8600000`` where disk allows (~8 GB input JSON, ~2x20 GB
   staging + dataset, ~20 GB array cache).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from bench import common, make_tenset_scale
from data_pipelines import loader, schema, tenset_tfds
from tlp_jax.core import records, tenset

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TENSET_DIR = flags.DEFINE_string("tenset_dir", "/work/shared/tenset-mini", "TenSet root.")
_OUT = flags.DEFINE_string(
  "out", os.path.join(_REPO, "bench", "results", "dataset_build.json"), "Result JSON."
)
_WORK = flags.DEFINE_string("work_dir", None, "Scratch dir (default: a temp dir, removed).")
_SCALE = flags.DEFINE_integer(
  "scale_records", 1_000_000, "Replicated records for the scale run (0 = skip)."
)
_PER_TASK = flags.DEFINE_integer("records_per_task", 4000, "Scale run: records per task file.")
_STORAGE_OF = flags.DEFINE_string(
  "storage_of",
  None,
  "DATA_DIR:CONFIG of a built dataset: only report its bytes per example (on disk, in the "
  "array cache, in the trainer's memory) and whether its step features are exact in float16.",
)


_WORKERS_RUNS = flags.DEFINE_list(
  "workers_runs", [], "Worker counts of the parallel-build benchmark (e.g. 1,2); empty = skip."
)
_SKELETONS = flags.DEFINE_string(
  "skeletons",
  None,
  "Skeleton file of the parallel-build benchmark (loop tokens on; default "
  "TENSET_DIR/network_info/skeletons.json).",
)
_HOLDOUT = flags.DEFINE_list(
  "holdout",
  [],
  "Parallel-build benchmark: hold-out networks (default: a synthetic dir's holdout_flag, else "
  "the build's default).",
)
_SHARD_SIZE = flags.DEFINE_integer(
  "shard_size", tenset_tfds.SHARD_SIZE, "Parallel-build benchmark: examples per shard."
)
_PROJECT_TO = flags.DEFINE_integer("project_to", 16, "Cores of the projected build rate.")
_WORKERS_CHILD = flags.DEFINE_integer(
  "workers_child", 0, "Internal: run one parallel build with this many workers and exit."
)
_CHILD_OUT = flags.DEFINE_string("child_out", None, "Internal: the child's result JSON.")


class _RssSampler:
  """Peak RSS of this process and of all its descendants (summed), sampled in a thread."""

  def __init__(self, period_s: float = 0.1):
    import psutil

    self._proc = psutil.Process()
    self._psutil = psutil
    self.period_s = period_s
    self.peak_total = self.peak_main = 0
    self.peak_processes = 1
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _sample(self) -> None:
    main = self._proc.memory_info().rss
    total, n = main, 1
    for child in self._proc.children(recursive=True):
      try:
        total += child.memory_info().rss
        n += 1
      except self._psutil.Error:  # exited between the listing and the read
        pass
    self.peak_main = max(self.peak_main, main)
    self.peak_total = max(self.peak_total, total)
    self.peak_processes = max(self.peak_processes, n)

  def _run(self) -> None:
    while not self._stop.is_set():
      self._sample()
      self._stop.wait(self.period_s)

  def __enter__(self) -> _RssSampler:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self._sample()


def _digest(data_dir: str, configs: list[str]) -> str:
  """SHA-256 of the decoded arrays and metadata of the configs (shard files are not stable)."""
  h = hashlib.sha256()
  for config in configs:
    arrays = loader.load_arrays(data_dir, config)
    h.update(json.dumps(arrays.metadata, sort_keys=True).encode())
    for split in schema.SPLITS:
      sp = arrays.split(split)
      for name in schema.FIELDS:
        a = getattr(sp, name)
        if a is not None:
          a = np.ascontiguousarray(a)
          h.update(f"{split}/{name}/{a.dtype}/{a.shape}".encode())
          h.update(a.tobytes())
  return h.hexdigest()


def _files_digest(data_dir: str) -> str:
  """SHA-256 over the name and bytes of every file of the built datasets (shards included)."""
  h = hashlib.sha256()
  root = os.path.join(data_dir, schema.BUILDER_NAME)
  for dirpath, dirnames, names in os.walk(root):
    dirnames.sort()
    for name in sorted(names):
      path = os.path.join(dirpath, name)
      h.update(os.path.relpath(path, root).encode() + b"\0")
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
          h.update(block)
  return h.hexdigest()


def _holdout() -> list[str]:
  """``--holdout``, else a synthetic dir's ``holdout_flag``, else [] (the build's default)."""
  if _HOLDOUT.value:
    return list(_HOLDOUT.value)
  manifest = os.path.join(_TENSET_DIR.value, make_tenset_scale.MANIFEST)
  if os.path.exists(manifest):
    with open(manifest) as f:
      flag = json.load(f).get("holdout_flag", "")
    return [h for h in flag.split(",") if h]
  return []


def _cpu(usage) -> float:
  return usage.ru_utime + usage.ru_stime


def _timed(cls, name: str, seconds: list, cpu: list) -> None:
  """Wraps ``cls.name`` to add its wall and this process's CPU seconds to ``seconds``/``cpu``."""
  real = getattr(cls, name)

  def timed(self, *args, **kwargs):
    t, r = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    try:
      return real(self, *args, **kwargs)
    finally:
      seconds[0] += time.perf_counter() - t
      cpu[0] += _cpu(resource.getrusage(resource.RUSAGE_SELF)) - _cpu(r)

  setattr(cls, name, timed)


def _workers_child(workers: int, out: str) -> None:
  """One timed parallel build (in this fresh process); writes its numbers to ``out``."""
  work = tempfile.mkdtemp(prefix="bench_workers_")
  stage_s, stage_cpu, write_s, write_cpu = [0.0], [0.0], [0.0], [0.0]
  _timed(tenset_tfds.RecordStaging, "_stage", stage_s, stage_cpu)
  # The shard writing; an older tree (TFDS's serial writer) has no _write_splits: 0 there.
  if hasattr(tenset_tfds.Tenset, "_write_splits"):
    _timed(tenset_tfds.Tenset, "_write_splits", write_s, write_cpu)
  try:
    data_dir = os.path.join(work, "data")
    configs = tenset_tfds.make_configs(
      _TENSET_DIR.value, loop_tokens="on", skeletons=_SKELETONS.value, holdout=_holdout()
    )
    load_before = os.getloadavg()
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with _RssSampler() as rss:
      t = time.perf_counter()
      metas = tenset_tfds.build(
        _TENSET_DIR.value, data_dir, configs, workers=workers, shard_size=_SHARD_SIZE.value
      )
      wall = time.perf_counter() - t
    # The build joined its workers: their CPU is in RUSAGE_CHILDREN now.
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    # Each hardware is read once however many configs use it (as the build CLI counts).
    lines = {hw: s["lines"] for m in metas for hw, s in m["read_stats"].items()}
    records = sum(lines.values())
    examples = sum(sum(m["examples"].values()) for m in metas)
    shard_lengths = {}  # per config, in the order the shards are written
    for m in metas:
      ds_dir = loader.find_dataset_dir(data_dir, m["config"])
      with open(os.path.join(ds_dir, schema.DATASET_INFO_FILE)) as f:
        info = json.load(f)
      shard_lengths[m["config"]] = [int(n) for sp in info["splits"] for n in sp["shardLengths"]]
    shards = sum(len(v) for v in shard_lengths.values())
    files_digest = _files_digest(data_dir)
    if not write_s[0]:
      write_s[0] = wall - stage_s[0]
    result = {
      "workers": workers,
      "configs": [m["config"] for m in metas],
      "records_read": records,
      "examples_written": examples,
      "shards": shards,
      "shard_lengths": shard_lengths,
      "shard_size": _SHARD_SIZE.value,
      "wall_s": wall,
      "records_per_s": records / wall,
      "stage_s": stage_s[0],
      "main_process_stage_cpu_s": stage_cpu[0],
      "write_s": write_s[0],
      "main_process_write_cpu_s": write_cpu[0],
      "other_s": wall - stage_s[0] - write_s[0],
      "main_process_cpu_s": _cpu(self_after) - _cpu(self_before),
      "workers_cpu_s": _cpu(children_after) - _cpu(children_before),
      "write_examples_per_s": examples / max(write_s[0], 1e-9),
      "peak_rss_total_bytes": rss.peak_total,
      "peak_rss_main_bytes": rss.peak_main,
      "peak_processes": rss.peak_processes,
      "load_average_before": load_before,
      "load_average_after": load_after,
      "files_digest": files_digest,
      "digest": _digest(data_dir, [m["config"] for m in metas]),
    }
  finally:
    shutil.rmtree(work, ignore_errors=True)
  common.write_json(out, result)


def _makespan(lengths: list[int], workers: int) -> int:
  """Examples the busiest of ``workers`` writes when each shard, in order, goes to the first
  free one (what the build's pool does)."""
  free = [0] * workers
  for n in lengths:
    k = free.index(min(free))
    free[k] += n
  return max(free)


def workers_benchmark(worker_counts: list[int], project_to: int) -> dict:
  """Runs :func:`_workers_child` once per worker count, each in a fresh process."""
  runs = []
  for n in worker_counts:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "run.json")
      cmd = [sys.executable, "-m", "bench.dataset_build", "--workers_child", str(n)]
      cmd += ["--child_out", out, "--tenset_dir", _TENSET_DIR.value]
      cmd += ["--shard_size", str(_SHARD_SIZE.value), "--verbosity", "-1"]
      if _SKELETONS.value:
        cmd += ["--skeletons", _SKELETONS.value]
      if _HOLDOUT.value:
        cmd += ["--holdout", ",".join(_HOLDOUT.value)]
      subprocess.run(cmd, check=True, cwd=_REPO)
      with open(out) as f:
        runs.append(json.load(f))
    r = runs[-1]
    print(
      f"workers {n}: {r['records_per_s']:.0f} records/s ({r['wall_s']:.1f} s: staging "
      f"{r['stage_s']:.1f} s, writing {r['write_s']:.1f} s = "
      f"{r['write_examples_per_s']:.0f} examples/s over {r['shards']} shards), peak RSS "
      f"{r['peak_rss_total_bytes'] / 2**20:.0f} MiB over {r['peak_processes']} processes "
      f"(main {r['peak_rss_main_bytes'] / 2**20:.0f} MiB), CPU main "
      f"{r['main_process_cpu_s']:.1f} s + workers {r['workers_cpu_s']:.1f} s, load "
      f"{r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f}",
      flush=True,
    )
  one = next((r for r in runs if r["workers"] == 1), None)
  multi = [r for r in runs if r["workers"] > 1]
  out = {
    "runs": runs,
    "same_output": len({r["digest"] for r in runs}) == 1,
    "same_files": len({r["files_digest"] for r in runs}) == 1,
  }
  if one is not None and multi:
    # Amdahl: the per-file work (one process's staging time) splits over the cores, the shard
    # writing too but by whole shards; the main process's share of each (measured with
    # workers) stays serial.
    serial_stage = max(r["main_process_stage_cpu_s"] for r in multi)
    serial_write = max(r["main_process_write_cpu_s"] for r in multi)
    stage = max(one["stage_s"] / project_to, serial_stage)
    per_example = one["write_s"] / max(one["examples_written"], 1)
    spans = sum(_makespan(v, project_to) for v in one["shard_lengths"].values())
    write = max(per_example * spans, serial_write)
    wall = stage + write + one["other_s"]
    out["projection"] = {
      "cores": project_to,
      "stage_s": stage,
      "write_s": write,
      "records_per_s": one["records_read"] / wall,
      "speedup_over_one_worker": one["wall_s"] / wall,
      "assumes": "staging scales linearly with workers; each config's shards are written in "
      "order by the first free worker, at one worker's examples/s; the main process's CPU in "
      "each (measured with workers) and the rest of the build are serial",
    }
    print(
      f"projected at {project_to} cores: {out['projection']['records_per_s']:.0f} records/s "
      f"({out['projection']['speedup_over_one_worker']:.1f}x one worker)"
    )
  print(f"same decoded arrays + metadata for every worker count: {out['same_output']}")
  print(f"same dataset files (bytes) for every worker count: {out['same_files']}")
  return out


def storage_report(data_dir: str, config: str) -> dict:
  """Bytes per example of a built config: TFDS files on disk, the array cache (what the loader
  memory-maps) per field, the trainer's resident row (``HeadArrays``: float32 steps, float16
  loop tokens, one head), and whether narrower step-feature codes would be exact."""
  ds_dir = loader.find_dataset_dir(data_dir, config)
  arrays = loader.load_arrays(data_dir, config)
  n = {s: len(arrays.split(s)) for s in schema.SPLITS}
  total = sum(n.values())
  files = {}
  for name in sorted(os.listdir(ds_dir)):
    path = os.path.join(ds_dir, name)
    if os.path.isfile(path):
      files[name] = os.path.getsize(path)
  records = sum(v for k, v in files.items() if ".array_record" in k)
  cache_dir = os.path.join(ds_dir, loader.CACHE_DIR)
  cache_fields: dict[str, int] = {}
  for name in os.listdir(cache_dir):
    if name.endswith(".npy"):
      field = name.split(".")[1]
      cache_fields[field] = cache_fields.get(field, 0) + os.path.getsize(
        os.path.join(cache_dir, name)
      )
  train = arrays.split("train")
  steps = np.asarray(train.features)
  tokens = getattr(train, "loop_tokens", None)
  row = steps[0].nbytes + 4 + 1 + 4 + (0 if tokens is None else np.asarray(tokens)[0].nbytes)
  f16 = steps.astype(np.float16).astype(np.float32)
  used_steps = (np.abs(steps).sum(-1) != 0).sum(1)
  out = {
    "config": config,
    "examples": n,
    "step_features": {"shape": list(steps.shape[1:]), "dtype": str(steps.dtype)},
    "loop_tokens": None
    if tokens is None
    else {"shape": list(np.asarray(tokens).shape[1:]), "dtype": str(np.asarray(tokens).dtype)},
    "disk_tfds_array_record_bytes_per_example": records / total,
    "disk_other_files_bytes": {k: v for k, v in files.items() if ".array_record" not in k},
    "array_cache_bytes_per_example": sum(cache_fields.values()) / total,
    "array_cache_bytes_per_example_by_field": {k: v / total for k, v in cache_fields.items()},
    "trainer_resident_bytes_per_row": row,
    "goal_bytes_per_example": 5000,
    "step_features_exact_in_float16": bool(np.array_equal(f16, steps)),
    "step_features_all_integers": bool(np.array_equal(steps, np.round(steps))),
    "step_features_max_abs": float(np.abs(steps).max()),
    "step_features_nonzero_fraction": float((steps != 0).mean()),
    "steps_used_mean": float(used_steps.mean()),
    "trainer_resident_bytes_per_row_with_float16_steps": row - steps[0].nbytes // 2,
  }
  if tokens is not None:
    t = np.asarray(tokens).astype(np.float32)
    out["loop_tokens_used_mean"] = float(((np.abs(t).sum(-1)) != 0).sum(1).mean())
  return out


def _machine() -> dict:
  return common.machine_info(tensorflow_datasets=tfds.__version__)


def _timed_loads(data_dir: str, config: str) -> dict:
  ds_dir = loader.find_dataset_dir(data_dir, config)
  shutil.rmtree(os.path.join(ds_dir, loader.CACHE_DIR), ignore_errors=True)
  t = time.perf_counter()
  arrays = loader.load_arrays(data_dir, config)
  first = time.perf_counter() - t
  n = sum(len(arrays.split(s)) for s in schema.SPLITS)
  t = time.perf_counter()
  arrays = loader.load_arrays(data_dir, config)
  cached_open = time.perf_counter() - t
  # Copy every cached array into memory: what a trainer pays to hold all data in RAM.
  t = time.perf_counter()
  checksum = 0.0
  for s in schema.SPLITS:
    sp = arrays.split(s)
    for name in schema.FIELDS:
      a = np.array(getattr(sp, name), copy=True)
      checksum += float(a.reshape(-1)[:1000].astype(np.float64).sum())
      del a
  cached_read = time.perf_counter() - t
  return {
    "config": config,
    "examples": n,
    "first_load_s": first,
    "first_load_examples_per_s": n / first,
    "cached_open_s": cached_open,
    "cached_open_examples_per_s": n / cached_open,
    "cached_full_read_s": cached_read,
    "cached_full_read_examples_per_s": n / cached_read,
    "checksum": checksum,
  }


def _replicate(
  src_dir: str, dst_dir: str, hardware: str, target_records: int, per_task: int
) -> dict:
  """Copies ``hardware``'s task files under fresh workload keys up to target_records."""
  shutil.copytree(
    os.path.join(src_dir, tenset.NETWORK_INFO_DIR),
    os.path.join(dst_dir, tenset.NETWORK_INFO_DIR),
    ignore=shutil.ignore_patterns("*.pkl"),
  )
  out_dir = tenset.measure_records_dir(dst_dir, hardware)
  os.makedirs(out_dir)
  originals = []
  for path in tenset.task_files(src_dir, hardware):
    first = records.first_record(path)
    if first is None:
      continue
    with open(path, "rb") as f:
      lines = [ln if ln.endswith(b"\n") else ln + b"\n" for ln in f if ln.strip()]
    task_hash = json.loads(first.workload_key)[0]
    originals.append((os.path.basename(path), task_hash, lines))
  written = files = 0
  copy = 0
  while written < target_records:
    for name, task_hash, lines in originals:
      if written >= target_records:
        break
      # Copy 0 keeps the real keys, so the hold-out networks still have their tasks.
      new_hash = task_hash if copy == 0 else hashlib.md5(f"{task_hash}-{copy}".encode()).hexdigest()
      reps = max(1, per_task // len(lines))
      body = b"".join(lines).replace(task_hash.encode(), new_hash.encode()) * reps
      n = len(lines) * reps
      with open(os.path.join(out_dir, name.replace(task_hash, new_hash)), "wb") as f:
        f.write(body)
      written += n
      files += 1
    copy += 1
  return {"records": written, "task_files": files, "source_task_files": len(originals)}


def main(argv) -> None:
  del argv
  if _WORKERS_CHILD.value:
    _workers_child(_WORKERS_CHILD.value, _CHILD_OUT.value)
    return
  if _WORKERS_RUNS.value:
    report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": _machine(),
      "tenset_dir": _TENSET_DIR.value,
      "skeletons": _SKELETONS.value,
      "holdout": _holdout(),
      "shard_size": _SHARD_SIZE.value,
      "loop_tokens": True,
      "parallel_build": workers_benchmark([int(n) for n in _WORKERS_RUNS.value], _PROJECT_TO.value),
    }
    report["machine"]["load_average_end"] = os.getloadavg()
    common.write_json(_OUT.value, report)
    return
  if _STORAGE_OF.value:
    data_dir, _, config = _STORAGE_OF.value.rpartition(":")
    if not data_dir or not config:
      raise app.UsageError("--storage_of must be DATA_DIR:CONFIG")
    report = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": _machine(),
      "data_dir": data_dir,
      "storage": storage_report(data_dir, config),
    }
    common.write_json(_OUT.value, report)
    print(json.dumps(report["storage"], indent=1))
    return
  work = _WORK.value or tempfile.mkdtemp(prefix="bench_dataset_")
  results = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "machine": _machine(),
    "tenset_dir": _TENSET_DIR.value,
  }
  try:
    data_dir = os.path.join(work, "data")
    configs = tenset_tfds.make_configs(_TENSET_DIR.value)
    t = time.perf_counter()
    metas = tenset_tfds.build(_TENSET_DIR.value, data_dir, configs)
    build_s = time.perf_counter() - t
    results["tenset_mini_build"] = {
      "seconds": build_s,
      "configs": [m["config"] for m in metas],
      "examples": {m["config"]: m["examples"] for m in metas},
      "records_read": {hw: s["lines"] for m in metas for hw, s in m["read_stats"].items()},
    }
    print(f"build of {len(metas)} configs: {build_s:.2f} s")
    results["tenset_mini_load"] = [_timed_loads(data_dir, m["config"]) for m in metas]
    for r in results["tenset_mini_load"]:
      print(
        f"load {r['config']}: first {r['first_load_examples_per_s']:.0f} ex/s, cached open "
        f"{r['cached_open_examples_per_s']:.0f} ex/s, cached full read "
        f"{r['cached_full_read_examples_per_s']:.0f} ex/s"
      )
    shutil.rmtree(data_dir)

    if _SCALE.value > 0:
      hw = tenset.hardware_folders(_TENSET_DIR.value)[0]
      rep_dir = os.path.join(work, "replicated")
      t = time.perf_counter()
      rep = _replicate(_TENSET_DIR.value, rep_dir, hw, _SCALE.value, _PER_TASK.value)
      rep["replicate_s"] = time.perf_counter() - t
      rep["hardware"] = hw
      rep["note"] = (
        "REPLICATED records (real lines of tenset-mini under fresh workload keys, "
        "repeated within a task), not real measurements; for throughput only"
      )
      rep_data = os.path.join(work, "replicated_data")
      cfg = tenset_tfds.make_configs(rep_dir, hardware=[hw], multi=False, holdout=["resnet_50@224"])
      t = time.perf_counter()
      tenset_tfds.build(rep_dir, rep_data, cfg)
      rep["build_s"] = time.perf_counter() - t
      rep["build_records_per_s"] = rep["records"] / rep["build_s"]
      shutil.rmtree(rep_dir)
      rep["load"] = _timed_loads(rep_data, hw)
      results["scale_run"] = rep
      print(
        f"scale run ({rep['records']} replicated records): build {rep['build_s']:.1f} s "
        f"({rep['build_records_per_s']:.0f} rec/s); first load "
        f"{rep['load']['first_load_examples_per_s']:.0f} ex/s; cached full read "
        f"{rep['load']['cached_full_read_examples_per_s']:.0f} ex/s"
      )
  finally:
    if not _WORK.value:
      shutil.rmtree(work, ignore_errors=True)
  common.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
