"""The "loop" feature version: loop-nest store vectors appended to TLP's step tokens.

The NumPy parts run everywhere; replaying records and states needs TVM (skipped without it).
"""
import dataclasses
import importlib
import importlib.util
import os
import shutil

import jax
import numpy as np
import pytest

from data_pipelines import build as build_cli
from data_pipelines import loader
from data_pipelines import tenset_tfds
from tlp_jax.core import features
from tlp_jax.core import predictor as npred
from tlp_jax.core import records
from tlp_jax.evaluation import run as eval_run
from tlp_jax.train import export
from tlp_jax.train import model as model_lib
from tlp_jax.train import config as config_lib
from tlp_jax.train import data
from tlp_jax.train import loop
from tlp_jax.tvm import loop_features
from tlp_jax.tvm import search_tasks

HAS_TVM = importlib.util.find_spec("tvm") is not None
needs_tvm = pytest.mark.skipif(not HAS_TVM, reason="TVM not installed (pip install -e '.[tvm]')")

LOOP_STORES = 4  # fewer than the sample's largest programs (9 stores): the crop is exercised


def test_append_loop_features_uses_disjoint_blocks():
  rng = np.random.default_rng(0)
  steps = rng.normal(size=(3, 5, 4)).astype(np.float32)
  stores = rng.normal(size=(3, 2, 6)).astype(np.float32)
  out = features.append_loop_features(steps, stores)
  assert out.shape == (3, 7, 10) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :5, :4], steps)
  np.testing.assert_array_equal(out[:, 5:, 4:], stores)
  assert not out[:, :5, 4:].any() and not out[:, 5:, :4].any()
  with pytest.raises(ValueError, match="same n"):
    features.append_loop_features(steps, stores[:2])


def test_pad_stores_crops_pads_and_counts():
  progs = [np.ones((3, 2)), np.zeros((0, 2)), np.arange(2.0).reshape(1, 2)]
  out, stats = loop_features.pad_stores(progs, max_stores=2, dim=2)
  assert out.shape == (3, 2, 2)
  np.testing.assert_array_equal(out[0], np.ones((2, 2)))
  assert not out[1].any()
  np.testing.assert_array_equal(out[2], [[0.0, 1.0], [0.0, 0.0]])
  assert stats.to_dict() == {"programs": 3, "cropped": 1, "no_store": 1, "max_stores_seen": 3}


def test_canonical_order_removes_store_and_buffer_permutations():
  # Two buffer blocks of width 3 ("acc", "lines", "bytes") at 1 and 4, one leading value.
  names = ["x", "B0.acc_type.kRead", "B0.lines", "B0.bytes",
           "B1.acc_type.kRead", "B1.lines", "B1.bytes", "y"]
  layout = loop_features.BufferLayout.from_names(names)
  assert layout == loop_features.BufferLayout(starts=(1, 4), width=3, lines=1, bytes=2)
  store_a = np.array([1, 0, 5, 9, 1, 5, 2, 7], np.float32)  # buffers tie on lines: bytes decide
  store_b = np.array([3, 1, 2, 2, 0, 0, 0, 0], np.float32)
  want = np.array([[3, 1, 2, 2, 0, 0, 0, 0], [1, 0, 5, 9, 1, 5, 2, 7]], np.float32)
  swapped_a = store_a[[0, 4, 5, 6, 1, 2, 3, 7]]  # the same buffers in the other slots
  for stores in ([store_a, store_b], [store_b, store_a], [swapped_a, store_b]):
    np.testing.assert_array_equal(loop_features.canonical_order(np.stack(stores), layout), want)
  assert loop_features.canonical_order(np.zeros((0, 8)), layout).shape == (0, 8)


