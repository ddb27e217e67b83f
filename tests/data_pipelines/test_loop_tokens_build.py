"""The loop-token build (data_pipelines.loop_token_source + tenset_tfds) on the embedded sample.

No TVM: the skeletons are the committed ``network_info/skeletons.json`` of the sample.
"""

import collections
import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import loader, schema, tenset_tfds
from data_pipelines import loop_token_source as lts
from tlp_jax.core import features as features_lib
from tlp_jax.core import loop_tokens as lt
from tlp_jax.core import replay as rp
from tlp_jax.core import skeleton as sk

XEON = "xeon-emr-16c"


def _build(
  tenset_dir, data_dir, hardware=None, multi=True, workers=1, skeletons=None, validation="by_record"
):
  source = lts.LoopTokenSource(skeletons or sk.tenset_skeletons_path(tenset_dir), tenset_dir)
  cfgs = tenset_tfds.make_configs(
    tenset_dir, hardware=hardware, multi=multi, loop_tokens=True, validation=validation
  )
  return tenset_tfds.build(tenset_dir, data_dir, cfgs, token_source=source, workers=workers)


@pytest.fixture(scope="module")
def token_dataset(tmp_path_factory, sample_tenset_dir):
  """data_dir of the sample built with loop tokens (every config, 1 worker)."""
  data_dir = str(tmp_path_factory.mktemp("tokens"))
  _build(sample_tenset_dir, data_dir)
  return data_dir


@pytest.fixture(scope="module")
def steps_only_xeon(tmp_path_factory, sample_tenset_dir):
  """The sample's xeon config built with ``loop_tokens="off"`` (TLP's step features only)."""
  data_dir = str(tmp_path_factory.mktemp("steps_only"))
  cfgs = tenset_tfds.make_configs(
    sample_tenset_dir, hardware=[XEON], multi=False, loop_tokens="off"
  )
  assert not any(c.loop_tokens for c in cfgs)
  tenset_tfds.build(sample_tenset_dir, data_dir, cfgs)
  return loader.load_arrays(data_dir, XEON)


def test_the_library_default_builds_loop_tokens(sample_arrays):
  """make_configs / build default to loop_tokens="auto": the sample has its skeletons."""
  arrays = sample_arrays(XEON)
  assert arrays.loop_token_layout["max_tokens"] == lt.DEFAULT_MAX_TOKENS
  assert arrays.train.loop_tokens is not None and os.path.isfile(arrays.skeletons_path)


def _valid_lines_by_task(tenset_dir, hw):
  """workload key -> raw lines of the measured records of one hardware (independent parse)."""
  out = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(tenset_dir, "measure_records", hw, "*.json"))):
    with open(path, "rb") as f:
      for line in f:
        if line.strip():
          rec = json.loads(line)
          if rec["r"][1] == 0:
            out[rec["i"][0][0]].append(line)
  return out


def test_tokens_equal_replay_per_record(token_dataset, sample_tenset_dir, steps_only_xeon):
  arrays = loader.load_arrays(token_dataset, XEON)
  skels = sk.load_collection(sk.tenset_skeletons_path(sample_tenset_dir))
  keys = arrays.tasks.workload_keys
  got = collections.defaultdict(collections.Counter)
  for split in schema.SPLITS:
    s = arrays.split(split)
    assert s.loop_tokens.shape == (len(s), lt.DEFAULT_MAX_TOKENS, lt.WIDTH)
    assert s.loop_tokens.dtype == np.float16
    assert isinstance(s.loop_tokens, np.memmap)
    for t, tok in zip(s.task_index, s.loop_tokens):
      got[keys[t]][tok.tobytes()] += 1
  want = collections.defaultdict(collections.Counter)
  for key, lines in _valid_lines_by_task(sample_tenset_dir, XEON).items():
    for line in lines:
      nest = rp.replay(skels[key], json.loads(line)["i"][1][1])
      want[key][lt.loop_tokens(nest).tobytes()] += 1
  assert got == want
  # The TLP step features and labels are those of a build without loop tokens.
  ref = steps_only_xeon
  for split in schema.SPLITS:
    np.testing.assert_array_equal(arrays.split(split).features, ref.split(split).features)
    np.testing.assert_array_equal(arrays.split(split).scores, ref.split(split).scores)
    assert ref.split(split).loop_tokens is None
  assert ref.loop_token_layout is None and ref.skeletons_path is None


