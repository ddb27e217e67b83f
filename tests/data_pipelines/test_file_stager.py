"""Parallel staging of task files (data_pipelines.file_stager): same bytes for any worker count.

The sample's records use only the original TLP vocabulary, so these tests edit a copy of it to
make the vocabulary grow mid-way (new unroll tokens in several files, a new step kind later):
reading files in parallel with worker-local vocabularies, or taking results as they finish,
gives other token ids / one-hot layouts than the one-process build, and these tests fail.
"""

import glob
import json
import os
import shutil

import numpy as np
import pytest

from data_pipelines import file_stager, loader, schema, tenset_tfds
from data_pipelines import loop_token_source as lts
from tlp_jax.core import features as features_lib
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import skeleton as sk

XEON = "xeon-emr-16c"
# file index -> unroll values given to its first measured records with a PR unroll step (new
# tokens: the original llvm table has 0, 16, 64, 512), and the file whose record gets a step of
# a new kind (widens every feature vector: the hardware is read again in the new layout).
NEW_UNROLL = {2: ["32"], 3: ["8"], 8: ["8", "32"], 12: ["128"], 13: ["32", "128"]}
NEW_KIND_FILE = 10
NEW_KIND = "ZZ"


def _copy_sample(sample_tenset_dir, dst):
  shutil.copytree(
    os.path.join(sample_tenset_dir, "network_info"),
    os.path.join(dst, "network_info"),
    ignore=shutil.ignore_patterns("*.pkl"),
  )
  shutil.copytree(
    os.path.join(sample_tenset_dir, "measure_records", XEON),
    os.path.join(dst, "measure_records", XEON),
  )
  return sorted(glob.glob(os.path.join(dst, "measure_records", XEON, "*.json")))


def _edit(path, edits):
  """Applies ``edits(rec) -> bool`` to measured records of a file (stops when it says so)."""
  with open(path, "rb") as f:
    lines = f.readlines()
  for k, line in enumerate(lines):
    rec = json.loads(line)
    if rec["r"][1] == 0 and edits(rec):
      lines[k] = json.dumps(rec).encode() + b"\n"
  with open(path, "wb") as f:
    f.writelines(lines)


def _growing_vocab_dir(sample_tenset_dir, dst):
  files = _copy_sample(sample_tenset_dir, dst)
  for i, values in NEW_UNROLL.items():
    todo = list(values)

    def unroll(rec, todo=todo):
      for st in rec["i"][1][1]:
        if todo and st[0] == "PR" and "auto_unroll_max_step" in st[-1]:
          st[-1] = f"auto_unroll_max_step${todo.pop(0)}"
          return True
      return False

    _edit(files[i], unroll)
    assert not todo, f"{files[i]} has too few records with an unroll step"
  done = []

  def new_kind(rec):
    if done:
      return False
    rec["i"][1][1].append([NEW_KIND, 1])
    done.append(1)
    return True

  _edit(files[NEW_KIND_FILE], new_kind)
  return files


@pytest.fixture(scope="module")
def growing_dir(tmp_path_factory, sample_tenset_dir):
  tdir = str(tmp_path_factory.mktemp("growing"))
  _growing_vocab_dir(sample_tenset_dir, tdir)
  return tdir


def _stage_all(paths, workers, source, out_dir):
  """Stages ``paths``; returns each file's result with its rows read back from its files."""
  fz = features_lib.Featurizer("llvm", vocab=features_lib.Vocabulary.original("llvm"))
  os.makedirs(out_dir)
  out = []
  with (
    file_stager.FileStager(workers, source) as stager,
    # As the build opens its staging files.
    open(os.path.join(out_dir, "f"), "wb", buffering=0) as feat,
    open(os.path.join(out_dir, "t"), "wb", buffering=0) as tok,
  ):
    for got in stager.stage(paths, XEON, fz, out_dir):
      # Only a few bytes per record come back: the arrays are in the files.
      assert got.task.features is None or not len(got.task), got.path
      assert got.tokens is None or got.tokens.tokens is None, got.path
      rows = {}
      if got.features_file is not None:
        with open(got.features_file, "rb") as f:
          rows["features"] = f.read()
        if got.tokens_file is not None:
          with open(got.tokens_file, "rb") as f:
            rows["tokens"] = f.read()
        got.move_rows(feat, tok)
        assert not os.path.exists(got.features_file)
      out.append((got, rows))
  # move_rows appended exactly these bytes, in file order.
  for name, suffix in (("features", "f"), ("tokens", "t")):
    with open(os.path.join(out_dir, suffix), "rb") as f:
      assert f.read() == b"".join(r.get(name, b"") for _, r in out), name
    return out, fz.vocab, stager.redone