def test_model_input_follows_loop_tokens_mode(sample_arrays):
  tlp = sample_arrays("epyc-9004")
  loop = dataclasses.replace(tlp, crop=(25 + LOOP_STORES, 22 + 164),
                             metadata={**tlp.metadata, "loop_stores": LOOP_STORES,
                                       "loop_dim": 164})

  def shape(config_name, dataset, **overrides):
    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.update(overrides)
    typed = config_lib.from_config_dict(config)
    cfg = data.model_config_for(typed.model, typed.loop_tokens, dataset, 1)
    meta = data.dataset_meta(dataset, ["epyc-9004"],
                             data.reads_loop_tokens(typed.loop_tokens, dataset))
    return (cfg.seq_len, cfg.feature_dim), tuple(meta["crop"]), meta.get("loop_stores", 0)

  # default ("auto"): step tokens on a TLP build, steps + stores on a loop build.
  assert shape("default", tlp) == ((25, 22), (25, 22), 0)
  full = (25 + LOOP_STORES, 22 + 164)
  assert shape("default", loop) == (full, full, LOOP_STORES)
  assert shape("loopnest", loop) == (full, full, LOOP_STORES)
  # The original reads TLP's steps only, on either build; its export is a TLP model.
  assert shape("tlp_original", loop) == ((25, 22), (25, 22), 0)
  with pytest.raises(ValueError,
                     match="dataset 'epyc-9004' has no loop-nest features.*--loop_stores"):
    shape("loopnest", tlp)
  with pytest.raises(ValueError, match="step crop"):
    config = importlib.import_module("configs.default").get_config()
    config.model.seq_len = 20  # the stores would not be where the model looks for them
    typed = config_lib.from_config_dict(config)
    data.model_config_for(typed.model, typed.loop_tokens, loop, 1)
  with pytest.raises(ValueError, match="loop_tokens"):
    shape("default", loop, loop_tokens="yes")


def _tiny_export(tmp_path, crop, loop_stores=0, loop_dim=0):
  cfg = model_lib.TLPConfig(feature_dim=crop[1], seq_len=crop[0], encoder_dims=(8, 8),
                            attention_heads=2, res_blocks=1, decoder_dims=(8, 1),
                            input_norm="log1p")
  params = model_lib.TLPModel(cfg).init(jax.random.PRNGKey(0),
                                        np.zeros((1,) + tuple(crop), np.float32))["params"]
  path = str(tmp_path / f"model{loop_stores}.npz")
  export.save_npz(path, params, cfg, hardware=["hw"], platform="llvm", crop=crop,
                  vocab_json=features.Vocabulary.original("llvm").to_json(), step=0,
                  loop_stores=loop_stores, loop_dim=loop_dim)
  return path


def test_loop_model_export_and_numpy_predictor(tmp_path):
  steps = [[["SP", 2, 0, 64, [8, 4], 1], ["AN", 2, 0, 3]],
           [["PR", 2, 0, "auto_unroll_max_step$16"]]]
  tlp = npred.Predictor.load(_tiny_export(tmp_path, (25, 22)))
  assert tlp.format_version == npred.FORMAT_VERSION and tlp.loop_stores == 0
  with pytest.raises(npred.PredictorError, match="TLP step features only"):
    tlp.predict_steps(steps, store_features=np.zeros((2, 2, 3)))

  loop = npred.Predictor.load(_tiny_export(tmp_path, (27, 25), loop_stores=2, loop_dim=3))
  assert loop.format_version == npred.FORMAT_VERSION and (loop.loop_stores, loop.loop_dim) == (2, 3)
  assert loop.step_crop == (25, 22)
  with pytest.raises(npred.PredictorError, match="loop-nest store vectors"):
    loop.predict_steps(steps)
  with pytest.raises(npred.PredictorError, match=r"must be \(2, 2, 3\)"):
    loop.predict_steps(steps, store_features=np.zeros((2, 3, 3)))
  stores = np.random.default_rng(1).uniform(0, 5, size=(2, 2, 3)).astype(np.float32)
  got = loop.predict_steps(steps, store_features=stores)
  want = loop.predict(features.append_loop_features(
      features.Featurizer("llvm", crop=(25, 22)).featurize_many(steps), stores))
  np.testing.assert_array_equal(got, want)
  # The store vectors change the score: they are read, not cropped away.
  assert not np.allclose(got, loop.predict_steps(steps, store_features=stores * 0))


def test_export_rejects_loop_features_outside_the_crop(tmp_path):
  with pytest.raises(ValueError, match="do not fit"):
    _tiny_export(tmp_path, (25, 22), loop_stores=25, loop_dim=3)