def test_metadata_skeletons_and_bytes_per_example(token_dataset):
  for config in ("epyc-9004", XEON, "all"):
    arrays = loader.load_arrays(token_dataset, config)
    meta = arrays.metadata
    assert meta[schema.LOOP_TOKENS_META] == {
      "layout_version": lt.LAYOUT_VERSION,
      "max_tokens": 40,
      "width": lt.WIDTH,
      "columns": list(lt.COLUMNS),
      "dtype": "float16",
      "skeletons_file": "skeletons.json",
    }
    assert arrays.loop_token_shape == (40, lt.WIDTH)
    assert meta[schema.VALIDATION_META] == "by_record" and arrays.validation_mode == "by_record"
    for hw in arrays.hardware:
      st = meta[schema.LOOP_TOKEN_STATS_META][hw]
      assert st["records"] == st["tokenized"] == arrays.read_stats[hw]["kept"]
      assert st["skipped"] == {}
    # The dataset carries the skeletons of exactly its tasks.
    assert arrays.skeletons_path == os.path.join(
      loader.find_dataset_dir(token_dataset, config), "skeletons.json"
    )
    assert sorted(sk.load_collection(arrays.skeletons_path)) == sorted(arrays.tasks.workload_keys)
  # Compact: every stored example (steps + loop tokens + labels) is at most 5 KB.
  from array_record.python import array_record_module

  ds_dir = loader.find_dataset_dir(token_dataset, "all")
  sizes = []
  for split in schema.SPLITS:
    for path in schema.shard_files(ds_dir, split):
      reader = array_record_module.ArrayRecordReader(path)
      sizes += [len(r) for r in reader.read(0, reader.num_records())]
      reader.close()
  assert max(sizes) <= 5 * 1024, max(sizes)
  # TFDS itself decodes the field (the loader agrees with a plain data source read).
  arrays = loader.load_arrays(token_dataset, "all")
  src = tfds.builder_from_directory(ds_dir).as_data_source()
  ex = src["test"].__getitems__(list(range(20)))
  np.testing.assert_array_equal(
    np.stack([e["loop_tokens"] for e in ex]), arrays.test.loop_tokens[:20]
  )
  assert ex[0]["loop_tokens"].dtype == np.float16


def test_two_workers_identical(tmp_path, sample_tenset_dir, token_dataset):
  data_dir = str(tmp_path / "w2")
  _build(sample_tenset_dir, data_dir, hardware=[XEON], multi=False, workers=2)
  one, two = loader.load_arrays(token_dataset, XEON), loader.load_arrays(data_dir, XEON)
  for split in schema.SPLITS:
    for name in schema.FIELDS:
      np.testing.assert_array_equal(
        getattr(one.split(split), name), getattr(two.split(split), name)
      )
  assert one.metadata[schema.LOOP_TOKEN_STATS_META] == two.metadata[schema.LOOP_TOKEN_STATS_META]


def _copy_sample(sample_tenset_dir, dst, hw=XEON):
  shutil.copytree(
    os.path.join(sample_tenset_dir, "network_info"),
    os.path.join(dst, "network_info"),
    ignore=shutil.ignore_patterns("*.pkl"),
  )
  shutil.copytree(
    os.path.join(sample_tenset_dir, "measure_records", hw), os.path.join(dst, "measure_records", hw)
  )
  return sorted(glob.glob(os.path.join(dst, "measure_records", hw, "*.json")))


