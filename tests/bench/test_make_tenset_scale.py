"""bench.make_tenset_scale at tiny N, from the embedded sample's real records."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from bench import make_tenset_scale as scale
from tlp_jax.core import network_info, records, tenset
from tlp_jax.core import skeleton as skeleton_lib

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "data", "sample", "tenset-mini")


def _params(**kw) -> scale.Params:
  base = dict(
    source=os.path.abspath(SAMPLE),
    source_hardware="epyc-9004",
    records=230,
    platforms=2,
    tasks=7,
    jitter=0.1,
    platform_jitter=0.2,
    seed=0,
    skeletons=True,
  )
  base.update(kw)
  return scale.Params(**base)


def _tree_bytes(root: str) -> dict[str, bytes]:
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
  return out


def test_counts_keys_skeletons_and_labels(tmp_path):
  out = str(tmp_path / "scale")
  m = scale.make_tenset_scale(_params(), out)
  assert m["synthetic"] and m["records_per_platform"] == 230 and m["tasks"] == 7
  assert m["platforms"] == ["synthetic0-epyc-9004", "synthetic1-epyc-9004"]
  assert os.path.exists(os.path.join(out, scale.MARKER))
  src_tasks, _ = scale.read_source(os.path.abspath(SAMPLE), "epyc-9004")
  src_keys = {t.workload_key for t in src_tasks}
  with open(os.path.join(out, skeleton_lib.TENSET_SKELETONS_FILE)) as f:
    skel = json.load(f)
  assert skel["synthetic"] is True
  per_platform = {}
  for hw in m["platforms"]:
    files = tenset.task_files(out, hw)
    assert len(files) == 7
    n, keys = 0, set()
    for path in files:
      tf = records.read_task_file(path)
      assert tf.hardware == hw  # the target's -model= names the synthetic platform
      assert tf.workload_key not in src_keys
      assert os.path.basename(path) == tenset.record_filename(tf.workload_key)
      # The skeleton is the source task's (same shapes), under the new key.
      sk = skel["skeletons"][tf.workload_key]
      assert sk["workload_key"] == tf.workload_key
      assert json.loads(tf.workload_key)[1:] in [json.loads(k)[1:] for k in src_keys]
      n += tf.stats.lines
      keys.add(tf.workload_key)
    per_platform[hw] = (n, keys)
  (n0, k0), (n1, k1) = per_platform.values()
  assert n0 == n1 == 230 and k0 == k1  # same tasks on every platform, as TenSet
  # Network info: parses, is marked, lists only output keys, and the hold-out flag resolves.
  nets = network_info.load_network_infos(out)
  assert nets and all(n.name.rsplit("-syn", 1)[1].isdigit() for n in nets)
  listed = set().union(*(n.workload_keys for n in nets))
  assert listed <= k0
  with open(nets[0].path) as f:
    assert json.load(f)["synthetic"] is True
  if m["holdout_flag"]:
    network_info.select_holdout(nets, m["holdout_flag"].split(","))


def test_costs_jittered_deterministic_and_platforms_differ(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  scale.make_tenset_scale(_params(), a)
  scale.make_tenset_scale(_params(), b)
  assert _tree_bytes(a) == _tree_bytes(b)
  c = str(tmp_path / "c")
  scale.make_tenset_scale(_params(seed=1), c)
  assert _tree_bytes(a) != _tree_bytes(c)
  # Same programs, different costs on the two platforms; the jitter is small.
  p0, p1 = (tenset.task_files(a, f"synthetic{p}-epyc-9004")[0] for p in (0, 1))
  t0, t1 = records.read_task_file(p0), records.read_task_file(p1)
  np.testing.assert_array_equal(t0.program_keys, t1.program_keys)
  assert not np.allclose(t0.costs, t1.costs)
  ratio = t0.costs / t1.costs
  assert np.all((ratio > 0.2) & (ratio < 5))


def test_failed_records_copied_unchanged():
  src = scale.SourceTask(
    workload_key='["abc", [1, 2]]',
    records=(
      scale.SourceRecord(
        i=[['["abc", [1, 2]]', "llvm -model=x"], [[], []]], costs=[1e10], rest=[4, 0.5, 7]
      ),
      scale.SourceRecord(
        i=[['["abc", [1, 2]]', "llvm -model=x"], [[], []]], costs=[2.0, 4.0], rest=[0, 0.5, 7]
      ),
    ),
  )
  text = scale.task_lines(_params(), src, 0, '["def", [1, 2]]', 0, "synthetic0-x", 4).decode()
  lines = [json.loads(ln) for ln in text.splitlines()]
  assert len(lines) == 4
  assert lines[0]["r"] == [[1e10], 4, 0.5, 7] and lines[2]["r"] == [[1e10], 4, 0.5, 7]
  assert lines[1]["i"][0] == ['["def", [1, 2]]', "llvm -model=synthetic0-x"]
  c1, c3 = lines[1]["r"][0], lines[3]["r"][0]
  assert c1 != [2.0, 4.0] and c1[1] / c1[0] == pytest.approx(2.0)  # one factor per record
  assert c1 != c3  # repeats of a program get their own jitter


def test_resume_keeps_finished_files_and_refuses_other_params(tmp_path):
  out = str(tmp_path / "scale")
  scale.make_tenset_scale(_params(), out)
  full = _tree_bytes(out)
  victim = tenset.task_files(out, "synthetic1-epyc-9004")[3]
  os.remove(victim)
  m = scale.make_tenset_scale(_params(), out)
  assert m["run"]["task_files_kept_from_earlier_run"] == 13
  assert _tree_bytes(out) == full
  with pytest.raises(scale.ScaleError, match="other parameters"):
    scale.make_tenset_scale(_params(records=231), out)


def test_missing_skeletons_is_a_clear_error(tmp_path):
  with pytest.raises(scale.ScaleError, match="skeleton_extract"):
    scale.make_tenset_scale(_params(), str(tmp_path / "o"), str(tmp_path / "nope.json"))
  m = scale.make_tenset_scale(_params(skeletons=False), str(tmp_path / "o2"))
  assert m["skeletons"] is None
  assert not os.path.exists(str(tmp_path / "o2" / skeleton_lib.TENSET_SKELETONS_FILE))


def test_tasks_zero_uses_each_source_record_once_per_copy(tmp_path):
  src_tasks, _ = scale.read_source(os.path.abspath(SAMPLE), "epyc-9004")
  total = sum(len(t.records) for t in src_tasks)
  p = dataclasses.replace(_params(), tasks=0, records=total + 5, platforms=1)
  counts = scale.task_record_counts(p, src_tasks)
  assert sum(counts) == total + 5 and len(counts) == len(src_tasks) + 1
  assert counts[: len(src_tasks)] == [len(t.records) for t in src_tasks]


def test_workers_write_the_same_bytes(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  scale.make_tenset_scale(_params(), a, workers=1)
  scale.make_tenset_scale(_params(), b, workers=2)
  assert _tree_bytes(a) == _tree_bytes(b)


def test_command_line_writes_and_errors_in_one_line(tmp_path):
  import subprocess
  import sys

  repo = os.path.join(os.path.dirname(__file__), "..", "..")
  env = dict(os.environ, PYTHONPATH=os.path.abspath(repo))
  base = [sys.executable, "-m", "bench.make_tenset_scale", "--source", os.path.abspath(SAMPLE)]
  ok = subprocess.run(
    base + ["--out_dir", str(tmp_path / "o"), "--records", "50", "--tasks", "3"],
    capture_output=True,
    text=True,
    env=env,
    cwd=repo,
  )
  assert ok.returncode == 0, ok.stderr
  assert "SYNTHETIC" in ok.stdout and "--holdout" in ok.stdout
  bad = subprocess.run(
    base + ["--out_dir", str(tmp_path / "b"), "--skeletons", str(tmp_path / "none.json")],
    capture_output=True,
    text=True,
    env=env,
    cwd=repo,
  )
  assert bad.returncode != 0
  assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
