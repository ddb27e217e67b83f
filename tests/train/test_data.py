"""tlp_jax.train.data: epoch order, heads, few-shot masks, the model input from the dataset."""

import dataclasses
import math
import types

import numpy as np
import pytest

from configs import mtl
from tlp_jax.core import loop_tokens as loop_tokens_lib
from tlp_jax.train import data
from tlp_jax.train import model as model_lib


def test_epoch_order_is_a_padded_seeded_permutation():
  order, valid = data.epoch_order(seed=3, epoch=1, n=10, steps_per_epoch=3, global_batch=4)
  assert order.shape == valid.shape == (12,)
  assert sorted(order[valid]) == list(range(10))
  assert not valid[10:].any()
  again, _ = data.epoch_order(3, 1, 10, 3, 4)
  np.testing.assert_array_equal(order, again)
  other, _ = data.epoch_order(3, 2, 10, 3, 4)
  assert not np.array_equal(order[:10], other[:10])


def test_by_task_order_keeps_tasks_contiguous_and_covers_every_row_once():
  task_index = np.random.default_rng(0).integers(0, 7, size=50)
  order, valid = data.epoch_order(
    3, 1, 50, steps_per_epoch=4, global_batch=16, task_index=task_index
  )
  rows = order[valid]
  assert sorted(rows.tolist()) == list(range(50))
  tasks = task_index[rows]
  # Contiguous runs: the number of task changes is the number of distinct tasks minus one.
  assert np.count_nonzero(np.diff(tasks)) == len(np.unique(task_index)) - 1
  again, _ = data.epoch_order(3, 1, 50, 4, 16, task_index)
  np.testing.assert_array_equal(order, again)
  other_epoch, _ = data.epoch_order(3, 2, 50, 4, 16, task_index)
  assert not np.array_equal(order, other_epoch)


def test_random_order_is_unchanged_by_the_option():
  order, valid = data.epoch_order(5, 0, 30, 2, 16)
  expected = np.random.default_rng([5, data._STREAM_SHUFFLE, 0]).permutation(30)
  np.testing.assert_array_equal(order[valid], expected)
  assert valid.sum() == 30 and not valid[30:].any()


def test_head_columns_target_first_and_errors():
  assert data.head_columns(["a", "b", "c"], ["c", "a"]) == [2, 0]
  assert data.head_columns(["a", "b"], []) == [0, 1]
  with pytest.raises(ValueError, match=r"\['z'\] not in the dataset's hardware"):
    data.head_columns(["a", "b"], ["a", "z"])


def test_few_shot_mask_keeps_n_target_labels_deterministically():
  rng = np.random.default_rng(0)
  mask = rng.random((200, 2)) > 0.2
  present = int(mask[:, 0].sum())
  out = data.few_shot_mask(mask, num_labels=17, fraction=1.0, seed=5)
  assert out[:, 0].sum() == 17
  assert not (out[:, 0] & ~mask[:, 0]).any()  # a subset of the present labels
  np.testing.assert_array_equal(out[:, 1], mask[:, 1])  # other heads untouched
  np.testing.assert_array_equal(out, data.few_shot_mask(mask, 17, 1.0, seed=5))
  assert not np.array_equal(out, data.few_shot_mask(mask, 17, 1.0, seed=6))
  frac = data.few_shot_mask(mask, -1, 0.25, seed=5)
  assert frac[:, 0].sum() == math.floor(0.25 * present)
  assert data.few_shot_mask(mask, -1, 1.0, seed=5) is mask


def test_mtl_heads_target_first_and_few_shot_on_the_joined_dataset(sample_arrays):
  dataset = sample_arrays("all")
  config = mtl.get_config()
  columns = data.head_columns(dataset.hardware, config.hardware)
  assert [dataset.hardware[c] for c in columns] == ["xeon-emr-16c", "epyc-9004"]
  split = data.select_heads(dataset.train, columns)
  np.testing.assert_array_equal(
    split.mask[:, 0], dataset.train.mask[:, columns[0]][dataset.train.mask[:, columns].any(axis=1)]
  )
  assert split.mask.any(axis=1).all()  # rows without any selected label are dropped
  kept = data.few_shot_mask(split.mask, num_labels=50, fraction=1.0, seed=0)
  assert kept[:, 0].sum() == 50 and (kept[:, 1] == split.mask[:, 1]).all()


def _loop_dataset(max_tokens=16):
  meta = {"tenset_dir": "/data/tenset"}
  if max_tokens:
    meta["loop_tokens"] = {
      "layout_version": loop_tokens_lib.LAYOUT_VERSION,
      "max_tokens": max_tokens,
      "width": loop_tokens_lib.WIDTH,
    }
  return types.SimpleNamespace(
    crop=(25, 22), metadata=meta, platform="llvm", vocab_json="{}", config_name="epyc-9004"
  )