def test_replay_failures_are_skipped_and_counted(tmp_path, sample_tenset_dir):
  tdir = str(tmp_path / "tenset")
  files = _copy_sample(sample_tenset_dir, tdir)
  # Two measured records whose first step names a stage that does not exist: TLP's features
  # take them, the replay cannot.
  broken = []
  for path in files:
    with open(path, "rb") as f:
      lines = f.readlines()
    k = next((i for i, ln in enumerate(lines) if json.loads(ln)["r"][1] == 0), None)
    if k is None or len(broken) == 2:
      continue
    rec = json.loads(lines[k])
    rec["i"][1][1][0][1] = 999
    lines[k] = json.dumps(rec).encode() + b"\n"
    with open(path, "wb") as f:
      f.writelines(lines)
    broken.append(f"{os.path.basename(path)}:{k + 1}")
  (meta,) = _build(tdir, str(tmp_path / "data"), multi=False)
  st = meta[schema.LOOP_TOKEN_STATS_META][XEON]
  kept = meta["read_stats"][XEON]["kept"]
  assert st["skipped"] == {lts.REPLAY_ERROR: 2}
  assert st["records"] == kept and st["tokenized"] == kept - 2
  assert sum(meta["examples"].values()) == kept - 2
  assert [e.split(": ")[0] for e in st["examples"]] == broken
  assert "stage 999 out of range" in st["examples"][0]
  assert "skipped: replay_error 2" in tenset_tfds.format_summary(meta)


def _one_loop_skeleton() -> sk.Skeleton:
  """Task "k": B[i] = A[i] over one spatial loop of 8."""
  return sk.Skeleton.from_dict(
    {
      "format": sk.FORMAT,
      "version": sk.VERSION,
      "workload_key": "k",
      "stages": [
        {"name": "A", "type": "placeholder", "shape": [8]},
        {
          "name": "B",
          "type": "compute",
          "shape": [8],
          "iters": [["i", "s", 8]],
          "reads": [[0, [[1, 0]]]],
          "output": True,
          "const_matrix": False,
          "num_outputs": 1,
        },
      ],
    }
  )


def test_tokens_of_lines_reasons():
  skel = _one_loop_skeleton()
  good = b'{"i": [["k", "llvm"], [[], [["SP", 1, 0, 8, [4], 1]]]], "r": [[1.0], 0, 0, 0]}'
  bad_step = b'{"i": [["k", "llvm"], [[], [["SP", 7, 0, 8, [4], 1]]]], "r": [[1.0], 0, 0, 0]}'
  no_steps = b'{"i": [["k", "llvm"]], "r": [[1.0], 0, 0, 0]}'
  got = lts.tokens_of_lines(skel, [good, bad_step, no_steps, good], 40, "f", [1, 2, 3, 4])
  assert got.ok.tolist() == [True, False, False, True]
  assert got.tokens.shape == (2, 40, lt.WIDTH) and got.tokens.dtype == np.float16
  want = lt.loop_tokens(rp.replay(skel, features_lib.json_loads(good)["i"][1][1]))
  np.testing.assert_array_equal(got.tokens[0], want)
  assert got.tokens[0, :2, lt.C_IS_LOOP].tolist() == [1, 1]  # the split made two loops
  assert got.stats.skipped == {lts.REPLAY_ERROR: 1, lts.BAD_RECORD: 1}
  assert got.stats.to_dict()["examples"][0].startswith("f:2: replay_error: ReplayError")
  none = lts.tokens_of_lines(None, [good], 40, "f", [5], "ValueError: scan")
  assert none.stats.skipped == {lts.NO_SKELETON: 1} and none.tokens.shape == (0, 40, lt.WIDTH)
  total = got.stats + none.stats
  assert total.records == 5 and total.tokenized == 2 and sum(total.skipped.values()) == 3