def test_stager_matches_one_process_file_by_file(growing_dir, tmp_path):
  paths = sorted(glob.glob(os.path.join(growing_dir, "measure_records", XEON, "*.json")))
  source = lts.LoopTokenSource(sk.tenset_skeletons_path(growing_dir), growing_dir)
  one, vocab1, redone1 = _stage_all(paths, 1, source, str(tmp_path / "w1"))
  two, vocab2, redone2 = _stage_all(paths, 2, source, str(tmp_path / "w2"))
  assert vocab1 == vocab2
  assert vocab1.kinds[-1] == NEW_KIND
  assert sorted(vocab1.tokens["unroll"], key=vocab1.tokens["unroll"].get)[-3:] == [
    "auto_unroll_max_step$32",
    "auto_unroll_max_step$8",
    "auto_unroll_max_step$128",
  ]
  assert [s.path for s, _ in one] == [s.path for s, _ in two] == paths
  # In memory, one process: the rows in the files are the kept records' arrays (a file with a
  # record that failed replay, if any: its features are cut to the replayed records).
  staged = [k for k, (s, _) in enumerate(one) if s.tokens is not None]
  k = next((k for k in staged if not one[k][0].keep.all()), staged[0])
  fz = features_lib.Featurizer("llvm", vocab=features_lib.Vocabulary.original("llvm"))
  for path in paths[: k + 1]:
    ref = file_stager.stage_file(path, XEON, fz, source)
  assert ref.rows > 0 and ref.task.features.shape[0] > 0
  assert one[k][1]["features"] == np.asarray(ref.task.features[ref.keep], np.float32).tobytes()
  assert one[k][1]["tokens"] == ref.tokens.tokens.tobytes()
  for (a, rows_a), (b, rows_b) in zip(one, two):
    assert a.task.layout == b.task.layout and a.task.workload_key == b.task.workload_key
    assert rows_a == rows_b, a.path
    assert (a.features_file is None) == (not len(a.task)), a.path
    for name in ("costs", "program_keys", "line_numbers"):
      np.testing.assert_array_equal(getattr(a.task, name), getattr(b.task, name))
    assert a.task.stats.to_dict() == b.task.stats.to_dict(), a.path
    assert (a.tokens is None) == (b.tokens is None) == (not len(a.task)), a.path
    if a.tokens is None:
      continue
    assert a.tokens.ok.tolist() == b.tokens.ok.tolist()
    assert len(rows_a["tokens"]) == a.rows * source.max_tokens * lt.WIDTH * 2
    assert a.tokens.stats.to_dict() == b.tokens.stats.to_dict()
  assert redone1 == 0 and redone2 > 0  # the growth happened, and the stager caught it
  # Files read before the new kind have the old layout (the build then reads the hardware
  # again), the rest the new one: in both runs alike.
  assert {s.task.layout for s, _ in one[:NEW_KIND_FILE]} == {11}
  assert {s.task.layout for s, _ in one[NEW_KIND_FILE:] if len(s.task)} == {12}


