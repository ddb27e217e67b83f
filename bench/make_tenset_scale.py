r"""Writes a SYNTHETIC TenSet-layout folder at TenSet's scale from real measure records.

  python -m bench.make_tenset_scale --source /work/shared/tenset-mini --out_dir /data/scale \
      [--records 8600000] [--platforms 1] [--tasks 2308] [--skeletons PATH] [--workers N]

TenSet holds ~8.6M records per CPU platform (~2,300 tasks x ~3,700 programs), 7 platforms; the
real data here holds ~11k. This script makes a folder of TenSet's shape for benchmarks (build
rate, storage, input pipeline, training throughput) out of the real records of one source
hardware (``--source_hardware``, default the one with the most records):

* **tasks replicated under new workload keys**: output task ``k`` copies source task
  ``k % S`` (S source tasks); its key keeps the shapes (so the task's skeleton replays the same
  loop nests) and gets a new 32-hex hash derived from ``(seed, k, source hash)``. The same keys
  are used on every platform, as TenSet measures the same programs on each.
* **records per task**: ``--records`` spread evenly over ``--tasks`` tasks (TenSet's shape); a
  task cycles through its source task's records, so a source program appears several times in a
  task (the dataset keeps duplicate programs, as TLP's does). ``--tasks 0`` = as many tasks as
  needed with each source record used once per task copy.
* **costs jittered deterministically**: every cost of a record is multiplied by
  ``exp(jitter * z_record + platform_jitter * z_task)`` (``z`` standard normal from
  ``(seed, platform, task)``), so copies differ and platforms differ per task. Failed
  measurements (error code != 0) are copied unchanged.
* **skeletons and network info replicated**: ``network_info/skeletons.json`` holds one skeleton
  per output task (the source task's, with the new key; source tasks the extractor could not
  describe are listed under ``failed`` again), and every source network gets one copy per
  replica ``r`` named ``NAME-synR`` listing its tasks' copies ``r``.
* **labelled synthetic in every output**: the platforms are named ``synthetic<P>-<source hw>``
  (folder names and the ``-model=`` of every record's target), the networks ``NAME-synR`` with a
  ``"synthetic": true`` field, the skeleton file has ``"synthetic": true``, and the root holds
  ``SYNTHETIC.md`` and ``synthetic.json`` (parameters, counts, the hold-out flag to build with).

Output files are written to a temporary name and renamed, task by task, so a rerun with the same
parameters resumes (finished task files are kept; ``synthetic.json`` must agree, or the run
stops). Memory holds the source records and one task file at a time, whatever ``--records``.
The source needs its skeletons (``python -m tlp_jax.tvm.skeleton_extract --tenset_dir SRC
--out PATH``, TVM once, seconds on tenset-mini); ``--skeletons none`` writes none (the build
then makes step features only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from tlp_jax.core import atomic_file, tenset
from tlp_jax.core import network_info as network_info_lib
from tlp_jax.core import skeleton as skeleton_lib

FORMAT = "tlp-jax-synthetic-tenset"
VERSION = 1
MANIFEST = "synthetic.json"
MARKER = "SYNTHETIC.md"
TENSET_RECORDS_PER_PLATFORM = 8_600_000
TENSET_TASKS = 2308
TENSET_PLATFORMS = 7


def _define_flags() -> None:
  """The command line's flags, defined only when run as a script (other bench modules define
  flags of the same names, and tests import several of them into one process)."""
  global _SOURCE, _OUT, _HW, _RECORDS, _PLATFORMS, _TASKS, _SKELETONS, _JITTER
  global _PLATFORM_JITTER, _SEED, _WORKERS
  _SOURCE = flags.DEFINE_string("source", "/work/shared/tenset-mini", "Real TenSet-layout folder.")
  _OUT = flags.DEFINE_string("out_dir", None, "Where to write the synthetic TenSet folder.")
  _HW = flags.DEFINE_string(
    "source_hardware", None, "Source hardware folder (default: the one with most records)."
  )
  _RECORDS = flags.DEFINE_integer(
    "records", TENSET_RECORDS_PER_PLATFORM, "Records per platform (TenSet: ~8.6M).", lower_bound=1
  )
  _PLATFORMS = flags.DEFINE_integer(
    "platforms", 1, f"Synthetic platforms (TenSet's CPU set: {TENSET_PLATFORMS}).", lower_bound=1
  )
  _TASKS = flags.DEFINE_integer(
    "tasks",
    TENSET_TASKS,
    "Tasks per platform (TenSet: ~2,300); 0 = one copy of each source record per task copy.",
    lower_bound=0,
  )
  _SKELETONS = flags.DEFINE_string(
    "skeletons",
    None,
    "Source skeleton collection (default SOURCE/network_info/skeletons.json); 'none' = write no "
    "skeletons.",
  )
  _JITTER = flags.DEFINE_float("jitter", 0.1, "Log-normal sigma of the per-record cost jitter.")
  _PLATFORM_JITTER = flags.DEFINE_float(
    "platform_jitter", 0.2, "Log-normal sigma of the per-(platform, task) cost factor."
  )
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the keys and the jitter.")
  _WORKERS = flags.DEFINE_integer("workers", 1, "Processes writing task files.", lower_bound=1)


class ScaleError(ValueError):
  """Bad source or parameters (the message names the file or flag)."""


@dataclasses.dataclass(frozen=True)
class Params:
  """Everything that determines the output bytes (kept in ``synthetic.json``)."""

  source: str
  source_hardware: str
  records: int
  platforms: int
  tasks: int
  jitter: float
  platform_jitter: float
  seed: int
  skeletons: bool


@dataclasses.dataclass(frozen=True)
class SourceRecord:
  i: list  # the record's "i" (key and target are replaced per output task)
  costs: list | None
  rest: list  # "r"[1:]: error code, all-cost time, timestamp


@dataclasses.dataclass(frozen=True)
class SourceTask:
  workload_key: str
  records: tuple[SourceRecord, ...]


def platform_names(source_hardware: str, platforms: int) -> list[str]:
  """``synthetic<P>-<source hardware>`` for P in 0..platforms-1."""
  return [f"synthetic{p}-{source_hardware}" for p in range(platforms)]


def new_workload_key(source_key: str, task: int, seed: int) -> str:
  """The source key with its hash replaced by one derived from ``(seed, task, source hash)``."""
  parts = json.loads(source_key)
  if not (isinstance(parts, list) and parts and isinstance(parts[0], str)):
    raise ScaleError(f"workload key {source_key!r} is not a JSON list starting with its hash")
  digest = hashlib.sha1(f"tlp-jax-synthetic:{seed}:{task}:{parts[0]}".encode()).hexdigest()
  return json.dumps([digest[:32]] + parts[1:])


def read_source(source: str, hardware: str) -> tuple[list[SourceTask], int]:
  """The source hardware's task files, parsed once: ``(tasks, malformed lines skipped)``."""
  tasks, bad = [], 0
  for path in tenset.task_files(source, hardware):
    recs, key = [], None
    with open(path, "rb") as f:
      for line in f:
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
          k = rec["i"][0][0]
          r = rec["r"]
          if not isinstance(k, str) or not isinstance(r, list) or len(r) < 2:
            raise ValueError("bad record")
        except (ValueError, KeyError, IndexError, TypeError):
          bad += 1
          continue
        if key is None:
          key = k
        elif k != key:
          raise ScaleError(f"{path}: records of two workload keys ({key!r}, {k!r})")
        recs.append(SourceRecord(i=rec["i"], costs=r[0], rest=r[1:]))
    if recs:
      tasks.append(SourceTask(workload_key=key, records=tuple(recs)))
  if bad:
    logging.warning("%s/%s: %d malformed lines skipped", source, hardware, bad)
  return tasks, bad