def test_missing_skeletons_are_clear_errors(tmp_path, sample_tenset_dir, run_python):
  tdir = str(tmp_path / "tenset")
  files = _copy_sample(sample_tenset_dir, tdir)
  path = sk.tenset_skeletons_path(tdir)
  # auto without the file: no loop tokens; on: an error naming the extraction command.
  assert lts.resolve_skeletons("auto", tdir, str(tmp_path / "none.json")) is None
  assert lts.resolve_skeletons("off", tdir) is None
  assert lts.resolve_skeletons("auto", tdir) == path
  with pytest.raises(
    lts.MissingSkeletonError,
    match=r"python -m tlp_jax\.tvm\.skeleton_extract --tenset_dir .* --out",
  ):
    lts.resolve_skeletons("on", tdir, str(tmp_path / "none.json"))
  # A task missing from the file: an error before anything is built.
  skels = sk.load_collection(path)
  key = json.loads(open(files[0], "rb").readline())["i"][0][0]
  del skels[key]
  sk.save_collection(path, skels)
  with pytest.raises(
    lts.MissingSkeletonError, match=r"no skeleton for workload .*skeleton_extract"
  ):
    _build(tdir, str(tmp_path / "data"), multi=False)
  assert not os.path.exists(schema.dataset_dir(str(tmp_path / "data"), XEON))
  # The CLI says it in one line.
  proc = run_python(
    "-m",
    "data_pipelines.build",
    "--tenset_dir",
    tdir,
    "--data_dir",
    str(tmp_path / "cli"),
    "--loop_tokens",
    "on",
    "--skeletons",
    str(tmp_path / "no.json"),
  )
  assert proc.returncode == 1
  err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(err) == 1 and "no skeleton file" in err[0]
  assert f"python -m tlp_jax.tvm.skeleton_extract --tenset_dir {tdir}" in err[0]


def test_by_task_validation_is_task_disjoint(tmp_path, sample_tenset_dir):
  data_dir = str(tmp_path / "data")
  cfgs = tenset_tfds.make_configs(sample_tenset_dir, validation="by_task")
  tenset_tfds.build(sample_tenset_dir, data_dir, cfgs)
  for config in ("epyc-9004", XEON, "all"):
    arrays = loader.load_arrays(data_dir, config)
    assert arrays.validation_mode == "by_task"
    train = set(np.unique(arrays.train.task_index).tolist())
    val = set(np.unique(arrays.validation.task_index).tolist())
    test = set(np.unique(arrays.test.task_index).tolist())
    assert val and not train & val and not (train | val) & test
    n = len(train | val)
    assert len(train) == int(n * 0.9)
  with pytest.raises(tenset_tfds.DatasetBuildError, match="validation must be one of"):
    tenset_tfds.make_configs(sample_tenset_dir, validation="by_network")


def _staged(tenset_dir, work_dir, workers, reuse):
  os.makedirs(work_dir)
  source = lts.LoopTokenSource(sk.tenset_skeletons_path(tenset_dir), tenset_dir)
  staging = tenset_tfds.RecordStaging(
    tenset_dir, work_dir, token_source=source, workers=workers, reuse_tokens=reuse
  )
  try:
    return staging.get_all(["epyc-9004", XEON])
  finally:
    staging.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_tokens_of_programs_staged_before_are_reused_bit_identical(
  tmp_path, sample_tenset_dir, workers
):
  """The second hardware copies the tokens of programs the first staged (same task, same program
  key) instead of replaying them: same bytes, same stats, and copies only where the key is."""
  reused = _staged(sample_tenset_dir, str(tmp_path / "a"), workers, reuse=True)
  replayed = _staged(sample_tenset_dir, str(tmp_path / "b"), workers, reuse=False)
  for a, b in zip(reused, replayed):
    np.testing.assert_array_equal(np.asarray(a.loop_tokens), np.asarray(b.loop_tokens))
    np.testing.assert_array_equal(a.loop_token_cropped, b.loop_token_cropped)
    assert a.loop_token_stats.to_dict() == b.loop_token_stats.to_dict()
    np.testing.assert_array_equal(a.program_keys, b.program_keys)
    assert b.loop_tokens_reused == 0
  first, second = reused
  assert first.loop_tokens_reused == 0  # nothing staged before it
  # Every xeon program whose (task, key) epyc staged is copied; the rest are replayed.
  seen = {(first.task_keys[t], k) for t, k in zip(first.record_task, first.program_keys.tolist())}
  want = sum(
    (second.task_keys[t], k) in seen
    for t, k in zip(second.record_task, second.program_keys.tolist())
  )
  assert want > 0 and second.loop_tokens_reused == want
  assert second.loop_token_cropped.shape == (second.num_records,)