@pytest.fixture(scope="module")
def loop_sample(tmp_path_factory, sample_tenset_dir):
  """The sample's epyc-9004 config built with LOOP_STORES loop-nest tokens."""
  data_dir = str(tmp_path_factory.mktemp("loop_data"))
  configs = tenset_tfds.make_configs(sample_tenset_dir, hardware=["epyc-9004"], multi=False,
                                     loop_stores=LOOP_STORES)
  metas = tenset_tfds.build(sample_tenset_dir, data_dir, configs,
                            store_features=build_cli.tvm_store_features(sample_tenset_dir))
  return data_dir, metas[0]


@needs_tvm
def test_build_appends_store_vectors_to_the_same_examples(loop_sample, sample_arrays,
                                                          sample_tenset_dir):
  data_dir, meta = loop_sample
  dim = loop_features.feature_dim()
  assert meta["loop_stores"] == LOOP_STORES and meta["loop_dim"] == dim
  assert meta["crop"] == [25 + LOOP_STORES, 22 + dim]
  stats = meta["loop_stats"]["epyc-9004"]
  assert stats["programs"] == meta["examples"]["train"] + meta["examples"]["validation"] + \
      meta["examples"]["test"]
  assert stats["cropped"] > 0 and stats["max_stores_seen"] > LOOP_STORES

  loop = loader.load_arrays(data_dir, "epyc-9004")
  tlp = sample_arrays("epyc-9004")
  for split in ("train", "test"):
    a, b = getattr(loop, split), getattr(tlp, split)
    np.testing.assert_array_equal(a.features[:, :25, :22], b.features)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.asarray(a.features[:, :25, 22:]).any()
    assert not np.asarray(a.features[:, 25:, :22]).any()
  # Every program has at least one store, and its vector is what TVM computes for its record.
  assert np.asarray(loop.train.features[:, 25]).any(axis=-1).all()
  folder = os.path.join(sample_tenset_dir, "measure_records", "epyc-9004")
  first_file = os.path.join(folder, sorted(os.listdir(folder))[0])
  valid_lines = records.read_task_file(first_file).line_numbers[:3]
  search_tasks.register_tenset_tasks(sample_tenset_dir)
  stores, _ = loop_features.store_features_from_lines(
      records.lines_at(first_file, valid_lines), LOOP_STORES)
  rows = np.concatenate([np.asarray(getattr(loop, split).features[:, 25:, 22:])
                         for split in ("train", "validation", "test")])
  for s in stores:
    assert np.any(np.all(rows == s, axis=(1, 2)))


@needs_tvm
def test_records_and_tuner_states_give_the_same_store_vectors(sample_tenset_dir):
  """The dataset (records) and the tuner (states) compute identical loop-nest features."""
  from tvm.auto_scheduler.measure import recover_measure_input
  from tvm.auto_scheduler import measure_record
  search_tasks.register_tenset_tasks(sample_tenset_dir)
  folder = os.path.join(sample_tenset_dir, "measure_records", "epyc-9004")
  path = os.path.join(folder, sorted(os.listdir(folder))[3])
  lines = records.lines_at(path, [1, 2, 3])
  from_records, _ = loop_features.store_features_from_lines(lines, LOOP_STORES)
  inputs = [recover_measure_input(measure_record.load_record_from_string(l.decode())[0],
                                  rebuild_state=True) for l in lines]
  from_states, _ = loop_features.store_features_from_states(
      inputs[0].task, [i.state for i in inputs], LOOP_STORES)
  np.testing.assert_array_equal(from_records, from_states)
  assert from_records.any()


@needs_tvm
def test_store_vectors_are_deterministic(sample_tenset_dir):
  """TVM returns stores and buffers in hash-map order; the canonical order removes that."""
  search_tasks.register_tenset_tasks(sample_tenset_dir)
  folder = os.path.join(sample_tenset_dir, "measure_records", "epyc-9004")
  paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:30]]

  def all_vectors():
    return np.concatenate([loop_features.store_features_from_lines(
        records.lines_at(p, records.read_task_file(p).line_numbers), 10)[0]
                           for p in paths])

  first = all_vectors()
  np.testing.assert_array_equal(first, all_vectors())


