"""Skeleton extraction CLI (needs TVM): the committed sample skeletons are what it writes."""

import json
import os

import pytest

from tlp_jax.core import skeleton as sk

pytest.importorskip("tvm")


def test_cli_writes_the_committed_sample_skeletons(tmp_path, sample_tenset_dir, run_python):
  out = str(tmp_path / "sk.json")
  proc = run_python(
    "-m",
    "tlp_jax.tvm.skeleton_extract",
    "--tenset_dir",
    sample_tenset_dir,
    "--out",
    out,
    env={"TOPHUB_LOCATION": "NONE"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "106 skeletons" in proc.stdout and "0 tasks failed" in proc.stdout
  got = sk.load_collection(out)
  committed = sk.tenset_skeletons_path(sample_tenset_dir)
  assert got == sk.load_collection(committed)
  # Byte-identical: the committed file is reproducible from all_tasks.pkl.
  with open(out, "rb") as a, open(committed, "rb") as b:
    assert a.read() == b.read()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging files


def test_cli_missing_all_tasks(tmp_path, run_python):
  proc = run_python("-m", "tlp_jax.tvm.skeleton_extract", "--tenset_dir", str(tmp_path))
  assert proc.returncode != 0
  assert "all_tasks.pkl: not found" in proc.stderr


@pytest.mark.parametrize("content", [b"not a pickle", b"\x80\x04\x95\x10\x00"])
def test_cli_bad_all_tasks_is_one_line(tmp_path, content, run_python):
  (tmp_path / "network_info").mkdir()
  (tmp_path / "network_info" / "all_tasks.pkl").write_bytes(content)
  proc = run_python("-m", "tlp_jax.tvm.skeleton_extract", "--tenset_dir", str(tmp_path))
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert "all_tasks.pkl: not a readable TVM SearchTask pickle" in lines[0]


def test_failed_tasks_are_listed(tmp_path):
  path = str(tmp_path / "sk.json")
  sk.save_collection(path, {}, failed={"k": "ValueError: scan op"})
  assert sk.load_collection(path) == {}
  assert sk.load_failed(path) == {"k": "ValueError: scan op"}
  with open(path) as f:
    assert json.load(f)["failed"] == {"k": "ValueError: scan op"}