def task_record_counts(params: Params, source_tasks: Sequence[SourceTask]) -> list[int]:
  """Records of each output task (per platform): ``--records`` spread over ``--tasks``."""
  if params.tasks:
    base, extra = divmod(params.records, params.tasks)
    return [base + (k < extra) for k in range(params.tasks)]
  counts, left, k = [], params.records, 0
  while left > 0:
    n = min(left, len(source_tasks[k % len(source_tasks)].records))
    counts.append(n)
    left -= n
    k += 1
  return counts


def _target(target: str, platform: str) -> str:
  """The record target with ``-model=`` set to the synthetic platform (added if absent)."""
  parts = [p for p in target.split() if not p.startswith("-model=")]
  return " ".join(parts + [f"-model={platform}"])


def _format_costs(costs: np.ndarray) -> str:
  return "[" + ", ".join(repr(float(c)) for c in costs) + "]"


def task_lines(
  params: Params, src: SourceTask, k: int, key: str, platform_index: int, platform: str, n: int
) -> bytes:
  """The ``n`` record lines of output task ``k`` on one platform."""
  rng = np.random.default_rng([params.seed, platform_index, k])
  task_factor = math.exp(params.platform_jitter * rng.standard_normal())
  factors = task_factor * np.exp(params.jitter * rng.standard_normal(n))
  heads = []
  for rec in src.records:
    i = [[key, _target(rec.i[0][1], platform), *rec.i[0][2:]], *rec.i[1:]]
    heads.append('{"i": ' + json.dumps(i) + ', "r": ')
  tails = [", " + json.dumps(rec.rest)[1:] + ', "v": "v0.6"}\n' for rec in src.records]
  out = []
  m = len(src.records)
  for j in range(n):
    rec = src.records[j % m]
    if rec.rest and rec.rest[0] == 0 and isinstance(rec.costs, list) and rec.costs:
      costs = _format_costs(np.asarray(rec.costs, np.float64) * factors[j])
    else:
      costs = json.dumps(rec.costs)
    out.append(heads[j % m] + "[" + costs + tails[j % m])
  return "".join(out).encode()


