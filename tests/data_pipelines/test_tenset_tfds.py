"""TFDS build + array loader on the embedded sample: splits, join, metadata, cache."""

import collections
import dataclasses
import glob
import json
import os
import shutil
import textwrap

import numpy as np
import orjson
import pytest
import tensorflow_datasets as tfds

from data_pipelines import loader, schema, tenset_tfds
from tlp_jax.core import network_info as ni
from tlp_jax.core import records

CONFIGS = ("epyc-9004", "xeon-emr-16c", "all")
HW = ("epyc-9004", "xeon-emr-16c")


def _holdout_keys(sample_tenset_dir):
  nets = ni.load_network_infos(sample_tenset_dir)
  return ni.holdout_workload_keys(ni.select_holdout(nets, ni.TENSET_MINI_HOLDOUT))


def _raw_records(sample_tenset_dir, hw):
  """Every non-blank line of a hardware folder, parsed independently of records.py."""
  out = []
  for path in sorted(glob.glob(os.path.join(sample_tenset_dir, "measure_records", hw, "*"))):
    with open(path, "rb") as f:
      out.extend(orjson.loads(line) for line in f if line.strip())
  return out


@pytest.mark.parametrize("config", CONFIGS)
def test_holdout_split_disjoint_and_complete(sample_arrays, sample_tenset_dir, config):
  arrays = sample_arrays(config)
  held = _holdout_keys(sample_tenset_dir)
  keys = np.array(arrays.tasks.workload_keys)
  for split in ("train", "validation"):
    split_keys = set(keys[np.unique(arrays.split(split).task_index)])
    assert not split_keys & held, f"hold-out task in {split}"
  test_keys = set(keys[np.unique(arrays.test.task_index)])
  assert test_keys <= held
  # Every hold-out task with a valid record on some hardware of the config is in test.
  with_records = {
    r["i"][0][0]
    for hw in arrays.hardware
    for r in _raw_records(sample_tenset_dir, hw)
    if r["r"][1] == 0
  }
  assert test_keys == held & with_records
  # 90/10 by record among the non-hold-out examples.
  n_train, n_val = len(arrays.train), len(arrays.validation)
  assert n_train == int((n_train + n_val) * 0.9)
  # Hold-out networks point at test tasks and carry the network-info weights.
  assert [n.label for n in arrays.networks] == [
    "bert_base (1,128)",
    "mobilenet (1,240)",
    "resnet_50 (1,224)",
  ]
  for net in arrays.networks:
    assert set(keys[net.task_indices]) <= test_keys
    assert np.all(net.weights >= 1)


def test_single_hardware_examples_match_records(sample_arrays, sample_tenset_dir):
  arrays = sample_arrays("epyc-9004")
  raw = [r for r in _raw_records(sample_tenset_dir, "epyc-9004") if r["r"][1] == 0]
  n = sum(len(arrays.split(s)) for s in schema.SPLITS)
  assert n == len(raw) == 2824
  keys = np.array(arrays.tasks.workload_keys)
  # Per task, min_cost / mean(cost) from the raw lines equals the stored scores.
  expected = collections.defaultdict(list)
  for r in raw:
    expected[r["i"][0][0]].append(float(np.mean(r["r"][0])))
  for split in schema.SPLITS:
    s = arrays.split(split)
    assert s.mask.all() and s.features.shape[1:] == (25, 22)
    for t in np.unique(s.task_index)[:10]:
      costs = np.array(expected[keys[t]])
      rows = s.task_index == t
      got = np.sort(s.scores[rows, 0])
      want = np.sort((costs.min() / costs).astype(np.float32))
      assert set(np.round(got, 5)) <= set(np.round(want, 5))
      np.testing.assert_allclose(s.min_cost[rows, 0], costs.min(), rtol=1e-6)
      np.testing.assert_allclose(arrays.tasks.min_cost[t, 0], costs.min(), rtol=1e-12)


