r"""TenSet scale end to end, as a user runs it: generate, build, train, eval, export, timed.

Each stage is the project's own command in its own process, one after the other:

1. ``python -m bench.make_tenset_scale`` writes a SYNTHETIC TenSet-layout folder of
   ``--records`` records for one platform from real records (``--source``);
2. ``python -m data_pipelines.build`` builds it (``--workers``, default all cores; the
   replicas of the source's hold-out networks held out);
3. ``python train.py --config configs/default.py`` trains ``--num_epochs`` epochs;
4. ``python eval.py`` evaluates the best checkpoint on the hold-out networks;
5. ``python -m tlp_jax.train.export`` writes the NumPy model.

For every stage: wall seconds, the peak resident memory of the stage's whole process tree (sum
over the processes, sampled every 0.2 s from /proc), the same without the pages of mapped files
(the staging files and the array cache are memory-mapped: page cache, not the stage's own
memory) and, on a GPU, the peak GPU memory in use
(``nvidia-smi``, sampled likewise; JAX's preallocation is turned off so the number is what the
run needs). Also the built dataset's bytes per example and a linear projection of each stage to
``--project_records`` (TenSet's 8.6M) records. Everything is labelled synthetic: the data are
copies of real records with jittered costs, so the top-k it prints measure nothing.

  python -m bench.end_to_end --source /work/shared/tenset-mini --work_dir /tmp/e2e \
      --records 1000000 --num_epochs 50 --out bench/results/end_to_end_<device>.json

On a machine whose calls are capped in time, ``--time_budget_s`` stops the running stage when
the call's budget is spent (its whole process tree), keeps what finished and exits 3; the same
command with ``--resume`` then skips the finished stages and reruns the stopped one: train.py
resumes from its last checkpoint, generation resumes its files, the build starts over (it
swaps complete datasets only). A stage's wall time and peak memory add up / take the maximum
over its attempts, and the JSON counts them, so a stopped-and-resumed run reports its restarts'
cost (start-up, loading, compiling, the steps since the last checkpoint) instead of hiding it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from absl import app, flags

from bench import common

_SOURCE = flags.DEFINE_string("source", "/work/shared/tenset-mini", "Real TenSet-layout folder.")
_SKELETONS = flags.DEFINE_string(
  "skeletons", "data/skeletons/tenset-mini.json", "Skeletons of --source."
)
_WORK = flags.DEFINE_string("work_dir", None, "Scratch folder (made; must be new).", required=True)
_RECORDS = flags.DEFINE_integer("records", 1_000_000, "Synthetic records of the platform.")
_TASKS = flags.DEFINE_integer("tasks", 0, "Tasks (0: make_tenset_scale's TenSet-shaped default).")
_EPOCHS = flags.DEFINE_integer("num_epochs", 50, "Training epochs (the default recipe's 50).")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Processes of generate/build.")
_SET = flags.DEFINE_multi_string("set", [], "Extra train.py --config.KEY=VALUE (KEY=VALUE).")
_PROJECT = flags.DEFINE_integer(
  "project_records", 8_600_000, "Records to project each stage's time to (linearly)."
)
_OUT = flags.DEFINE_string("out", None, "Results JSON.", required=True)
_BUDGET = flags.DEFINE_float(
  "time_budget_s",
  0.0,
  "Stop the running stage after this many seconds of this call, keep what finished, exit 3 "
  "(0 = no limit); continue with --resume.",
)
_RESUME = flags.DEFINE_bool(
  "resume",
  False,
  "Continue the run of --work_dir recorded in --out: skip its finished stages, rerun the "
  "stopped one (same flags required).",
)

STAGES = ("generate", "build", "train", "eval", "export")
# Exit status of a run stopped by --time_budget_s.
EXIT_STOPPED = 3
# What a resumed run must share with the run it continues.
_RUN_IDENTITY = ("records_requested", "num_epochs", "train_overrides", "tasks_requested")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children(pid: int) -> list[int]:
  """Every descendant of ``pid`` (from /proc's parent links)."""
  parents: dict[int, list[int]] = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/stat") as f:
        # The command name is in parentheses and may hold spaces: split after the last ')'.
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    parents.setdefault(ppid, []).append(int(name))
  out, todo = [], [pid]
  while todo:
    p = todo.pop()
    for c in parents.get(p, []):
      out.append(c)
      todo.append(c)
  return out


def _rss_bytes(pid: int) -> tuple[int, int]:
  """``(resident, resident and not file-backed or shared)`` bytes of process ``pid``.

  The second is the process's anonymous private memory. The first adds the pages of mapped
  files, such as the memory-mapped staging files and array cache (page cache the kernel can
  drop), and shared memory (which it cannot drop).
  """
  try:
    with open(f"/proc/{pid}/statm") as f:
      fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page
  except (OSError, IndexError, ValueError):
    return 0, 0


def _gpu_used_bytes() -> int | None:
  try:
    got = subprocess.run(
      ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
      capture_output=True,
      text=True,
      timeout=10,
    )
  except (OSError, subprocess.TimeoutExpired):
    return None
  if got.returncode:
    return None
  return sum(int(x) for x in got.stdout.split()) * 2**20


def _kill_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
  """SIGTERM to the stage's process group, SIGKILL after ``grace_s`` if it is still running."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=grace_s)
      return
    except subprocess.TimeoutExpired:
      continue


def run_stage(
  name: str, cmd: list[str], env: dict[str, str], deadline: float | None = None
) -> dict:
  """Runs one stage, sampling its process tree's memory; raises on a non-zero exit. At
  ``deadline`` (a ``time.perf_counter()`` value) the stage is stopped and returned with
  ``completed`` False."""
  print(f"== {name}: {' '.join(cmd)}", flush=True)
  gpu_base = _gpu_used_bytes()
  start = time.perf_counter()
  # Its own session: a stop reaches every process the stage started (the build's workers).
  proc = subprocess.Popen(
    cmd,
    cwd=_REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  peak = {"rss": 0, "private": 0, "gpu": 0, "processes": 0}
  stop = threading.Event()
  stopped = threading.Event()

  def sample():
    while not stop.is_set():
      pids = [proc.pid] + _children(proc.pid)
      sizes = [_rss_bytes(p) for p in pids]
      peak["rss"] = max(peak["rss"], sum(r for r, _ in sizes))
      peak["private"] = max(peak["private"], sum(a for _, a in sizes))
      peak["processes"] = max(peak["processes"], len(pids))
      gpu = _gpu_used_bytes() if gpu_base is not None else None
      if gpu is not None:
        peak["gpu"] = max(peak["gpu"], gpu - gpu_base)
      if deadline is not None and time.perf_counter() >= deadline and not stopped.is_set():
        stopped.set()
        print(f"== {name}: time budget spent, stopping the stage", flush=True)
        _kill_tree(proc)
      stop.wait(0.2)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  tail: list[str] = []
  try:
    for line in proc.stdout:
      text = line.decode(errors="replace").rstrip()
      tail = (tail + [text])[-40:]
      print(f"  {text}", flush=True)
  except BaseException:  # Ctrl-C here: the stage's own session does not get the terminal's
    _kill_tree(proc)
    raise
  rc = proc.wait()
  stop.set()
  sampler.join()
  wall = time.perf_counter() - start
  if rc and not stopped.is_set():
    raise RuntimeError(f"stage {name} failed with exit {rc}:\n" + "\n".join(tail))
  row = {
    "stage": name,
    "wall_s": wall,
    "completed": not stopped.is_set(),
    "attempts": 1,
    "peak_rss_bytes": peak["rss"],
    # Without the pages of mapped files (the staging files, the array cache) and of shared
    # memory: the stage's anonymous private memory.
    "peak_private_bytes": peak["private"],
    "peak_processes": peak["processes"],
    "peak_gpu_bytes": peak["gpu"] if gpu_base is not None else None,
    "output_tail": tail[-8:],
  }
  state = "done" if row["completed"] else "stopped"
  print(
    f"== {name}: {state} after {wall:.1f} s, peak RSS {peak['rss'] / 2**30:.2f} GiB "
    f"({peak['private'] / 2**30:.2f} GiB without mapped files)",
    flush=True,
  )
  return row


def merge_attempts(earlier: dict, row: dict) -> dict:
  """One stage's row over two attempts: wall times and attempts add up, peaks take the maximum,
  the output is the latest attempt's."""
  out = dict(row)
  out["wall_s"] = earlier["wall_s"] + row["wall_s"]
  out["attempts"] = earlier.get("attempts", 1) + row["attempts"]
  for key in ("peak_rss_bytes", "peak_private_bytes", "peak_processes", "peak_gpu_bytes"):
    values = [v for v in (earlier.get(key), row.get(key)) if v is not None]
    out[key] = max(values) if values else None
  return out


def load_prior(path: str, identity: dict) -> tuple[dict[str, dict], dict]:
  """The rows by stage and the facts of the run ``--resume`` continues (its results JSON).

  Raises:
    app.UsageError: no such file, or a run of other flags.
  """
  if not os.path.exists(path):
    raise app.UsageError(f"--resume: {path} does not exist (nothing to resume)")
  with open(path) as f:
    prior = json.load(f)
  differs = [k for k in _RUN_IDENTITY if prior.get(k) != identity[k]]
  if differs:
    shown = ", ".join(f"{k}: {prior.get(k)!r} -> {identity[k]!r}" for k in differs)
    raise app.UsageError(f"--resume: {path} was a run of other flags ({shown})")
  rows = {row["stage"]: row for row in prior.get("stages", [])}
  facts = {
    k: prior[k]
    for k in (
      "records",
      "tasks",
      "platform",
      "built_dataset_bytes",
      "built_dataset_bytes_per_record",
    )
    if k in prior
  }
  return rows, facts


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  work = os.path.abspath(_WORK.value)
  identity = {
    "records_requested": _RECORDS.value,
    "num_epochs": _EPOCHS.value,
    "train_overrides": list(_SET.value),
    "tasks_requested": _TASKS.value,
  }
  if _RESUME.value:
    if not os.path.isdir(work):
      raise app.UsageError(f"--resume: {work} does not exist")
    prior, facts = load_prior(_OUT.value, identity)
  else:
    os.makedirs(work, exist_ok=False)
    prior, facts = {}, {}
  deadline = time.perf_counter() + _BUDGET.value if _BUDGET.value > 0 else None
  tenset_dir, data_dir = os.path.join(work, "tenset"), os.path.join(work, "data")
  run_dir, model = os.path.join(work, "run"), os.path.join(work, "model.npz")
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  py = sys.executable
  stages: list[dict] = []

  def save() -> None:
    """Writes what is known so far: a run stopped at its time budget keeps its finished stages."""
    records = facts.get("records", _RECORDS.value)
    scale = _PROJECT.value / max(records, 1)
    total = sum(s["wall_s"] for s in stages)
    # The exported model's size does not depend on the records; every other stage reads them all.
    projected = {s["stage"]: s["wall_s"] * (1 if s["stage"] == "export" else scale) for s in stages}
    done = [s["stage"] for s in stages if s.get("completed", True)]
    common.write_json(
      _OUT.value,
      {
        "what": "SYNTHETIC data (bench.make_tenset_scale): stage times and memory; accuracy "
        "numbers of this run measure nothing",
        "machine": common.machine_info(gpu=common.gpu_name()),
        **identity,
        "workers": _WORKERS.value,
        **facts,
        "stages": stages,
        "complete": done == list(STAGES),
        "attempts": sum(s.get("attempts", 1) for s in stages),
        "total_wall_s": total,
        "projection": {
          "records": _PROJECT.value,
          "assumes": "every stage but export scales linearly with the record count",
          "stage_s": projected,
          "total_s": sum(projected.values()),
        },
      },
      announce=False,
    )

  def stage(name: str, cmd: list[str]) -> None:
    earlier = prior.get(name)
    if earlier is not None and earlier.get("completed", True):
      print(f"== {name}: finished by an earlier call ({earlier['wall_s']:.1f} s)", flush=True)
      stages.append(earlier)
      return
    row = run_stage(name, cmd, env, deadline)
    stages.append(merge_attempts(earlier, row) if earlier is not None else row)
    save()
    if not row["completed"]:
      print(
        f"stopped at the time budget ({_BUDGET.value:.0f} s) during {name}; rerun the same "
        "command with --resume to continue",
        flush=True,
      )
      raise SystemExit(EXIT_STOPPED)

  gen = [
    py,
    "-m",
    "bench.make_tenset_scale",
    f"--source={_SOURCE.value}",
    f"--out_dir={tenset_dir}",
    f"--records={_RECORDS.value}",
    f"--skeletons={_SKELETONS.value}",
    f"--workers={_WORKERS.value}",
  ]
  if _TASKS.value:
    gen.append(f"--tasks={_TASKS.value}")
  stage("generate", gen)
  with open(os.path.join(tenset_dir, "synthetic.json")) as f:
    manifest = json.load(f)
  hw = manifest["platforms"][0]
  facts.update(records=manifest["records_per_platform"], tasks=manifest["tasks"], platform=hw)
  stage(
    "build",
    [
      py,
      "-m",
      "data_pipelines.build",
      f"--tenset_dir={tenset_dir}",
      f"--data_dir={data_dir}",
      f"--holdout={manifest['holdout_flag']}",
      f"--workers={_WORKERS.value}",
    ],
  )
  facts["built_dataset_bytes"] = _dir_bytes(data_dir)
  facts["built_dataset_bytes_per_record"] = facts["built_dataset_bytes"] / max(facts["records"], 1)
  stage(
    "train",
    [
      py,
      "train.py",
      "--config=configs/default.py",
      f"--workdir={run_dir}",
      f"--config.data_dir={data_dir}",
      f"--config.dataset={hw}",
      f"--config.num_epochs={_EPOCHS.value}",
    ]
    + [f"--config.{kv}" for kv in _SET.value],
  )
  stage(
    "eval",
    [
      py,
      "eval.py",
      f"--hw={hw}",
      f"--data_dir={data_dir}",
      f"--dataset={hw}",
      f"--workdir={run_dir}",
      f"--out={os.path.join(work, 'eval')}",
    ],
  )
  stage("export", [py, "-m", "tlp_jax.train.export", f"--workdir={run_dir}", f"--out={model}"])
  facts["model_bytes"] = os.path.getsize(model)
  save()
  print(f"wrote {_OUT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)
