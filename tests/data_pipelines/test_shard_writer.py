"""Shard writing in worker processes (data_pipelines.shard_writer): the same bytes as one worker.

Small shards (a few dozen examples) so that every split has several shards and two workers
write them at once; the loop-token build of the whole sample (both hardware and the joined
config, whose examples take their features from either hardware).
"""

import hashlib
import json
import os

import numpy as np
import pytest
from array_record.python import array_record_module

from data_pipelines import file_stager, loader, schema, shard_writer, tenset_tfds
from data_pipelines import loop_token_source as lts
from tlp_jax.core import skeleton as sk

# Not a divisor of the split sizes: the shards of a split differ in length, so lengths recorded
# against the wrong shard show in dataset_info.json.
SHARD = 70


def _build(tenset_dir, data_dir, workers, shard_size=SHARD):
  source = lts.LoopTokenSource(sk.tenset_skeletons_path(tenset_dir), tenset_dir)
  cfgs = tenset_tfds.make_configs(tenset_dir, loop_tokens=True)
  return tenset_tfds.build(
    tenset_dir, data_dir, cfgs, shard_size=shard_size, token_source=source, workers=workers
  )


def _files(data_dir):
  """``{relative path: sha256}`` of every file of the built datasets."""
  out = {}
  for root, _, names in os.walk(data_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, data_dir)
      if rel != ".build.lock":
        with open(path, "rb") as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, sample_tenset_dir):
  data_dir = str(tmp_path_factory.mktemp("shards_w1"))
  _build(sample_tenset_dir, data_dir, workers=1)
  return data_dir


def test_two_workers_write_the_same_files(tmp_path, sample_tenset_dir, one_worker, monkeypatch):
  jobs, pools = [], []
  real = file_stager.FileStager.map_ordered

  def spy(self, fn, items):
    items = list(items)
    if fn is shard_writer.write_shard:
      jobs.append((self.workers, len(items)))
    yield from real(self, fn, items)
    pools.append(self._pool)  # the writes ran to their end and left the pool running

  monkeypatch.setattr(file_stager.FileStager, "map_ordered", spy)
  data_dir = str(tmp_path / "w2")
  metas = _build(sample_tenset_dir, data_dir, workers=2)
  # Every config's shards went to the pool of 2, several shards per config.
  assert len(jobs) == len(metas) == 3
  assert all(w == 2 and n >= 12 for w, n in jobs), jobs
  # One pool read the files and wrote every config's shards.
  assert len(pools) == 3 and pools[0] is not None and all(p is pools[0] for p in pools)
  one, two = _files(one_worker), _files(data_dir)
  assert sorted(one) == sorted(two)
  shards = [p for p in one if ".array_record-" in p]
  assert len(shards) == sum(n for _, n in jobs)
  for rel in sorted(one):
    assert one[rel] == two[rel], rel


def test_shards_hold_the_plan_in_order(tmp_path, sample_tenset_dir, one_worker):
  # One shard per split (the plan's order, written by one job each) against many small shards:
  # the same examples in the same order, and each shard's length where dataset_info says.
  whole = str(tmp_path / "whole")
  _build(sample_tenset_dir, whole, workers=2, shard_size=1_000_000)
  uneven = 0
  for config in ("epyc-9004", "xeon-emr-16c", "all"):
    a, b = loader.load_arrays(whole, config), loader.load_arrays(one_worker, config)
    for split in schema.SPLITS:
      for name in schema.FIELDS:
        x, y = getattr(a.split(split), name), getattr(b.split(split), name)
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), (config, split, name)
    ds_dir = loader.find_dataset_dir(one_worker, config)
    with open(os.path.join(ds_dir, schema.DATASET_INFO_FILE)) as f:
      info = json.load(f)
    for split in info["splits"]:
      paths = schema.shard_files(ds_dir, split["name"])
      lengths = [int(n) for n in split["shardLengths"]]
      assert len(paths) == len(lengths)
      uneven += len(set(lengths)) > 1
      for path, n in zip(paths, lengths):
        reader = array_record_module.ArrayRecordReader(path)
        assert reader.num_records() == n, path
        reader.close()
      assert int(split["numBytes"]) == sum(os.path.getsize(p) for p in paths)
  assert uneven >= 3  # near-equal, not equal, lengths: a length given to another shard shows


def test_a_failed_shard_is_an_error_and_commits_nothing(
  tmp_path, sample_tenset_dir, one_worker, monkeypatch
):
  data_dir = str(tmp_path / "data")
  _build(sample_tenset_dir, data_dir, workers=1)
  before = _files(data_dir)
  real = shard_writer.save_table

  def corrupt(table_dir, rows, task_index, scores, task_min_cost, splits):
    real(table_dir, rows, task_index, scores, task_min_cost, splits)
    # The last test example points past the staged rows: its shard fails in a worker.
    path = os.path.join(table_dir, "feature_row.npy")
    row = np.load(path)
    row[splits["test"][-1]] = 10**9
    np.save(path, row)

  monkeypatch.setattr(shard_writer, "save_table", corrupt)
  with pytest.raises(
    tenset_tfds.DatasetBuildError, match=r"tenset-test\.array_record-000\d\d-of-000\d\d: IndexError"
  ):
    _build(sample_tenset_dir, data_dir, workers=2)
  # The earlier datasets are as they were; no staging folder or partial dataset is left.
  assert _files(data_dir) == before
  assert sorted(os.listdir(data_dir)) == [".build.lock", schema.BUILDER_NAME]


def test_shard_ranges_are_array_split():
  for n, size in [(1, 5), (10, 5), (11, 5), (524, 70), (384, 1000)]:
    parts = np.array_split(np.arange(n), -(-n // size))
    assert shard_writer.shard_ranges(n, size) == [(int(p[0]), int(p[-1]) + 1) for p in parts]