def test_multi_hardware_join(sample_arrays, sample_tenset_dir):
  multi = sample_arrays("all")
  assert multi.hardware == HW
  # Independent join from the record files: program key -> score per hardware.
  expected = collections.Counter()
  per_hw = {}
  for hw in HW:
    per_hw[hw] = {}
    for path in sorted(glob.glob(os.path.join(sample_tenset_dir, "measure_records", hw, "*"))):
      tf = records.read_task_file(path, hardware=hw)
      for pk, sc in zip(tf.program_keys.tolist(), tf.scores.tolist()):
        per_hw[hw].setdefault((tf.workload_key, pk), np.float32(sc))
  both = 0
  for key in set(per_hw[HW[0]]) | set(per_hw[HW[1]]):
    s = tuple(per_hw[hw].get(key, np.float32(0)) for hw in HW)
    m = tuple(key in per_hw[hw] for hw in HW)
    both += all(m)
    expected[(key[0],) + s + m] += 1
  got = collections.Counter()
  keys = multi.tasks.workload_keys
  for split in schema.SPLITS:
    s = multi.split(split)
    for i in range(len(s)):
      got[
        (
          keys[s.task_index[i]],
          s.scores[i, 0],
          s.scores[i, 1],
          bool(s.mask[i, 0]),
          bool(s.mask[i, 1]),
        )
      ] += 1
  assert got == expected
  assert both > 500  # the sample's training tasks were chosen to be on both hardware
  assert multi.metadata["join_stats"]["programs_on_2_hardware"] == both
  # Per hardware, the multi config holds exactly the single-hardware config's programs.
  for h, hw in enumerate(HW):
    single = sample_arrays(hw)
    n_single = sum(len(single.split(s)) for s in schema.SPLITS)
    n_multi = sum(int(multi.split(s).mask[:, h].sum()) for s in schema.SPLITS)
    assert n_single == n_multi
  # min_cost per example is the task's min cost on each hardware where the task has records.
  t = multi.test
  rows = t.mask.all(axis=1)
  np.testing.assert_allclose(t.min_cost[rows], multi.tasks.min_cost[t.task_index[rows]], rtol=1e-6)


def test_read_stats_in_metadata(sample_arrays, sample_tenset_dir):
  for hw in HW:
    arrays = sample_arrays(hw)
    raw = _raw_records(sample_tenset_dir, hw)
    stats = arrays.read_stats[hw]
    assert stats["lines"] == len(raw)
    assert stats["kept"] == sum(r["r"][1] == 0 for r in raw)
    assert stats["failed"] == {"error_code": sum(r["r"][1] != 0 for r in raw)}
    meta = arrays.metadata
    assert meta["seed"] == 0 and meta["holdout"] == list(ni.TENSET_MINI_HOLDOUT)
    assert '"tlp_jax.vocabulary"' in arrays.vocab_json
    assert meta["examples"] == {s: len(arrays.split(s)) for s in schema.SPLITS}
  summary = sample_arrays("all").summary()
  assert "test: 847 examples" in summary and "xeon-emr-16c 524" in summary


def test_loader_equals_data_source(sample_arrays, built_sample_dataset):
  for config in ("epyc-9004", "all"):
    arrays = sample_arrays(config)
    ds_dir = loader.find_dataset_dir(built_sample_dataset, config)
    sources = tfds.builder_from_directory(ds_dir).as_data_source()
    for split in schema.SPLITS:
      src, arr = sources[split], arrays.split(split)
      assert len(src) == len(arr)
      ex = src.__getitems__(list(range(len(src))))
      np.testing.assert_array_equal(np.stack([e["features"] for e in ex]), arr.features)
      np.testing.assert_array_equal(np.stack([e["score"] for e in ex]), arr.scores)
      np.testing.assert_array_equal(np.stack([e["mask"] for e in ex]), arr.mask)
      np.testing.assert_array_equal(np.stack([e["min_cost"] for e in ex]), arr.min_cost)
      np.testing.assert_array_equal(np.array([e["task_index"] for e in ex]), arr.task_index)


