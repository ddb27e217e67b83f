"""tlp_jax.train.init_from: fine-tuning from a workdir or an export (configs/test.py, sample)."""

import dataclasses
import os

import jax
import numpy as np
import optax
import pytest

from tlp_jax.core import predictor as npred
from tlp_jax.train import config as config_lib
from tlp_jax.train import export, init_from, loop
from tlp_jax.train import model as model_lib


def _params(workdir, which="best"):
  params, _, meta = export.restore_for_export(workdir, which)
  return params, meta


def _frozen_run(new_test_config, source, workdir, **overrides):
  """One epoch at learning rate 0: the run's final parameters are its initial ones."""
  config = new_test_config()
  config.init_from = source
  config.num_epochs = 1
  config.optim.learning_rate = 0.0
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return loop.train_and_evaluate(config, str(workdir))


def _assert_tree_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_head_sources_match_by_name_else_first_head():
  assert init_from.head_sources(["epyc-9004"], ["epyc-9004"]) == [0]
  assert init_from.head_sources(["epyc-9004"], ["xeon-emr-16c", "epyc-9004"]) == [0, 0]
  assert init_from.head_sources(["xeon-emr-16c", "epyc-9004"], ["epyc-9004", "new"]) == [1, 0]


def test_starts_from_the_workdirs_best_checkpoint(trained, new_test_config, tmp_path):
  source, _ = trained
  result = _frozen_run(new_test_config, source, tmp_path / "ft")
  want, _ = _params(source, "best")
  _assert_tree_equal(jax.device_get(result.state.params), want)
  # A fresh start would differ from the source's trained parameters.
  fresh = model_lib.init_params(result.model_config, jax.random.PRNGKey(0))
  assert not np.array_equal(np.asarray(fresh["encoder_0"]["kernel"]), want["encoder_0"]["kernel"])


def test_another_compute_dtype_starts_from_the_same_parameters(trained, new_test_config, tmp_path):
  # A model trained in bfloat16 on a GPU fine-tunes in float32 on a CPU, and back: the compute
  # dtype is not part of the parameters.
  source, _ = trained
  result = _frozen_run(new_test_config, source, tmp_path / "ft", **{"model.dtype": "bfloat16"})
  assert result.model_config.dtype == "bfloat16"
  want, _ = _params(source, "best")
  _assert_tree_equal(jax.device_get(result.state.params), want)


def test_starts_from_an_export_float32_or_float16(trained, new_test_config, tmp_path):
  source, _ = trained
  npz = str(tmp_path / "model.npz")
  arrays = export.export_workdir(source, npz)
  result = _frozen_run(new_test_config, npz, tmp_path / "ft32")
  want, _ = _params(source, "best")
  _assert_tree_equal(jax.device_get(result.state.params), want)

  half = {
    k: (v.astype(np.float16) if k.startswith(npred.PARAMS_PREFIX) else v) for k, v in arrays.items()
  }
  np.savez(str(tmp_path / "half.npz"), **half)
  result = _frozen_run(new_test_config, str(tmp_path / "half.npz"), tmp_path / "ft16")
  got = jax.device_get(result.state.params)
  jax.tree_util.tree_map(
    lambda g, w: np.testing.assert_array_equal(g, w.astype(np.float16).astype(np.float32)),
    got,
    want,
  )


def test_a_head_the_source_lacks_starts_from_its_first_head(trained, new_test_config, tmp_path):
  source, _ = trained  # one epyc-9004 head
  result = _frozen_run(
    new_test_config,
    source,
    tmp_path / "mtl",
    dataset="all",
    hardware=("xeon-emr-16c", "epyc-9004"),
  )
  want, _ = _params(source, "best")
  got = jax.device_get(result.state.params)
  for name, layer in got["heads"].items():
    for leaf, value in layer.items():
      assert value.shape[0] == 2
      np.testing.assert_array_equal(value[0], want["heads"][name][leaf][0])
      np.testing.assert_array_equal(value[1], want["heads"][name][leaf][0])
  np.testing.assert_array_equal(
    got["attention"]["query"]["kernel"], want["attention"]["query"]["kernel"]
  )