def test_model_input_grows_by_the_loop_tokens_it_reads():
  model = model_lib.TLPConfig()  # the step crop: 25 x 22
  loop = _loop_dataset()
  width = loop_tokens_lib.WIDTH
  cfg = data.model_config_for(model, "auto", loop, num_hardware_heads=2)
  assert (cfg.seq_len, cfg.feature_dim, cfg.num_hardware_heads) == (25 + 16, 22 + width, 2)
  assert data.dataset_meta(loop, ["a", "b"], loop_tokens=True) == {
    "hardware": ["a", "b"],
    "platform": "llvm",
    "crop": [25 + 16, 22 + width],
    "vocab_json": "{}",
    "loop_tokens": {
      "layout_version": loop_tokens_lib.LAYOUT_VERSION,
      "max_tokens": 16,
      "width": width,
    },
  }
  # "off": the step tokens only, exported as a TLP model of the step crop.
  off = data.model_config_for(model, "off", loop, num_hardware_heads=1)
  assert (off.seq_len, off.feature_dim) == (25, 22)
  assert data.dataset_meta(loop, ["a"], loop_tokens=False)["crop"] == [25, 22]
  tlp = _loop_dataset(max_tokens=0)
  assert data.model_config_for(model, "auto", tlp, 1) == model
  # A config's dtype "auto" becomes this backend's (float32 on the CPU, model.resolve_dtype).
  auto = data.model_config_for(dataclasses.replace(model, dtype="auto"), "auto", tlp, 1)
  assert auto == model and auto.dtype == "float32"
  # "required" on a dataset without tokens names the command that makes them.
  with pytest.raises(
    ValueError,
    match="loop_tokens='required'.*'epyc-9004'.*"
    "python -m tlp_jax.tvm.skeleton_extract --tenset_dir /data/tenset",
  ):
    data.reads_loop_tokens("required", tlp)
  with pytest.raises(ValueError, match=r"model.seq_len=25, model.feature_dim=22"):
    data.model_config_for(model_lib.TLPConfig(seq_len=40, feature_dim=20), "auto", loop, 1)


def test_select_heads_drops_rows_without_a_selected_label():
  split = types.SimpleNamespace(
    features=np.arange(4 * 2 * 3, dtype=np.float64).reshape(4, 2, 3),
    scores=np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.float64),
    mask=np.array([[1, 0], [0, 0], [0, 1], [1, 1]], bool),
    task_index=np.arange(4),
  )
  got = data.select_heads(split, [1, 0])
  np.testing.assert_array_equal(got.task_index, [0, 2, 3])
  np.testing.assert_array_equal(got.scores, [[2, 1], [6, 5], [8, 7]])
  np.testing.assert_array_equal(got.mask, [[0, 1], [1, 0], [1, 1]])
  assert got.features.dtype == np.float32 and got.size == 3


class _Device:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_device_data_budget_auto_uses_the_smallest_free_device_memory():
  devs = [
    _Device({"bytes_limit": 100 << 30, "bytes_in_use": 4 << 30}),
    _Device({"bytes_limit": 80 << 30, "bytes_in_use": 0}),
  ]
  assert data.device_data_budget("auto", devs) == int(data.AUTO_DEVICE_DATA_FRACTION * (80 << 30))
  # An explicit byte count is kept as it is.
  assert data.device_data_budget(4 << 30, devs) == 4 << 30


def test_device_data_budget_auto_without_device_stats_uses_host_memory(monkeypatch):
  monkeypatch.setattr(data, "host_memory_bytes", lambda: 64 << 30)
  assert data.device_data_budget("auto", [_Device(None)]) == int(
    data.AUTO_DEVICE_DATA_FRACTION * (64 << 30)
  )
  monkeypatch.setattr(data, "host_memory_bytes", lambda: None)
  with pytest.raises(ValueError, match="set a byte count"):
    data.device_data_budget("auto", [_Device(None)])


def test_device_data_budget_on_jax_devices_and_bad_values():
  import jax

  assert data.device_data_budget("auto", jax.local_devices()) > 0
  for bad in ("4GiB", -1, 1.5, True):
    with pytest.raises(ValueError, match="device_data_max_bytes"):
      data.device_data_budget(bad, jax.local_devices())


def test_cudnn_attention_only_on_nvidia_gpus_from_ampere_on():
  import jax

  class _Client:
    def __init__(self, version):
      self.platform_version = version

  class _Gpu:
    platform = "gpu"

    def __init__(self, version, capability):
      self.client = _Client(version)
      self.compute_capability = capability

  assert data.has_cudnn_attention(_Gpu("PJRT C API\ncuda 12080", "9.0"))  # H100/H200
  assert data.has_cudnn_attention(_Gpu("PJRT C API\ncuda 12080", "8.0"))  # A100
  assert not data.has_cudnn_attention(_Gpu("PJRT C API\ncuda 12080", "7.5"))  # T4
  assert not data.has_cudnn_attention(_Gpu("PJRT C API\nrocm 60300", "9.0"))
  assert not data.has_cudnn_attention(jax.local_devices()[0])  # this machine's CPU