def test_cache_hit_and_invalidation(tmp_path, sample_tenset_dir, sample_arrays, monkeypatch):
  data_dir = str(tmp_path / "data")
  cfgs = tenset_tfds.make_configs(sample_tenset_dir, hardware=["xeon-emr-16c"], multi=False)
  # Small shards: the loader must stitch several shards per split in order.
  tenset_tfds.build(sample_tenset_dir, data_dir, cfgs, shard_size=100)
  ds_dir = loader.find_dataset_dir(data_dir, "xeon-emr-16c")
  assert len(glob.glob(os.path.join(ds_dir, "tenset-train.array_record-*"))) == 4
  first = loader.load_arrays(data_dir, "xeon-emr-16c")
  assert isinstance(first.train.features, np.memmap)
  ref = sample_arrays("xeon-emr-16c")
  for split in schema.SPLITS:
    np.testing.assert_array_equal(first.split(split).features, ref.split(split).features)
    np.testing.assert_array_equal(first.split(split).scores, ref.split(split).scores)
  # Second load must come from the cache: decoding is forbidden now.
  with monkeypatch.context() as m:
    m.setattr(loader, "_read_split", _forbidden)
    cached = loader.load_arrays(data_dir, "xeon-emr-16c")
  np.testing.assert_array_equal(cached.validation.scores, first.validation.scores)
  # Rebuild with another seed: the cache is stale and must be rebuilt.
  cfgs = tenset_tfds.make_configs(sample_tenset_dir, hardware=["xeon-emr-16c"], multi=False, seed=7)
  tenset_tfds.build(sample_tenset_dir, data_dir, cfgs)
  second = loader.load_arrays(data_dir, "xeon-emr-16c")
  assert second.seed == 7 and second.fingerprint != first.fingerprint
  fresh = loader.load_arrays(data_dir, "xeon-emr-16c", use_cache=False)
  for split in schema.SPLITS:
    np.testing.assert_array_equal(second.split(split).features, fresh.split(split).features)
    np.testing.assert_array_equal(second.split(split).task_index, fresh.split(split).task_index)
  assert not np.array_equal(
    np.sort(second.validation.scores[:, 0]), np.sort(first.validation.scores[:, 0])
  )
  # A corrupted cache file is detected and rebuilt, not trusted.
  cache = os.path.join(loader.find_dataset_dir(data_dir, "xeon-emr-16c"), loader.CACHE_DIR)
  with open(os.path.join(cache, "test.scores.npy"), "wb") as f:
    f.write(b"garbage")
  again = loader.load_arrays(data_dir, "xeon-emr-16c")
  np.testing.assert_array_equal(again.test.scores, fresh.test.scores)
  # A rebuild that fails half-way leaves no staging folder next to the dataset.
  os.remove(os.path.join(cache, "fingerprint.json"))
  with monkeypatch.context() as m:
    m.setattr(loader, "_decode_records", _failing_decode)
    with pytest.raises(OSError, match="disk full"):
      loader.load_arrays(data_dir, "xeon-emr-16c")
  ds_dir = loader.find_dataset_dir(data_dir, "xeon-emr-16c")
  assert not [n for n in os.listdir(ds_dir) if n.startswith(loader.CACHE_DIR + ".")]
  np.testing.assert_array_equal(
    loader.load_arrays(data_dir, "xeon-emr-16c").test.scores, fresh.test.scores
  )
  # A parallel decode (2 spawned processes, ranges that cut through shards) writes the same
  # arrays as one process.
  shutil.rmtree(cache)
  with monkeypatch.context() as m:
    m.setattr(loader, "_DECODE_CHUNK", 64)
    par = loader.load_arrays(data_dir, "xeon-emr-16c", decode_workers=2)
  assert isinstance(par.train.features, np.memmap)
  for split in schema.SPLITS:
    for field in dataclasses.fields(par.split(split)):
      got, want = getattr(par.split(split), field.name), getattr(fresh.split(split), field.name)
      if want is None:
        assert got is None
      else:
        np.testing.assert_array_equal(got, want, err_msg=f"{split}.{field.name}")


def _failing_decode(*args, **kwargs):
  raise OSError("disk full")


def _forbidden(*args, **kwargs):
  raise AssertionError("decoded although the cache is valid")


def test_missing_config_lists_built(built_sample_dataset):
  with pytest.raises(loader.DatasetNotFoundError, match=r"\['all', 'epyc-9004'"):
    loader.load_arrays(built_sample_dataset, "nope")


