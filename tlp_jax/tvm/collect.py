r"""TenSet's data-collection protocol on a new machine, as one resumable command (needs TVM).

Stages (each resumable; a finished task is never redone, an interrupted one is restarted):

1. **tasks** -- build each network with ``tvm.relay.testing`` and extract its auto-scheduler
   tasks (``auto_scheduler.extract_tasks``); write ``network_info/(NAME,[(BATCH,SIZE)]).json``
   in our TenSet-style layout (network, batch_size, input_size, tasks[workload_key, weight,
   flop_ct, desc]). Extraction also registers every workload in this process, which is what the
   later stages need, so the tasks are re-extracted on every run rather than unpickled.
   ``network_info/all_tasks.pkl`` (TVM's pickled ``SearchTask`` list, as TenSet ships it) is
   *written* for compatibility with TenSet's own scripts; this module never reads it.
2. **dump** -- TenSet's ``dump_programs``: per task, a ``SketchPolicy`` with a random cost model
   (``evolutionary_search_num_iters=1``, population ``min(N, 2560)``, at least 16) samples an
   initial population, evolves it, keeps distinct states (by ``str(state)``) until ``N`` are found
   or 10 rounds in a row bring nothing new (then re-samples), shuffles them, and writes
   ``to_measure_programs/([WORKLOAD_KEY,...],llvm).json`` with placeholder results.
3. **measure** -- TenSet's ``measure_programs``: ``LocalBuilder`` (timeout 15 s) and
   ``LocalRunner`` (timeout 5 s, number=1, CPU cache flush on, repeat by task FLOPs: >=2.42
   GFLOP 4, >=0.83 GFLOP 6, <=2.1 MFLOP 10, else 8), target ``<target> -model=<hardware>``,
   writing ``measure_records/<hardware>/([WORKLOAD_KEY,...],llvm).json`` (TenSet's
   ``get_measure_record_filename``: ``clean_name((workload_key, target.kind))``). Failed builds
   and runs keep their error code, as in TenSet.

Every output file is written to a temporary name and renamed into place when complete, so an
interruption leaves either a whole file or none.

Usage::

  python -m tlp_jax.tvm.collect --out_dir DIR \
      [--networks resnet_18:1:224,mobilenet:1:224] [--hardware NAME] [--programs_per_task 48] \
      [--stages tasks,dump,measure] [--start_idx I] [--end_idx J] [--seed 0]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import platform
import random
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from absl import app, flags
from tqdm import tqdm

from tlp_jax.core import atomic_file, network_info, tenset
from tlp_jax.tvm import tvm_import

# Constants of TenSet's measure_programs.py (FLOP thresholds for the number of repeats).
_REPEAT_BY_FLOPS = ((2416443392.0, 4), (834928640.0, 6))
_SMALL_TASK_FLOPS, _SMALL_TASK_REPEAT, _DEFAULT_REPEAT = 2097152.0, 10, 8
# TenSet uses population min(N, 2560). TVM samples initial states in batches of `population`
# and aborts when one whole batch is invalid, which at a population of 2-3 happens often; the
# floor only matters for N < 16 (TenSet's N is 4000, tenset-mini's 48).
_MIN_POPULATION = 16


# ----------------------------------------------------------------------------------------------
# Networks (tvm.relay.testing). CNNs whose builders take a layout are built NHWC, as the shared
# data is; the others only exist in NCHW.


def _resnet(num_layers):
  def build(batch, size):
    from tvm.relay import testing

    return testing.resnet.get_workload(
      num_layers=num_layers, batch_size=batch, image_shape=(size, size, 3), layout="NHWC"
    )

  return build


def _mobilenet(batch, size):
  from tvm.relay import testing

  return testing.mobilenet.get_workload(
    batch_size=batch, image_shape=(size, size, 3), layout="NHWC"
  )


def _squeezenet(batch, size):
  from tvm.relay import testing

  return testing.squeezenet.get_workload(
    batch_size=batch, version="1.1", image_shape=(3, size, size)
  )


def _inception_v3(batch, size):
  from tvm.relay import testing

  return testing.inception_v3.get_workload(batch_size=batch, image_shape=(3, size, size))


def _densenet_121(batch, size):
  from tvm.relay import testing

  return testing.densenet.get_workload(
    densenet_size=121, batch_size=batch, image_shape=(3, size, size)
  )


def _dcgan(batch, size):
  from tvm.relay import testing

  return testing.dcgan.get_workload(batch_size=batch, oshape=(3, size, size))


def _vgg_11(batch, size):
  from tvm.relay import testing

  return testing.vgg.get_workload(batch_size=batch, num_layers=11, image_shape=(3, size, size))


def _mlp(batch, size):
  # A tiny two-dense-layer network: used by the tests; `size` is the square image side.
  from tvm.relay import testing

  return testing.mlp.get_workload(batch_size=batch, image_shape=(1, size, size))


NETWORKS: Mapping[str, Callable] = {
  "resnet_18": _resnet(18),
  "resnet_50": _resnet(50),
  "mobilenet": _mobilenet,
  "squeezenet_v1.1": _squeezenet,
  "inception_v3": _inception_v3,
  "densenet_121": _densenet_121,
  "dcgan": _dcgan,
  "vgg_11": _vgg_11,
  "mlp": _mlp,
}

# The relay.testing networks of tenset-mini (its BERT-like encoders are plain Relay, not here).
DEFAULT_NETWORKS = (
  "resnet_18:1:224",
  "resnet_18:4:256",
  "mobilenet:1:224",
  "mobilenet:4:256",
  "mobilenet:1:240",
  "squeezenet_v1.1:1:224",
  "inception_v3:1:299",
  "densenet_121:1:224",
  "dcgan:1:64",
  "vgg_11:1:224",
  "resnet_50:1:224",
)


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
  """One network configuration: ``NAME:BATCH:SIZE``."""

  name: str
  batch_size: int
  input_size: int

  @classmethod
  def parse(cls, text: str) -> NetworkSpec:
    parts = text.strip().split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
      raise ValueError(f"network spec {text!r} is not NAME:BATCH:SIZE (e.g. resnet_18:1:224)")
    if parts[0] not in NETWORKS:
      raise ValueError(f"unknown network {parts[0]!r}; available: {sorted(NETWORKS)}")
    return cls(parts[0], int(parts[1]), int(parts[2]))


@dataclasses.dataclass(frozen=True)
class CollectConfig:
  """Options of one collection run (see the module docstring for the protocol).

  Attributes:
    out_dir: TenSet-layout root (network_info/, to_measure_programs/, measure_records/).
    networks: network specs.
    hardware: measure_records sub-folder and the target's ``-model``.
    target: LLVM target used for task extraction (``-model`` is added for measurement).
    num_cores: ``HardwareParams.num_cores`` of the tasks (None: all CPUs of this machine).
    programs_per_task: N of TenSet's dump_programs.
    stages: subset of ("tasks", "dump", "measure"), run in that order.
    start_idx, end_idx: only unique tasks [start_idx, end_idx) in extraction order (TenSet's
      --start-idx/--end-idx; None: from the first / to the last); to split work or smoke-test.
    seed: base seed; each task's sampling seed is derived from it and the workload key.
    measure_batch_size: programs built and run per batch.
    build_timeout, run_timeout: LocalBuilder / LocalRunner timeouts in seconds.
    build_n_parallel: LocalBuilder processes (None: all CPUs).
  """

  out_dir: str
  networks: tuple[NetworkSpec, ...]
  hardware: str
  target: str = "llvm"
  num_cores: int | None = None
  programs_per_task: int = 48
  stages: tuple[str, ...] = ("tasks", "dump", "measure")
  start_idx: int | None = None
  end_idx: int | None = None
  seed: int = 0
  measure_batch_size: int = 64
  build_timeout: int = 15
  run_timeout: int = 5
  build_n_parallel: int | None = None


def default_hardware_name() -> str:
  """A folder-safe hardware name derived from this CPU's model, e.g. ``amd-epyc-2c``."""
  model = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.lower().startswith("model name"):
          model = line.split(":", 1)[1]
          break
  except OSError:
    pass
  model = model or platform.processor() or platform.machine() or "cpu"
  model = re.sub(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", " ", model.lower())
  slug = re.sub(r"[^a-z0-9]+", "-", model).strip("-") or "cpu"
  return f"{slug}-{os.cpu_count() or 1}c"


def default_target() -> str:
  """``llvm -mcpu=<host cpu>`` as LLVM detects it (what Ansor tunes for on this machine)."""
  tvm_import.require_tvm()
  from tvm.target import codegen

  return f"llvm -mcpu={codegen.llvm_get_system_cpu()}"


def repeat_for_flops(flop_ct: float) -> int:
  """TenSet's number of LocalRunner repeats for a task of ``flop_ct`` FLOPs."""
  for threshold, repeat in _REPEAT_BY_FLOPS:
    if flop_ct >= threshold:
      return repeat
  return _SMALL_TASK_REPEAT if flop_ct <= _SMALL_TASK_FLOPS else _DEFAULT_REPEAT


def task_seed(seed: int, workload_key: str) -> int:
  """Per-task sampling seed in [1, 2^30] (TVM treats a 0 seed as 'random')."""
  return (seed * 1_000_003 + zlib.crc32(workload_key.encode())) % (1 << 30) + 1


# ----------------------------------------------------------------------------------------------
# Stage 1: tasks.


def extract_network_tasks(spec: NetworkSpec, target: str, num_cores: int | None):
  """Builds ``spec`` and extracts its tasks; returns ``(tasks, weights)`` (registers them)."""
  tvm = tvm_import.require_tvm()
  from tvm import auto_scheduler

  mod, params = NETWORKS[spec.name](spec.batch_size, spec.input_size)
  tgt = tvm.target.Target(target)
  hw = auto_scheduler.HardwareParams(num_cores=num_cores or os.cpu_count(), target=tgt)
  tasks, weights = auto_scheduler.extract_tasks(mod["main"], params, tgt, hardware_params=hw)
  return list(tasks), [int(w) for w in weights]


def network_info_of(spec: NetworkSpec, tasks, weights) -> network_info.NetworkInfo:
  """The network's info in the layout ``tlp_jax.core.network_info`` reads."""
  return network_info.NetworkInfo(
    name=spec.name,
    batch_size=spec.batch_size,
    input_size=spec.input_size,
    tasks=tuple(
      network_info.NetworkTask(
        workload_key=t.workload_key,
        weight=int(w),
        flop_ct=float(t.compute_dag.flop_ct),
        desc=t.desc,
      )
      for t, w in zip(tasks, weights)
    ),
  )


def stage_tasks(config: CollectConfig, progress: bool = True) -> list:
  """Extracts the tasks of every network; writes network info; returns the unique tasks.

  Network info files that already exist are kept (resume); the tasks are still extracted since
  extraction is what registers the workloads for the dump and measure stages.
  """
  info_dir = os.path.join(config.out_dir, tenset.NETWORK_INFO_DIR)
  unique, seen = [], set()
  for spec in tqdm(config.networks, desc="extract tasks", disable=not progress):
    tasks, weights = extract_network_tasks(spec, config.target, config.num_cores)
    net = network_info_of(spec, tasks, weights)
    path = os.path.join(info_dir, network_info.json_file_name(net))
    if not os.path.exists(path):
      text = json.dumps(net.to_json_dict(), indent=1)
      atomic_file.write_atomically(path, lambda f, text=text: f.write(text))
    for t in tasks:
      key = (t.workload_key, str(t.target.kind))
      if key not in seen:
        seen.add(key)
        unique.append(t)

  # All tasks of the requested networks, whatever slice this run processes (rewritten every run,
  # atomically, so it always matches the network info).
  atomic_file.write_atomically(
    tenset.all_tasks_path(config.out_dir), lambda f: pickle.dump(unique, f), binary=True
  )
  logging.info("%d unique tasks from %d networks", len(unique), len(config.networks))
  return unique[config.start_idx : config.end_idx]


# ----------------------------------------------------------------------------------------------
# Stage 2: dump random programs.


def _seeded_random_model(seed: int):
  """A cost model with uniform random scores, like TVM's RandomModel but with its own RNG."""
  from tvm.auto_scheduler.cost_model.cost_model import PythonBasedModel

  class _SeededRandomModel(PythonBasedModel):
    def __init__(self):
      super().__init__()
      self.rng = np.random.default_rng(seed)

    def update(self, inputs, results):
      del inputs, results

    def predict(self, task, states):
      return self.rng.uniform(0, 1, len(states)).astype(np.float32)

  return _SeededRandomModel()


def _unless_all_invalid(fn):
  """``fn()``, or None when TVM finds every sampled state invalid.

  With a tiny population (a few programs per task) every state of one sampling round can fail
  bound inference; TVM then raises instead of returning nothing. That round counts as a
  fruitless retry, as in TenSet's loop, rather than aborting the whole collection.
  """
  tvm = tvm_import.require_tvm()
  try:
    return fn()
  except tvm.TVMError as e:
    if "All states are invalid" not in str(e):
      raise
    return None


def sample_programs(task, size: int, seed: int, max_retry_iter: int = 10) -> list:
  """TenSet's dump_programs sampling: up to ``size`` distinct states, shuffled (seeded)."""
  from tvm import auto_scheduler

  policy = auto_scheduler.SketchPolicy(
    task,
    program_cost_model=_seeded_random_model(seed),
    params={
      "evolutionary_search_num_iters": 1,
      "evolutionary_search_population": min(max(size, _MIN_POPULATION), 2560),
    },
    seed=seed,
    verbose=0,
  )
  states = _unless_all_invalid(policy.sample_initial_population)
  kept, seen = [], set()
  retry = 0
  while len(kept) < size and retry < max_retry_iter:
    before = len(kept)
    if states:
      states = _unless_all_invalid(lambda s=states: policy.evolutionary_search(s, len(s)))
      for s in states or ():
        key = str(s)
        if key not in seen:
          seen.add(key)
          kept.append(s)
          if len(kept) >= size:
            break
    if len(kept) == before:
      states = _unless_all_invalid(policy.sample_initial_population)
      retry += 1
    else:
      retry = 0
  kept = kept[:size]
  random.Random(seed).shuffle(kept)
  return kept


def dump_task(task, path: str, size: int, seed: int) -> int:
  """Writes ``size`` sampled programs of ``task`` to ``path`` (placeholder results)."""
  from tvm import auto_scheduler

  states = sample_programs(task, size, seed)
  inputs = [auto_scheduler.MeasureInput(task, s) for s in states]
  results = [auto_scheduler.MeasureResult([0.0], 0, "", 0, time.time()) for _ in states]
  atomic_file.write_path_atomically(
    path, lambda tmp: auto_scheduler.save_records(tmp, inputs, results)
  )
  return len(states)


def stage_dump(config: CollectConfig, tasks: Sequence, progress: bool = True) -> dict:
  """Dumps programs for every task without a to-measure file yet."""
  folder = os.path.join(config.out_dir, tenset.TO_MEASURE_DIR)
  done = skipped = programs = 0
  for task in tqdm(tasks, desc="dump programs", disable=not progress):
    path = os.path.join(folder, tenset.record_filename(task.workload_key, str(task.target.kind)))
    if os.path.exists(path):
      skipped += 1
      continue
    programs += dump_task(
      task, path, config.programs_per_task, task_seed(config.seed, task.workload_key)
    )
    done += 1
  return {"dumped_tasks": done, "already_dumped": skipped, "dumped_programs": programs}


# ----------------------------------------------------------------------------------------------
# Stage 3: measure.


def measure_target(config: CollectConfig) -> str:
  """The measurement target: the extraction target with ``-model=<hardware>``."""
  base = re.sub(r"\s*-model=\S+", "", config.target)
  return f"{base} -model={config.hardware}"


def measure_task(task, to_measure_path: str, out_path: str, config: CollectConfig) -> dict:
  """Builds and runs every program of ``to_measure_path``; writes ``out_path`` atomically."""
  tvm = tvm_import.require_tvm()
  from tvm import auto_scheduler

  inputs = list(auto_scheduler.RecordReader(to_measure_path).read_lines()[0])
  target = tvm.target.Target(measure_target(config))
  mtask = auto_scheduler.SearchTask(
    workload_key=task.workload_key,
    target=target,
    hardware_params=task.hardware_params,
    layout_rewrite_option=task.layout_rewrite_option,
  )
  builder = auto_scheduler.LocalBuilder(
    timeout=config.build_timeout, n_parallel=config.build_n_parallel or os.cpu_count()
  )
  runner = auto_scheduler.LocalRunner(
    timeout=config.run_timeout,
    number=1,
    repeat=repeat_for_flops(task.compute_dag.flop_ct),
    enable_cpu_cache_flush=True,
  )
  all_inputs, all_results = [], []
  for start in range(0, len(inputs), config.measure_batch_size):
    batch = [
      auto_scheduler.MeasureInput(mtask, inp.state)
      for inp in inputs[start : start + config.measure_batch_size]
    ]
    build_results = builder.build(batch, verbose=0)
    all_inputs.extend(batch)
    all_results.extend(runner.run(batch, build_results, verbose=0))
  atomic_file.write_path_atomically(
    out_path, lambda tmp: auto_scheduler.save_records(tmp, all_inputs, all_results)
  )
  errors = sum(int(r.error_no) != 0 for r in all_results)
  return {"programs": len(all_results), "errors": errors}


def stage_measure(config: CollectConfig, tasks: Sequence, progress: bool = True) -> dict:
  """Measures every dumped task that has no measure-record file yet."""
  src = os.path.join(config.out_dir, tenset.TO_MEASURE_DIR)
  dst = tenset.measure_records_dir(config.out_dir, config.hardware)
  summary = {
    "measured_tasks": 0,
    "already_measured": 0,
    "not_dumped": 0,
    "measured_programs": 0,
    "errors": 0,
  }
  bar = tqdm(tasks, desc=f"measure on {config.hardware}", disable=not progress)
  for task in bar:
    name = tenset.record_filename(task.workload_key, str(task.target.kind))
    out_path = os.path.join(dst, name)
    if os.path.exists(out_path):
      summary["already_measured"] += 1
      continue
    if not os.path.exists(os.path.join(src, name)):
      summary["not_dumped"] += 1
      continue
    r = measure_task(task, os.path.join(src, name), out_path, config)
    summary["measured_tasks"] += 1
    summary["measured_programs"] += r["programs"]
    summary["errors"] += r["errors"]
    bar.set_postfix(programs=summary["measured_programs"], errors=summary["errors"])
  return summary


STAGES = ("tasks", "dump", "measure")


def collect(config: CollectConfig, progress: bool = True) -> dict:
  """Runs the requested stages; returns a summary dict. Safe to re-run after interruption."""
  tvm_import.require_tvm()
  unknown = set(config.stages) - set(STAGES)
  if unknown:
    raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
  t0 = time.time()
  # Tasks are always extracted: it registers the workloads the other stages need.
  tasks = stage_tasks(config, progress)
  summary = {
    "tasks": len(tasks),
    "hardware": config.hardware,
    "measure_target": measure_target(config),
  }
  if "dump" in config.stages:
    summary.update(stage_dump(config, tasks, progress))
  if "measure" in config.stages:
    summary.update(stage_measure(config, tasks, progress))
  summary["seconds"] = round(time.time() - t0, 1)
  return summary


# ----------------------------------------------------------------------------------------------
# CLI.


def _define_flags():
  flags.DEFINE_string("out_dir", None, "TenSet-layout output root.", required=True)
  flags.DEFINE_list(
    "networks",
    list(DEFAULT_NETWORKS),
    f"NAME:BATCH:SIZE network specs; names: {', '.join(sorted(NETWORKS))}.",
  )
  flags.DEFINE_string(
    "hardware",
    None,
    "Hardware name (measure_records sub-folder, target "
    "-model). Default: derived from the CPU model.",
  )
  flags.DEFINE_string("target", None, "LLVM target. Default: llvm -mcpu=<host cpu>.")
  flags.DEFINE_integer("num_cores", None, "HardwareParams.num_cores (default: all CPUs).")
  flags.DEFINE_integer("programs_per_task", 48, "Programs sampled per task (TenSet: 4000).")
  flags.DEFINE_list("stages", list(STAGES), "Stages to run (tasks are always extracted).")
  flags.DEFINE_integer("start_idx", None, "First unique task (extraction order) to process.")
  flags.DEFINE_integer("end_idx", None, "One past the last unique task to process.")
  flags.DEFINE_integer("seed", 0, "Base sampling seed.")
  flags.DEFINE_integer("measure_batch_size", 64, "Programs built/run per batch.")


def main(argv: Iterable[str]) -> None:
  """CLI entry point (absl)."""
  del argv
  f = flags.FLAGS
  config = CollectConfig(
    out_dir=f.out_dir,
    networks=tuple(NetworkSpec.parse(s) for s in f.networks),
    hardware=f.hardware or default_hardware_name(),
    target=f.target or default_target(),
    num_cores=f.num_cores,
    programs_per_task=f.programs_per_task,
    stages=tuple(f.stages),
    start_idx=f.start_idx,
    end_idx=f.end_idx,
    seed=f.seed,
    measure_batch_size=f.measure_batch_size,
  )
  summary = collect(config)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