def test_missing_tasks_file_is_a_clear_build_error(tmp_path, sample_tenset_dir):
  src = tmp_path / "tenset"
  shutil.copytree(sample_tenset_dir, src)
  os.remove(src / "network_info" / "all_tasks.pkl")
  with pytest.raises(FileNotFoundError, match="all_tasks.pkl"):
    build_cli.tvm_store_features(str(src))


def test_loop_config_without_store_features_is_a_build_error(tmp_path, sample_tenset_dir):
  """The builder never imports TVM: the loop-nest vectors must be given to it."""
  configs = tenset_tfds.make_configs(sample_tenset_dir, hardware=["xeon-emr-16c"], multi=False,
                                     loop_stores=2)
  with pytest.raises(tenset_tfds.DatasetBuildError, match="data_pipelines.build --loop_stores"):
    tenset_tfds.build(sample_tenset_dir, str(tmp_path / "data"), configs)


def test_build_passes_store_vectors_of_the_kept_lines(tmp_path, sample_tenset_dir):
  """The builder hands the raw lines of the kept records to the given store features."""
  calls = []

  def of_lines(lines, max_stores, where):
    calls.append((where, lines))
    n = len(lines)
    out = np.zeros((n, max_stores, 3), np.float32)
    out[:, 0, 1] = 1.0
    return out, loop_features.LoopFeatureStats(programs=n)

  configs = tenset_tfds.make_configs(sample_tenset_dir, hardware=["xeon-emr-16c"], multi=False,
                                     loop_stores=2)
  meta, = tenset_tfds.build(sample_tenset_dir, str(tmp_path / "data"), configs,
                            store_features=tenset_tfds.StoreFeatures(dim=3, of_lines=of_lines))
  assert meta["crop"] == [27, 25] and meta["loop_dim"] == 3
  assert meta["loop_stats"]["xeon-emr-16c"]["programs"] == sum(meta["examples"].values())
  where, lines = calls[0]
  tf = records.read_task_file(where)
  assert lines == records.lines_at(where, tf.line_numbers)
  arrays = loader.load_arrays(str(tmp_path / "data"), "xeon-emr-16c")
  assert np.all(np.asarray(arrays.train.features[:, 25, 23]) == 1.0)


@needs_tvm
def test_train_and_eval_a_loop_model(loop_sample, tmp_path):
  """configs/loopnest.py-shaped model trains on the loop dataset; eval goes through its export."""
  data_dir, _ = loop_sample
  arrays = loader.load_arrays(data_dir, "epyc-9004")
  config = importlib.import_module("configs.test").get_config()
  config.data_dir = data_dir
  config.dataset = "epyc-9004"
  config.hardware = ("epyc-9004",)
  config.num_epochs = 1
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(config, workdir, dataset=arrays, devices=jax.devices()[:1])
  assert result.model_config.seq_len == 25 + LOOP_STORES
  assert np.isfinite(result.validation["val_loss"])
  report = eval_run.evaluate_model(hw="epyc-9004", data_dir=data_dir, workdir=workdir,
                                   which="latest")
  assert 0.0 <= report["rows"]["TLP (workdir)"]["pooled"]["top-1"] <= 1.0
  # loop_tokens="off" on the same data trains a TLP model: it exports as one, with the step
  # crop, and the NumPy predictor scores TLP features with it.
  config.loop_tokens = "off"
  off = loop.train_and_evaluate(config, str(tmp_path / "off"), dataset=arrays,
                                devices=jax.devices()[:1])
  assert (off.model_config.seq_len, off.model_config.feature_dim) == (25, 22)
  exported = export.export_workdir(str(tmp_path / "off"), str(tmp_path / "off.npz"), "latest")
  assert npred.META_LOOP_STORES not in exported
  pred = npred.Predictor.load(str(tmp_path / "off.npz"))
  assert pred.crop == (25, 22) and pred.loop_stores == 0
  x = arrays.test.features[:50]
  want = export.make_predict_fn(off.model_config)(off.state.params, x)[:, 0]
  np.testing.assert_allclose(pred.predict(x[:, :25, :22]), want, rtol=1e-4, atol=1e-4)