def test_prior_tokens_are_copied_by_program_key_and_only_within_their_task(tmp_path):
  """Rows of a prior are copied (not replayed) for the records whose program key it holds, its
  cropped flags counted; a prior of another workload key is ignored whatever its keys."""
  path = str(tmp_path / "skeletons.json")
  sk.save_collection(path, {"k": _one_loop_skeleton()})
  source = lts.LoopTokenSource(path, str(tmp_path))
  lines = [
    b'{"i": [["k", "llvm"], [[], [["SP", 1, 0, 8, [4], 1]]]], "r": [[1.0], 0, 0, 0]}',
    b'{"i": [["k", "llvm"], [[], [["SP", 1, 0, 8, [2], 1]]]], "r": [[1.0], 0, 0, 0]}',
  ]
  keys = [11, 22]
  # A staged token file whose row 1 is recognisable: 7.0 everywhere.
  staged = np.zeros((3, source.max_tokens, lt.WIDTH), np.float16)
  staged[1] = 7.0
  tok_path = str(tmp_path / "staged.f16")
  staged.tofile(tok_path)

  def prior(key):
    keys, rows, cropped = np.array([22], np.uint64), np.array([1]), np.array([True])
    return lts.PriorTokens(key, tok_path, 3, keys, rows, cropped)

  fresh = source.tokens("k", lines, "f", [1, 2], program_keys=keys)
  got = source.tokens("k", lines, "f", [1, 2], program_keys=keys, priors=[prior("k")])
  assert got.reused == 1 and fresh.reused == 0
  np.testing.assert_array_equal(got.tokens[0], fresh.tokens[0])  # key 11: replayed
  assert (got.tokens[1] == 7.0).all()  # key 22: copied from row 1
  assert got.cropped.tolist() == [False, True] and got.stats.cropped == 1
  other = source.tokens("k", lines, "f", [1, 2], program_keys=keys, priors=[prior("other")])
  assert other.reused == 0
  np.testing.assert_array_equal(other.tokens, fresh.tokens)
  # A line the replay's parser refuses (orjson: a number out of range; the record reader, which
  # falls back to the stdlib parser, keeps it) is skipped as a bad record even when its program
  # is in a prior: reuse never keeps a record the replay would not.
  unreadable = lines[1].replace(b"0, 0, 0]}", b"0, 1e400, 0]}")
  got = source.tokens("k", [unreadable], "f", [3], program_keys=[22], priors=[prior("k")])
  assert got.reused == 0 and got.stats.skipped == {lts.BAD_RECORD: 1} and not got.ok.any()


def test_a_task_file_leaves_no_replay_memo_behind(sample_tenset_dir):
  """``LoopTokenSource.tokens`` drops the replay's memo of the task when done with its file, so
  a build process's memory does not grow with the tasks and records it has read; reading the
  file again gives the same tokens."""
  source = lts.LoopTokenSource(sk.tenset_skeletons_path(sample_tenset_dir), sample_tenset_dir)
  path = sorted(glob.glob(os.path.join(sample_tenset_dir, "measure_records", XEON, "*.json")))[0]
  with open(path, "rb") as f:
    lines = [line for line in f.read().splitlines() if line.strip()]
  key = json.loads(lines[0])["i"][0][0]
  skeleton = source.skeletons[key]
  first = source.tokens(key, lines, path, list(range(1, len(lines) + 1)))
  assert first.ok.any()
  assert "_replay_cache" not in vars(skeleton)
  rp.replay(skeleton, json.loads(lines[0])["i"][1][1])
  assert "_replay_cache" in vars(skeleton)  # what the source drops
  again = source.tokens(key, lines, path, list(range(1, len(lines) + 1)))
  assert "_replay_cache" not in vars(skeleton)
  np.testing.assert_array_equal(first.ok, again.ok)
  np.testing.assert_array_equal(first.tokens, again.tokens)
