"""bench/end_to_end.py: the time budget stops a stage's whole process tree, and --resume
continues a stopped run (stages faked; the real stages are each tested on their own).

Each check runs in its own process: the bench's absl flags share names with other benches'
(``--skeletons``, ``--workers``), and one process can define a name only once."""

import json
import os
import subprocess

from tests.pyproc import run_python

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(code: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(env_extra or {})
  return run_python(code, *args, cwd=REPO, env=env)


def test_the_time_budget_stops_the_stage_and_its_children(tmp_path):
  got = _python(
    """
    import json, os, sys, time
    from bench import end_to_end as e2e
    # A stage that starts a grandchild (which records its pid), then sleeps.
    sleeper = (
      "import subprocess, sys, time\\n"
      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\\n"
      "open(sys.argv[1], 'w').write(str(child.pid))\\n"
      "print('started', flush=True)\\n"
      "time.sleep(60)\\n"
    )
    t0 = time.perf_counter()
    row = e2e.run_stage("sleep", [sys.executable, "-c", sleeper, sys.argv[1]], dict(os.environ),
                        t0 + 2.0)
    grandchild = int(open(sys.argv[1]).read())
    def alive(pid):
      try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
      except FileNotFoundError:
        return False
    for _ in range(50):
      if not alive(grandchild):
        break
      time.sleep(0.1)
    ok = e2e.run_stage("ok", [sys.executable, "-c", "print('hi')"], dict(os.environ))
    try:
      e2e.run_stage("bad", [sys.executable, "-c", "raise SystemExit(4)"], dict(os.environ))
      failed = ""
    except RuntimeError as e:
      failed = str(e)
    a = {"wall_s": 5.0, "attempts": 1, "peak_rss_bytes": 7, "peak_gpu_bytes": None}
    b = dict(wall_s=2.5, attempts=1, peak_rss_bytes=3, peak_gpu_bytes=9, completed=True)
    print(json.dumps({"row": row, "grandchild_alive": alive(grandchild), "ok": ok,
                      "failed": failed, "merged": e2e.merge_attempts(a, b)}))
    """,
    str(tmp_path / "pid"),
  )
  assert got.returncode == 0, got.stderr
  out = json.loads(got.stdout.strip().splitlines()[-1])
  row = out["row"]
  assert not row["completed"] and row["attempts"] == 1 and "started" in row["output_tail"]
  assert 2.0 <= row["wall_s"] < 30 and not out["grandchild_alive"]
  assert out["ok"]["completed"] and out["ok"]["output_tail"] == ["hi"]
  assert out["failed"].startswith("stage bad failed with exit 4")
  merged = out["merged"]
  assert merged["wall_s"] == 7.5 and merged["attempts"] == 2 and merged["completed"]
  assert merged["peak_rss_bytes"] == 7 and merged["peak_gpu_bytes"] == 9


# Runs the bench's main with faked stages: each writes what the next one reads; a stage named
# in STOP (an environment variable) is stopped at its first attempt (remembered in a file).
_DRIVER = """
import json, os, sys
from absl import app, flags
from bench import end_to_end as e2e

stop = set(filter(None, os.environ.get("STOP", "").split(",")))
seen_file = os.environ["SEEN"]

def arg(cmd, name):
  return next(c.split("=", 1)[1] for c in cmd if c.startswith(f"--{name}="))

def fake(name, cmd, env, deadline=None):
  with open(seen_file, "a") as f:
    f.write(name + "\\n")
  if name == "generate":
    out = arg(cmd, "out_dir")
    os.makedirs(out, exist_ok=True)
    manifest = {"platforms": ["syn"], "records_per_platform": 100, "tasks": 3,
                "holdout_flag": "a@1"}
    json.dump(manifest, open(os.path.join(out, "synthetic.json"), "w"))
  elif name == "build":
    os.makedirs(arg(cmd, "data_dir"), exist_ok=True)
    open(os.path.join(arg(cmd, "data_dir"), "x"), "wb").write(b"12345")
  elif name == "export":
    open(arg(cmd, "out"), "wb").write(b"npz")
  return {"stage": name, "wall_s": 1.0, "completed": name not in stop, "attempts": 1,
          "peak_rss_bytes": 10, "peak_processes": 1, "peak_gpu_bytes": None, "output_tail": []}

e2e.run_stage = fake
try:
  flags.FLAGS(sys.argv)
  e2e.main(sys.argv[:1])
except app.UsageError as e:
  print(f"usage: {e}")
  raise SystemExit(2)
"""


def _drive(tmp_path, argv, stop=""):
  seen_file = tmp_path / "seen"
  got = _python(_DRIVER, *argv, env_extra={"SEEN": str(seen_file), "STOP": stop})
  seen = seen_file.read_text().split() if seen_file.exists() else []
  return got, seen


def test_a_stopped_run_resumes_where_it_stopped(tmp_path):
  out = tmp_path / "e2e.json"
  argv = [f"--work_dir={tmp_path / 'w'}", f"--out={out}", "--records=100", "--time_budget_s=60"]
  got, seen = _drive(tmp_path, argv, stop="train")
  assert got.returncode == 3, got.stderr
  assert (
    seen == ["generate", "build", "train"] and "rerun the same command with --resume" in got.stdout
  )
  first = json.loads(out.read_text())
  assert not first["complete"] and [s["completed"] for s in first["stages"]] == [True, True, False]
  # Without --resume the existing work dir is refused; with other flags the run is refused.
  got, _ = _drive(tmp_path, argv)
  assert got.returncode != 0 and "FileExistsError" in got.stderr
  got, _ = _drive(tmp_path, [*argv, "--resume", "--num_epochs=3"])
  assert got.returncode == 2 and "num_epochs: 50 -> 3" in got.stdout
  got, seen = _drive(tmp_path, [*argv, "--resume"])
  assert got.returncode == 0, got.stderr
  assert seen[3:] == ["train", "eval", "export"]
  done = json.loads(out.read_text())
  assert done["complete"] and [s["stage"] for s in done["stages"]] == [
    "generate",
    "build",
    "train",
    "eval",
    "export",
  ]
  train = done["stages"][2]
  assert train["attempts"] == 2 and train["wall_s"] == 2.0 and train["completed"]
  assert done["attempts"] == 6 and done["total_wall_s"] == 6.0
  assert done["records"] == 100 and done["built_dataset_bytes"] == 5 and done["model_bytes"] == 3


def test_resume_needs_an_earlier_run(tmp_path):
  got, _ = _drive(tmp_path, [f"--work_dir={tmp_path}", f"--out={tmp_path / 'no.json'}", "--resume"])
  assert got.returncode == 2 and "does not exist (nothing to resume)" in got.stdout


def test_peak_memory_tells_own_memory_from_mapped_files(tmp_path):
  """A stage that reads a 256 MiB file through a memory map shows it in its RSS but not in its
  private memory; one that fills 256 MiB of its own memory shows it in both."""
  data = tmp_path / "mapped.bin"
  data.write_bytes(b"\1" * (256 * 2**20))
  got = _python(
    """
    import json, os, sys
    from bench import end_to_end as e2e
    hold = "import time\\ntime.sleep(1.0)\\n"
    mapped = (
      "import numpy as np, sys\\n"
      "m = np.memmap(sys.argv[1], mode='r')\\n"
      "assert int(m.sum(dtype=np.int64)) == m.size\\n" + hold
    )
    own = "import numpy as np\\nx = np.ones(256 * 2**20, np.uint8)\\n" + hold
    rows = {name: e2e.run_stage(name, [sys.executable, "-c", code, sys.argv[1]], dict(os.environ))
            for name, code in (("mapped", mapped), ("own", own))}
    print(json.dumps({k: [r["peak_rss_bytes"], r["peak_private_bytes"]] for k, r in rows.items()}))
    """,
    str(data),
  )
  assert got.returncode == 0, got.stderr
  out = json.loads(got.stdout.strip().splitlines()[-1])
  mib = 2**20
  (mapped_rss, mapped_private), (own_rss, own_private) = out["mapped"], out["own"]
  assert mapped_rss > 200 * mib and mapped_private < mapped_rss - 200 * mib
  assert own_rss > 200 * mib and own_private > 200 * mib