def _staged(hw, task_keys, record_task, program_keys, scores):
  n = len(scores)
  return tenset_tfds.StagedHardware(
    hardware=hw,
    platform="llvm",
    features=np.zeros((n, 2, 3), np.float32),
    scores=np.asarray(scores, np.float32),
    program_keys=np.asarray(program_keys, np.uint64),
    record_task=np.asarray(record_task, np.int32),
    task_keys=list(task_keys),
    task_min_cost=np.ones(len(task_keys)),
    task_files=[],
    stats=None,
    layout=11,
  )


def test_plan_join_duplicates_and_holdout():
  a = _staged("a", ["t1", "t2"], [0, 0, 0, 1], [5, 5, 6, 7], [1.0, 0.5, 0.8, 1.0])
  b = _staged("b", ["t2", "t3"], [0, 1, 1], [7, 8, 8], [0.9, 1.0, 0.7])
  single = tenset_tfds.plan_examples([a], frozenset(), seed=0)
  assert single.rows.shape == (4, 1)  # TLP keeps duplicate programs
  multi = tenset_tfds.plan_examples([a, b], frozenset({"t3"}), seed=0)
  assert multi.task_keys == ["t1", "t2", "t3"]
  assert multi.join_stats["duplicate_programs_dropped"] == 2
  assert multi.join_stats == {
    "duplicate_programs_dropped": 2,
    "programs_on_1_hardware": 3,
    "programs_on_2_hardware": 1,
  }
  # (t2, 7) is on both; its rows point at a[3] and b[0]; first duplicate kept.
  joined = {(multi.task_keys[t], tuple(r)) for t, r in zip(multi.task_index, multi.rows)}
  assert joined == {("t1", (0, -1)), ("t1", (2, -1)), ("t2", (3, 0)), ("t3", (-1, 1))}
  assert multi.task_index[multi.splits["test"]].tolist() == [2]
  assert multi.task_records.tolist() == [[2, 0], [1, 1], [0, 1]]


_NO_TF_SCRIPT = textwrap.dedent("""
    import runpy, sys
    tenset_dir, data_dir = sys.argv[1], sys.argv[2]
    sys.argv = ["build", "--tenset_dir", tenset_dir, "--data_dir", data_dir]
    try:
      runpy.run_module("data_pipelines.build", run_name="__main__")
    except SystemExit as e:
      assert not e.code, e.code
    import tensorflow_datasets as tfds
    from data_pipelines import tenset_tfds
    from data_pipelines import loader
    from data_pipelines import schema
    src = tfds.builder_from_directory(schema.dataset_dir(data_dir, "all")).as_data_source()
    ex = src["test"][0]
    assert ex["features"].shape == (25, 22) and ex["mask"].shape == (2,), ex
    arrays = loader.load_arrays(data_dir, "all")
    assert len(arrays.test) == len(src["test"])
    # Where TF is installed this proves nothing imported it; where it is not (this project's
    # install), the build and reads above ran without it.
    assert not [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
    print("NO_TF_OK")
""")