# Worker state (set once per process by _init).
_STATE: dict[str, Any] = {}


def _init(params: Params, source_tasks, keys, counts, platforms, out_dir) -> None:
  _STATE.update(
    params=params,
    source_tasks=source_tasks,
    keys=keys,
    counts=counts,
    platforms=platforms,
    out_dir=out_dir,
  )


def _write_task(k: int) -> tuple[int, int]:
  """Writes output task ``k`` on every platform; returns (records written, files skipped)."""
  s = _STATE
  params, src = s["params"], s["source_tasks"][k % len(s["source_tasks"])]
  key, n = s["keys"][k], s["counts"][k]
  written = skipped = 0
  for p, platform in enumerate(s["platforms"]):
    path = os.path.join(
      tenset.measure_records_dir(s["out_dir"], platform), tenset.record_filename(key)
    )
    if os.path.exists(path):  # finished by an earlier run (files are renamed when complete)
      skipped += 1
      continue
    data = task_lines(params, src, k, key, p, platform, n)
    atomic_file.write_atomically(path, lambda f, data=data: f.write(data), binary=True)
    written += n
  return written, skipped


def _source_skeletons(params: Params, path: str | None) -> dict[str, Any] | None:
  if not params.skeletons:
    return None
  path = path or os.path.join(params.source, skeleton_lib.TENSET_SKELETONS_FILE)
  if not os.path.exists(path):
    raise ScaleError(
      f"{path}: no skeleton collection; extract it once with TVM: "
      f"{skeleton_lib.EXTRACT_COMMAND} {params.source} --out PATH, then pass --skeletons PATH "
      "(or --skeletons none for step features only)"
    )
  with open(path, "rb") as f:
    data = json.loads(f.read())
  if not isinstance(data, dict) or data.get("format") != skeleton_lib.COLLECTION_FORMAT:
    raise ScaleError(f"{path}: not a {skeleton_lib.COLLECTION_FORMAT} file")
  return data


def _check_manifest(out_dir: str, params: Params) -> None:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f).get("params")
  if old != dataclasses.asdict(params):
    raise ScaleError(
      f"{path}: {out_dir} was generated with other parameters ({old}); use another --out_dir "
      "or delete it"
    )


