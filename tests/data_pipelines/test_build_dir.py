"""All-or-nothing builds: a failed or killed build never touches the datasets in place."""

import glob
import json
import os
import re
import shutil
import signal
import textwrap

import pytest

from data_pipelines import build_dir, schema, tenset_tfds


def _snapshot(data_dir):
  """{relative path: bytes} of every file under data_dir/tenset (the datasets in place)."""
  out = {}
  root = os.path.join(data_dir, schema.BUILDER_NAME)
  for path in sorted(glob.glob(os.path.join(root, "**"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, data_dir)] = f.read()
  return out


def _failing_copy(sample_tenset_dir, dst, hardware):
  """A copy of the sample whose records of ``hardware`` all carry error code 4."""
  shutil.copytree(sample_tenset_dir, dst)
  for path in glob.glob(os.path.join(dst, "measure_records", hardware, "*.json")):
    with open(path) as f:
      text = f.read()
    with open(path, "w") as f:
      f.write(re.sub(r'("r": \[\[[^\]]*\]), 0,', r"\1, 4,", text))
  return str(dst)


@pytest.fixture
def built_copy(tmp_path, built_sample_dataset):
  data_dir = str(tmp_path / "data")
  shutil.copytree(built_sample_dataset, data_dir)
  return data_dir


def _leftovers(data_dir):
  return [n for n in os.listdir(data_dir) if n.startswith(build_dir.STAGING_PREFIX)] + glob.glob(
    os.path.join(data_dir, "**", "incomplete.*"), recursive=True
  )


def test_failed_rebuild_keeps_the_previous_datasets(tmp_path, sample_tenset_dir, built_copy):
  before = _snapshot(built_copy)
  bad = _failing_copy(sample_tenset_dir, tmp_path / "bad", "epyc-9004")
  with pytest.raises(tenset_tfds.DatasetBuildError, match="epyc-9004: no valid measurement"):
    tenset_tfds.build(bad, built_copy, tenset_tfds.make_configs(sample_tenset_dir))
  assert _snapshot(built_copy) == before
  assert not _leftovers(built_copy)


def test_failure_in_a_later_config_swaps_in_nothing(tmp_path, sample_tenset_dir, built_copy):
  # epyc-9004 builds fine from the changed copy, xeon-emr-16c fails: the data dir must not
  # end up with the new epyc-9004 beside the old xeon-emr-16c and all (two builds mixed).
  before = _snapshot(built_copy)
  bad = _failing_copy(sample_tenset_dir, tmp_path / "bad", "xeon-emr-16c")
  cfgs = tenset_tfds.make_configs(bad, seed=3)
  with pytest.raises(tenset_tfds.DatasetBuildError, match="xeon-emr-16c: no valid measurement"):
    tenset_tfds.build(bad, built_copy, cfgs)
  assert _snapshot(built_copy) == before
  assert not _leftovers(built_copy)


def _fake_dataset(data_dir, config, content):
  ds = schema.dataset_dir(data_dir, config)
  os.makedirs(ds)
  with open(os.path.join(ds, "dataset_info.json"), "w") as f:
    f.write(content)


def _content(data_dir, config):
  with open(os.path.join(schema.dataset_dir(data_dir, config), "dataset_info.json")) as f:
    return f.read()


def test_commit_replaces_configs_and_leaves_others(tmp_path):
  data_dir = str(tmp_path / "data")
  _fake_dataset(data_dir, "a", "old a")
  _fake_dataset(data_dir, "b", "old b")
  with build_dir.StagedBuild(data_dir) as sb:
    _fake_dataset(sb.out_dir, "a", "new a")
    _fake_dataset(sb.out_dir, "c", "new c")
    assert _content(data_dir, "a") == "old a"  # nothing in place changes before the commit
    sb.commit(["a", "c"])
  assert [_content(data_dir, c) for c in "abc"] == ["new a", "old b", "new c"]
  assert not _leftovers(data_dir)


def test_error_before_commit_changes_nothing(tmp_path):
  data_dir = str(tmp_path / "data")
  _fake_dataset(data_dir, "a", "old a")
  with pytest.raises(RuntimeError, match="boom"), build_dir.StagedBuild(data_dir) as sb:
    _fake_dataset(sb.out_dir, "a", "new a")
    raise RuntimeError("boom")
  assert _content(data_dir, "a") == "old a"
  assert not _leftovers(data_dir)


def test_interrupted_swap_is_rolled_forward(tmp_path):
  """A build killed between its COMPLETE marker and the end of the swap is finished, so the
  configs of one build end up together."""
  data_dir = str(tmp_path / "data")
  for c in "ab":
    _fake_dataset(data_dir, c, f"old {c}")
  staging = os.path.join(data_dir, build_dir.STAGING_PREFIX + "killed")
  for c in "ab":
    _fake_dataset(staging, c, f"new {c}")
  with open(os.path.join(staging, build_dir.COMPLETE_FILE), "w") as f:
    json.dump({"configs": ["a", "b"]}, f)
  # Killed after moving "a": its old version is parked, the new one in place.
  build_dir._swap_in(staging, data_dir, ["a"])
  assert _content(data_dir, "a") == "new a" and _content(data_dir, "b") == "old b"
  with build_dir.build_lock(data_dir):
    cleaned = build_dir.clean_leftovers(data_dir)
  assert cleaned == [staging]
  assert [_content(data_dir, c) for c in "ab"] == ["new a", "new b"]
  assert not _leftovers(data_dir)


def test_leftovers_of_killed_builds_are_removed(tmp_path):
  data_dir = str(tmp_path / "data")
  _fake_dataset(data_dir, "a", "old a")
  junk = [
    os.path.join(data_dir, "staging_x1y2"),  # no COMPLETE: an unfinished build
    os.path.join(data_dir, "tenset", "a", "incomplete.ABC123_1.0.0"),  # TFDS in place
    os.path.join(data_dir, "tenset", "b", "incomplete.XYZ789_1.0.0"),
  ]
  for d in junk:
    os.makedirs(os.path.join(d, "deep"))
    with open(os.path.join(d, "deep", "shard"), "wb") as f:
      f.write(b"x" * 1000)
  stray = os.path.join(schema.dataset_dir(data_dir, "a"), "incomplete.0123abcd.metadata.json")
  with open(stray, "w") as f:
    f.write("{")
  with build_dir.StagedBuild(data_dir) as sb:
    assert not any(os.path.exists(p) for p in junk + [stray])
    assert os.path.isdir(sb.staging)
  assert _content(data_dir, "a") == "old a"
  assert not _leftovers(data_dir)


def test_second_build_in_the_same_data_dir_is_refused(tmp_path):
  data_dir = str(tmp_path / "data")
  with build_dir.StagedBuild(data_dir) as sb:
    with pytest.raises(build_dir.BuildDirError, match="another build is running"):
      build_dir.StagedBuild(data_dir).__enter__()
    assert os.path.isdir(sb.staging)  # the refused build did not clean the running one's
  with build_dir.StagedBuild(data_dir):  # released: a later build goes ahead
    pass


_KILL_SCRIPT = textwrap.dedent("""
  import os, signal, sys
  from data_pipelines import build_dir, tenset_tfds
  tenset_dir, data_dir, point = sys.argv[1:4]

  def die():
    os.kill(os.getpid(), signal.SIGKILL)

  if point == "reading":  # half-way through reading epyc-9004's task files
    real_read = tenset_tfds.records_lib.read_task_file
    calls = []
    def read(*args, **kwargs):
      calls.append(1)
      if len(calls) == 50:
        die()
      return real_read(*args, **kwargs)
    tenset_tfds.records_lib.read_task_file = read
  elif point == "writing":  # writing the first shard: TFDS incomplete folders exist
    def write(job):
      die()
    tenset_tfds.shard_writer.write_shard = write
  elif point == "between_configs":  # epyc-9004 complete in staging, xeon-emr-16c not begun
    real_prepare = tenset_tfds.Tenset._download_and_prepare
    def prepare(self, *args, **kwargs):
      if self.builder_config.name == "xeon-emr-16c":
        die()
      return real_prepare(self, *args, **kwargs)
    tenset_tfds.Tenset._download_and_prepare = prepare
  elif point == "swapping":  # COMPLETE written, epyc-9004 swapped in, xeon-emr-16c not yet
    real_swap = build_dir._swap_in
    def swap(staging, data_dir, names):
      real_swap(staging, data_dir, names[:1])
      die()
    build_dir._swap_in = swap
  cfgs = tenset_tfds.make_configs(
    tenset_dir, hardware=["epyc-9004", "xeon-emr-16c"], multi=False, seed=5, loop_tokens="off"
  )
  tenset_tfds.build(tenset_dir, data_dir, cfgs)
""")


def _seed(data_dir, config):
  with open(os.path.join(schema.dataset_dir(data_dir, config), schema.METADATA_FILE)) as f:
    return json.load(f)["seed"]


@pytest.mark.parametrize("point", ["reading", "writing", "between_configs", "swapping"])
def test_sigkilled_build_leaves_old_data_and_next_build_cleans(
  tmp_path, sample_tenset_dir, built_copy, point, run_python
):
  before = _snapshot(built_copy)
  proc = run_python("-c", _KILL_SCRIPT, sample_tenset_dir, built_copy, point)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert _leftovers(built_copy)  # the killed build left its staging folder behind
  if point != "swapping":
    assert _snapshot(built_copy) == before  # the datasets in place are untouched
    with build_dir.StagedBuild(built_copy):  # what the next build does first
      pass
    assert not _leftovers(built_copy)
    assert _snapshot(built_copy) == before
    return
  # Killed half-way through the swap of a complete build: the next build finishes it, so the
  # two configs of the killed build end up together (and "all", which it did not build, stays).
  assert _seed(built_copy, "epyc-9004") == 5 and _seed(built_copy, "xeon-emr-16c") == 0
  with build_dir.StagedBuild(built_copy):
    pass
  assert not _leftovers(built_copy)
  assert _seed(built_copy, "epyc-9004") == 5 and _seed(built_copy, "xeon-emr-16c") == 5
  after = _snapshot(built_copy)
  assert {k: v for k, v in after.items() if "/all/" in k} == {
    k: v for k, v in before.items() if "/all/" in k
  }


def test_built_files_follow_the_umask(tmp_path, sample_tenset_dir):
  data_dir = str(tmp_path / "data")
  cfgs = tenset_tfds.make_configs(
    sample_tenset_dir, hardware=["xeon-emr-16c"], multi=False, loop_tokens="off"
  )
  old = os.umask(0o002)
  try:
    tenset_tfds.build(sample_tenset_dir, data_dir, cfgs)
  finally:
    os.umask(old)
  ds = schema.dataset_dir(data_dir, "xeon-emr-16c")
  modes = {n: os.stat(os.path.join(ds, n)).st_mode & 0o777 for n in os.listdir(ds)}
  assert modes and set(modes.values()) == {0o664}, modes
  assert os.stat(ds).st_mode & 0o777 == 0o775