def test_build_is_the_same_for_one_and_two_workers(tmp_path, growing_dir):
  source = lts.LoopTokenSource(sk.tenset_skeletons_path(growing_dir), growing_dir)
  cfgs = tenset_tfds.make_configs(growing_dir, multi=False, loop_tokens=True)
  runs = []
  for workers in (1, 2):
    data_dir = str(tmp_path / f"w{workers}")
    tenset_tfds.build(growing_dir, data_dir, cfgs, token_source=source, workers=workers)
    runs.append(loader.load_arrays(data_dir, XEON))
  one, two = runs
  for split in schema.SPLITS:
    for name in schema.FIELDS:
      a, b = getattr(one.split(split), name), getattr(two.split(split), name)
      assert (a is None) == (b is None), name
      if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (split, name)
  assert one.metadata == two.metadata
  vocab = features_lib.Vocabulary.from_json(one.metadata["vocab_json"])
  assert NEW_KIND in vocab.kinds and one.train.features.shape[1:] == (25, 22)
  assert len(vocab.tokens["unroll"]) == len(features_lib.ORIGINAL_UNROLL["llvm"]) + 3
  with open(
    os.path.join(loader.find_dataset_dir(str(tmp_path / "w1"), XEON), "features.json")
  ) as f:
    features_one = f.read()
  with open(
    os.path.join(loader.find_dataset_dir(str(tmp_path / "w2"), XEON), "features.json")
  ) as f:
    assert f.read() == features_one


def _with_bad_file(sample_tenset_dir, tmp_path):
  tdir = str(tmp_path / "tenset")
  files = _copy_sample(sample_tenset_dir, tdir)
  # A task file that cannot be read (a folder by that name) in the middle of the list.
  bad = files[10][:-5] + "_x.json"
  os.mkdir(bad)
  return tdir, bad


def test_a_worker_error_names_the_file(tmp_path, sample_tenset_dir, run_python):
  tdir, bad = _with_bad_file(sample_tenset_dir, tmp_path)
  paths = sorted(glob.glob(os.path.join(tdir, "measure_records", XEON, "*.json")))
  fz = features_lib.Featurizer("llvm")
  os.makedirs(tmp_path / "rows")
  with file_stager.FileStager(2) as stager:
    with pytest.raises(file_stager.FileStageError, match=r"_x\.json: IsADirectoryError"):
      list(stager.stage(paths, XEON, fz, str(tmp_path / "rows")))
    assert stager._pool is None  # the files still being read were stopped
  # The CLI: one line naming the file, exit 1, nothing built.
  data_dir = str(tmp_path / "data")
  proc = run_python(
    "-m",
    "data_pipelines.build",
    "--tenset_dir",
    tdir,
    "--data_dir",
    data_dir,
    "--loop_tokens",
    "off",
    "--workers",
    "2",
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(err) == 1 and f"{bad}: IsADirectoryError" in err[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(schema.dataset_dir(data_dir, XEON))


@pytest.mark.parametrize("mode", ["wb", "ab"])  # "ab": no copy_file_range, the fallback
def test_append_file_appends_and_checks(tmp_path, mode):
  parts = [os.urandom(n) for n in (0, 5, 1 << 20, 3)]
  out_path = tmp_path / "out"
  with open(out_path, mode, buffering=0) as out:
    out.write(b"head")
    for k, data in enumerate(parts):
      (tmp_path / str(k)).write_bytes(data)
      assert file_stager.append_file(out, str(tmp_path / str(k))) == len(data)
  assert out_path.read_bytes() == b"head" + b"".join(parts)


def test_workers_must_be_positive():
  with pytest.raises(ValueError, match="workers must be >= 1"):
    file_stager.FileStager(0)


def test_map_ordered_keeps_order_and_pool_and_stops_on_error():
  jobs = [f"/d/{i}.json" for i in range(9)]
  with file_stager.FileStager(2) as stager:
    assert list(stager.map_ordered(os.path.basename, jobs)) == [f"{i}.json" for i in range(9)]
    pool = stager._pool
    assert pool is not None
    assert list(stager.map_ordered(os.path.basename, jobs[:3])) == ["0.json", "1.json", "2.json"]
    assert stager._pool is pool  # a finished map keeps the pool for the build's next step
    with pytest.raises(TypeError):
      list(stager.map_ordered(os.path.basename, jobs[:2] + [None] + jobs[2:]))
    assert stager._pool is None  # a failed job stops the jobs still running
  assert list(file_stager.FileStager(1).map_ordered(os.path.basename, jobs[:2])) == [
    "0.json",
    "1.json",
  ]