def make_tenset_scale(
  params: Params, out_dir: str, skeletons_path: str | None = None, workers: int = 1
) -> dict[str, Any]:
  """Writes the synthetic folder (resuming a run of the same parameters); returns the manifest."""
  t0 = time.perf_counter()
  _check_manifest(out_dir, params)
  source_tasks, malformed = read_source(params.source, params.source_hardware)
  if not source_tasks:
    raise ScaleError(f"{params.source}/{params.source_hardware}: no records")
  skeletons = _source_skeletons(params, skeletons_path)
  counts = task_record_counts(params, source_tasks)
  keys = [
    new_workload_key(source_tasks[k % len(source_tasks)].workload_key, k, params.seed)
    for k in range(len(counts))
  ]
  if len(set(keys)) != len(keys):
    raise ScaleError("two output tasks got the same workload key")
  platforms = platform_names(params.source_hardware, params.platforms)
  for platform in platforms:
    os.makedirs(tenset.measure_records_dir(out_dir, platform), exist_ok=True)
  info_dir = os.path.join(out_dir, tenset.NETWORK_INFO_DIR)
  os.makedirs(info_dir, exist_ok=True)

  # Network info: every source network once per replica, listing that replica's task copies.
  copies: dict[str, dict[int, str]] = {}  # source key -> replica -> output key
  for k, key in enumerate(keys):
    copies.setdefault(source_tasks[k % len(source_tasks)].workload_key, {})[
      k // len(source_tasks)
    ] = key
  replicas = -(-len(keys) // len(source_tasks))
  nets = network_info_lib.load_network_infos(params.source)
  networks_written = 0
  for r in range(replicas):
    for net in nets:
      tasks = [
        dict(dataclasses.asdict(t), workload_key=copies[t.workload_key][r])
        for t in net.tasks
        if r in copies.get(t.workload_key, {})
      ]
      if not tasks:
        continue
      syn = dataclasses.replace(net, name=f"{net.name}-syn{r}", tasks=())
      body = dict(syn.to_json_dict(), tasks=tasks, synthetic=True, source_network=net.label)
      path = os.path.join(info_dir, network_info_lib.json_file_name(syn))
      text = json.dumps(body, indent=1)
      atomic_file.write_atomically(path, lambda f, text=text: f.write(text))
      networks_written += 1
  try:
    holdout_src = list(network_info_lib.default_holdout(nets))
  except network_info_lib.NetworkInfoError:
    holdout_src = []
  holdout = [
    f"{s.name}-syn{r}" + (f"@{s.input_size}" if s.input_size is not None else "")
    for r in range(replicas)
    for s in network_info_lib.parse_holdout(holdout_src)
    if any(
      n.name == s.name
      and n.batch_size == 1
      and (s.input_size is None or n.input_size == s.input_size)
      and any(r in copies.get(t.workload_key, {}) for t in n.tasks)
      for n in nets
    )
  ]

  # Skeletons: each output task gets its source task's, under the new key.
  skel_stats = None
  if skeletons is not None:
    src_skel, src_failed = skeletons.get("skeletons", {}), skeletons.get("failed", {}) or {}
    out_skel, out_failed, missing = {}, {}, 0
    for k, key in enumerate(keys):
      wk = source_tasks[k % len(source_tasks)].workload_key
      if wk in src_skel:
        out_skel[key] = dict(src_skel[wk], workload_key=key)
      elif wk in src_failed:
        out_failed[key] = src_failed[wk]
      else:
        missing += 1
    body = {
      "format": skeleton_lib.COLLECTION_FORMAT,
      "version": skeletons.get("version", skeleton_lib.VERSION),
      "synthetic": True,
      "skeletons": out_skel,
    }
    if out_failed:
      body["failed"] = out_failed
    atomic_file.write_atomically(
      os.path.join(out_dir, skeleton_lib.TENSET_SKELETONS_FILE), lambda f: json.dump(body, f)
    )
    skel_stats = {"skeletons": len(out_skel), "failed": len(out_failed), "missing": missing}
    if missing:
      logging.warning(
        "%d output tasks have no source skeleton (their loop tokens are skipped)", missing
      )

  manifest = {
    "format": FORMAT,
    "version": VERSION,
    "synthetic": True,
    "params": dataclasses.asdict(params),
    "platforms": platforms,
    "tasks": len(keys),
    "records_per_platform": int(sum(counts)),
    "source_tasks": len(source_tasks),
    "source_records": sum(len(t.records) for t in source_tasks),
    "source_malformed_lines_skipped": malformed,
    "replicas": replicas,
    "networks": networks_written,
    "skeletons": skel_stats,
    "holdout_flag": ",".join(holdout),
  }
  # The manifest is written first, so a rerun with other parameters is refused.
  atomic_file.write_atomically(
    os.path.join(out_dir, MANIFEST), lambda f: json.dump(manifest, f, indent=1)
  )
  atomic_file.write_atomically(
    os.path.join(out_dir, MARKER), lambda f: f.write(_marker_text(manifest))
  )

  written = skipped = 0
  init = (params, source_tasks, keys, counts, platforms, out_dir)
  if workers > 1:
    # spawn, as data_pipelines.file_stager: forking a process that has started threads (JAX, in
    # a test or notebook) can deadlock the child.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=init) as pool:
      for w, s in pool.imap_unordered(_write_task, range(len(keys)), chunksize=4):
        written, skipped = written + w, skipped + s
  else:
    _init(*init)
    for k in range(len(keys)):
      w, s = _write_task(k)
      written, skipped = written + w, skipped + s
  manifest["run"] = {
    "records_written": written,
    "task_files_kept_from_earlier_run": skipped,
    "seconds": time.perf_counter() - t0,
    "workers": workers,
  }
  return manifest


def _marker_text(m: dict[str, Any]) -> str:
  p = m["params"]
  return f"""# SYNTHETIC data: not measurements

Generated by `python -m bench.make_tenset_scale` (tlp-jax) for benchmarks of TenSet's scale.
Every record is a copy of a real record of `{p["source"]}` / `{p["source_hardware"]}` under a
new workload key, with its costs multiplied by a seeded random factor (log-normal sigma
{p["jitter"]} per record, {p["platform_jitter"]} per platform and task). Do not train a model
for real use on it, and never mix it with real data.

- platforms: {", ".join(m["platforms"])} ({m["records_per_platform"]:,} records each)
- tasks: {m["tasks"]:,} (copies of {m["source_tasks"]} source tasks, {m["replicas"]} replicas)
- networks: every source network once per replica, named `NAME-synR`
- parameters and counts: `{MANIFEST}`

Build it with the replicas of the source's hold-out networks held out:

    python -m data_pipelines.build --tenset_dir THIS_DIR --data_dir DATA \\
        --holdout {m["holdout_flag"] or "NAME@SIZE,..."}
"""


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _OUT.value:
    raise app.UsageError("--out_dir is required")
  try:
    hardware = _HW.value
    if hardware is None:
      folders = tenset.hardware_folders(_SOURCE.value)
      hardware = max(folders, key=lambda h: len(tenset.task_files(_SOURCE.value, h)))
    params = Params(
      source=os.path.abspath(_SOURCE.value),
      source_hardware=hardware,
      records=_RECORDS.value,
      platforms=_PLATFORMS.value,
      tasks=_TASKS.value,
      jitter=_JITTER.value,
      platform_jitter=_PLATFORM_JITTER.value,
      seed=_SEED.value,
      skeletons=_SKELETONS.value != "none",
    )
    skel = None if _SKELETONS.value in (None, "none") else _SKELETONS.value
    manifest = make_tenset_scale(params, _OUT.value, skel, workers=_WORKERS.value)
  except (ScaleError, FileNotFoundError, network_info_lib.NetworkInfoError) as e:
    sys.exit(f"error: {e}")
  run = manifest["run"]
  print(
    f"wrote SYNTHETIC {_OUT.value}: {len(manifest['platforms'])} platform(s) x "
    f"{manifest['records_per_platform']:,} records, {manifest['tasks']:,} tasks, "
    f"{run['records_written']:,} records written in {run['seconds']:.1f} s "
    f"({run['records_written'] / max(run['seconds'], 1e-9):,.0f} records/s, "
    f"{run['task_files_kept_from_earlier_run']} task files kept from an earlier run)\n"
    f"build with: --holdout {manifest['holdout_flag']}"
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