def test_heads_mode_trains_only_the_heads(trained, new_test_config, tmp_path):
  source, _ = trained
  config = new_test_config()
  config.init_from = source
  config.init_mode = "heads"
  config.num_epochs = 2
  result = loop.train_and_evaluate(config, str(tmp_path / "heads"))
  want, _ = _params(source, "best")
  got = jax.device_get(result.state.params)
  for name in got:
    same = jax.tree_util.tree_all(
      jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), got[name], want[name])
    )
    assert same == (name != "heads"), name


def _small_ensemble(ensemble_size):
  """A small TLPConfig: two hardware heads, ``ensemble_size`` members."""
  return model_lib.TLPConfig(
    encoder_dims=(8, 8),
    attention_heads=2,
    res_blocks=1,
    decoder_dims=(4, 1),
    num_hardware_heads=2,
    ensemble_size=ensemble_size,
  )


def test_wrap_optimizer_zeroes_trunk_updates_of_an_ensemble():
  cfg = _small_ensemble(2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  grads = jax.tree_util.tree_map(jax.numpy.ones_like, params)
  for mode, trunk_moves in (("all", True), ("heads", False)):
    tx = init_from.wrap_optimizer(optax.adamw(1e-2, weight_decay=0.1), mode)
    updates, _ = tx.update(grads, tx.init(params), params)
    moved = jax.tree_util.tree_map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert all(jax.tree_util.tree_leaves(moved["members"]["heads"]))
    trunk = {k: v for k, v in moved["members"].items() if k != "heads"}
    assert set(jax.tree_util.tree_leaves(trunk)) == {trunk_moves}


def test_ensemble_heads_are_picked_on_the_head_axis():
  cfg = _small_ensemble(3)
  params = jax.tree_util.tree_map(np.asarray, model_lib.init_params(cfg, jax.random.PRNGKey(1)))
  source = init_from.Source("src", "npz", params, cfg, {"hardware": ["a", "b"]})
  out = init_from.initial_params(source, cfg, ["b", "c", "a"])
  kernel = params["members"]["heads"]["dense_0"]["kernel"]  # (members, heads, in, out)
  got = out["members"]["heads"]["dense_0"]["kernel"]
  assert got.shape == (3, 3) + kernel.shape[2:]
  np.testing.assert_array_equal(got[:, 0], kernel[:, 1])
  np.testing.assert_array_equal(got[:, 1], kernel[:, 0])
  np.testing.assert_array_equal(got[:, 2], kernel[:, 0])
  np.testing.assert_array_equal(
    out["members"]["encoder_0"]["kernel"], params["members"]["encoder_0"]["kernel"]
  )


@pytest.mark.parametrize(
  "overrides, match",
  [
    ({"model.encoder_dims": (16, 16, 32, 64)}, r"model\.encoder_dims"),
    ({"loop_tokens": "off"}, r"model\.(feature_dim|seq_len)"),
    ({"model.input_norm": "none"}, r"model\.input_norm"),
  ],
)
def test_a_different_model_is_refused_in_one_line(
  trained, new_test_config, tmp_path, overrides, match
):
  source, _ = trained
  config = new_test_config()
  config.init_from = source
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  workdir = tmp_path / "bad"
  with pytest.raises(init_from.InitFromError, match=match) as e:
    loop.train_and_evaluate(config, str(workdir))
  assert "\n" not in str(e.value) and source in str(e.value)
  assert not os.path.exists(workdir / "model_config.json")  # refused before writing anything


def test_a_different_feature_layout_is_refused(trained):
  source_dir, _ = trained
  source = init_from.load_source(source_dir)
  _, model_config, meta = export.restore_for_export(source_dir)
  meta = {k: meta[k] for k in ("platform", "crop", "vocab_json", "loop_tokens")}
  init_from.check_compatible(source, model_config, meta)  # itself: fine
  with pytest.raises(init_from.InitFromError, match=r"'platform'"):
    init_from.check_compatible(source, model_config, {**meta, "platform": "cuda"})
  with pytest.raises(init_from.InitFromError, match=r"'loop_tokens'"):
    init_from.check_compatible(
      source, model_config, {**meta, "loop_tokens": {**meta["loop_tokens"], "layout_version": 1}}
    )


def test_unreadable_sources_are_refused_in_one_line(tmp_path, trained):
  with pytest.raises(init_from.InitFromError, match="no such training workdir"):
    init_from.load_source(str(tmp_path / "missing"))
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"not a zip")
  with pytest.raises(init_from.InitFromError, match="not a readable .npz"):
    init_from.load_source(str(junk))
  np.savez(str(tmp_path / "other.npz"), x=np.zeros(3))
  with pytest.raises(init_from.InitFromError, match="not a tlp-jax model export"):
    init_from.load_source(str(tmp_path / "other.npz"))
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  with pytest.raises(init_from.InitFromError, match="not a training workdir"):
    init_from.load_source(str(empty))
  # An export whose parameters were cut: refused against its own config.
  source_dir, _ = trained
  arrays = export.export_workdir(source_dir, str(tmp_path / "ok.npz"))
  cut = {k: v for k, v in arrays.items() if not k.endswith("encoder_0/bias")}
  np.savez(str(tmp_path / "cut.npz"), **cut)
  source = init_from.load_source(str(tmp_path / "cut.npz"))
  _, model_config, meta = export.restore_for_export(source_dir)
  with pytest.raises(init_from.InitFromError, match="do not match its model config"):
    init_from.check_compatible(source, model_config, source.meta)