def test_cli_build_and_read_without_tensorflow(
  tmp_path, sample_tenset_dir, sample_arrays, run_python
):
  data_dir = str(tmp_path / "data")
  proc = run_python("-c", _NO_TF_SCRIPT, sample_tenset_dir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "NO_TF_OK" in proc.stdout
  assert "config all: hardware epyc-9004, xeon-emr-16c" in proc.stdout
  assert "built 3 configs" in proc.stdout
  # Same seed, same source: the CLI build equals the fixture's build (determinism).
  cli = loader.load_arrays(data_dir, "all")
  ref = sample_arrays("all")
  for split in schema.SPLITS:
    np.testing.assert_array_equal(cli.split(split).features, ref.split(split).features)
    np.testing.assert_array_equal(cli.split(split).scores, ref.split(split).scores)
  shutil.rmtree(data_dir)


def _rewrite(path, recs):
  with open(path, "w") as f:
    f.write("".join(orjson.dumps(r).decode() + "\n" for r in recs))


def test_labels_per_task_across_files_and_every_drop_counted(tmp_path, sample_tenset_dir):
  """One task split over two files is labelled once; a 1e-320 cost, a score below float32 and
  a file measured on other hardware are each counted; kept == examples written."""
  src = str(tmp_path / "tenset")
  shutil.copytree(sample_tenset_dir, src)
  folder = os.path.join(src, "measure_records", "xeon-emr-16c")
  files = sorted(glob.glob(os.path.join(folder, "*.json")))
  loaded = {p: [orjson.loads(line) for line in open(p, "rb")] for p in files}
  ok = [p for p in files if sum(r["r"][1] == 0 for r in loaded[p]) >= 10]
  split_file, tiny_file, spread_file, other_file = ok[:4]
  # 1. Split a task: the half without its best program goes to a second file.
  recs = loaded[split_file]
  valid = [r for r in recs if r["r"][1] == 0]
  best = min(valid, key=lambda r: np.mean(r["r"][0]))
  first = [r for r in recs if r is not best][: len(recs) // 2]
  _rewrite(split_file, [r for r in recs if not any(r is x for x in first)])
  _rewrite(split_file[: -len(".json")] + "_more.json", first)
  true_min = float(np.mean(best["r"][0]))
  split_key = recs[0]["i"][0][0]
  # 2. A 1e-320 s cost: refused (cost_out_of_range); the task's other records keep labels.
  recs = loaded[tiny_file]
  [r for r in recs if r["r"][1] == 0][0]["r"][0] = [1e-320]
  _rewrite(tiny_file, recs)
  # 3. Costs 1e-30 and 1e30 s in one task (both float32): 1e-60 underflows float32.
  recs = loaded[spread_file]
  v = [r for r in recs if r["r"][1] == 0]
  v[0]["r"][0], v[1]["r"][0] = [1e-30], [1e30]
  _rewrite(spread_file, recs)
  # 4. A file whose target names another hardware.
  with open(other_file) as f:
    text = f.read()
  n_other = len(text.splitlines())
  with open(other_file, "w") as f:
    f.write(text.replace("-model=xeon-emr-16c", "-model=epyc-9004"))

  data_dir = str(tmp_path / "data")
  cfgs = tenset_tfds.make_configs(src, hardware=["xeon-emr-16c"], multi=False, loop_tokens="off")
  (meta,) = tenset_tfds.build(src, data_dir, cfgs)
  st = meta["read_stats"]["xeon-emr-16c"]
  assert st["failed"]["cost_out_of_range"] == 1
  assert st["failed"]["score_underflow"] == 1
  assert st["malformed"] == {"other_hardware": n_other}
  assert st["lines"] == st["kept"] + sum(st["failed"].values()) + sum(st["malformed"].values())
  arrays = loader.load_arrays(data_dir, "xeon-emr-16c", use_cache=False)
  written = sum(len(arrays.split(s).scores) for s in schema.SPLITS)
  assert st["kept"] == written == sum(meta["examples"].values())
  assert f"kept {written};" in tenset_tfds.format_summary(meta)
  keys = meta["tasks"]["workload_keys"]
  assert len(keys) == len(set(keys))
  t = keys.index(split_key)
  assert meta["tasks"]["min_cost"][t] == [true_min]
  scores = np.concatenate([arrays.split(s).scores[:, 0] for s in schema.SPLITS])
  task = np.concatenate([arrays.split(s).task_index for s in schema.SPLITS])
  assert (scores > 0).all() and (scores <= 1).all()
  # Exactly the best program of the split task scores 1 (per file, each half had a 1.0).
  n_best = sum(np.mean(r["r"][0]) == true_min for r in valid)
  assert int((scores[task == t] == 1.0).sum()) == n_best
  assert int((task == t).sum()) == len(valid)


def test_summary_accounts_for_records_without_loop_tokens(built_sample_dataset):
  path = os.path.join(schema.dataset_dir(built_sample_dataset, "xeon-emr-16c"), "metadata.json")
  with open(path) as f:
    meta = json.load(f)
  assert "written +" not in tenset_tfds.format_summary(meta)  # nothing skipped: kept = written
  kept = meta["read_stats"]["xeon-emr-16c"]["kept"]
  meta[schema.LOOP_TOKEN_STATS_META]["xeon-emr-16c"]["skipped"] = {"replay_error": 3}
  summary = tenset_tfds.format_summary(meta)
  assert f"xeon-emr-16c: kept {kept} = {kept - 3} written + 3 skipped without loop tokens" in (
    summary
  )