def test_heads_mode_needs_a_source(new_test_config):
  config = new_test_config()
  config.init_mode = "heads"
  with pytest.raises(ValueError, match="needs config.init_from"):
    config_lib.from_config_dict(config)
  config.init_mode = "trunk"
  with pytest.raises(ValueError, match="init_mode"):
    config_lib.from_config_dict(config)


def test_a_workdir_without_validation_starts_from_its_latest(
  sample_arrays, new_test_config, tmp_path
):
  """An all-data run keeps no best checkpoint: its latest is the source."""
  arrays = sample_arrays("epyc-9004")
  empty = type(arrays.validation)(
    **{
      f.name: (
        None
        if getattr(arrays.validation, f.name) is None
        else getattr(arrays.validation, f.name)[:0]
      )
      for f in dataclasses.fields(arrays.validation)
    }
  )
  config = new_test_config()
  config.num_epochs = 1
  source = str(tmp_path / "all_data")
  loop.train_and_evaluate(config, source, dataset=dataclasses.replace(arrays, validation=empty))
  loaded = init_from.load_source(source)
  assert loaded.checkpoint == "latest"
  want, _ = _params(source, "latest")
  _assert_tree_equal(loaded.params, want)


def test_a_fine_tuning_run_resumes_after_its_source_is_gone(trained, new_test_config, tmp_path):
  """A rerun resumes from the run's own checkpoint and never reads the source again."""
  source, _ = trained
  npz = str(tmp_path / "source.npz")
  export.export_workdir(source, npz)
  workdir = tmp_path / "ft"
  first = _frozen_run(new_test_config, npz, workdir)
  os.remove(npz)
  again = _frozen_run(new_test_config, npz, workdir)  # same command: resumes, all done
  assert int(again.state.step) == int(first.state.step)
  _assert_tree_equal(jax.device_get(again.state.params), jax.device_get(first.state.params))
  # A new workdir still needs the source, and says so in one line.
  with pytest.raises(init_from.InitFromError):
    _frozen_run(new_test_config, npz, tmp_path / "other")


def test_a_shipped_starter_model_is_a_source(new_test_config, tmp_path):
  """``init_from=pretrained:NAME`` reads the package's starter model (here refused only because
  configs/test.py's tiny model differs from it); an unknown name lists the shipped ones."""
  with pytest.raises(init_from.InitFromError, match="pretrained:epyc-9004: its model differs"):
    _frozen_run(new_test_config, "pretrained:epyc-9004", tmp_path / "a")
  with pytest.raises(init_from.InitFromError, match="unknown pretrained model 'nope'; available"):
    _frozen_run(new_test_config, "pretrained:nope", tmp_path / "b")
  source = init_from.load_source("pretrained:epyc-9004")
  assert source.path == "pretrained:epyc-9004" and source.meta["hardware"] == ["epyc-9004"]
