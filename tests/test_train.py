"""Training library: configs, optimizer pieces, data order, end-to-end run, resume, errors."""

import importlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from tlp_jax.train import export
from tlp_jax.train import model as model_lib
from tlp_jax.core import predictor as npred
from tlp_jax.train import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("default", "gpu", "mtl", "test", "tlp_original")


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


def _test_config(data_dir):
  config = _config("test")
  config.data_dir = data_dir
  return config


# ---------------------------------------------------------------------------------------------
# Configs and optimizer pieces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_build(name):
  config = _config(name)
  heads = max(len(config.hardware), 1)
  model_config = train_lib.model_config_from(config, heads)
  assert model_config.num_heads == heads
  train_lib.optim_config_from(config)
  train_lib.loss_config_from(config)
  assert config.batch_size % 8 == 0


def test_tlp_original_is_the_original_recipe():
  config = _config("tlp_original")
  assert train_lib.model_config_from(config, 1) == model_lib.TLPConfig()
  optim = train_lib.optim_config_from(config)
  assert (optim.optimizer, optim.schedule) == ("adam", "step")
  assert (optim.learning_rate, optim.weight_decay, optim.grad_clip_norm) == (7e-4, 1e-6, 0.5)
  assert (optim.step_decay_every_epochs, optim.step_decay_rate) == (50 // 3, 1.0)
  assert (config.batch_size, config.num_epochs) == (1024, 50)
  loss = train_lib.loss_config_from(config)
  assert (loss.name, loss.group_by_task, loss.k) == ("lambdarank", False, None)
  gpu = train_lib.model_config_from(_config("gpu"), 1)
  assert (gpu.seq_len, gpu.feature_dim) == (40, 20)


def test_step_schedule_is_torch_steplr_stepped_per_epoch():
  cfg = train_lib.OptimConfig(optimizer="adam", schedule="step", learning_rate=0.1,
                              step_decay_every_epochs=2, step_decay_rate=0.5)
  _, schedule = train_lib.make_optimizer(cfg, steps_per_epoch=3, total_steps=30)
  for step in range(30):
    epoch = step // 3
    assert math.isclose(float(schedule(step)), 0.1 * 0.5 ** (epoch // 2), rel_tol=1e-6)
  const = train_lib.OptimConfig(optimizer="adam", schedule="step", step_decay_rate=1.0)
  _, schedule = train_lib.make_optimizer(const, steps_per_epoch=3, total_steps=30)
  assert {round(float(schedule(s)), 10) for s in range(30)} == {7e-4}


def test_warmup_cosine_schedule():
  cfg = train_lib.OptimConfig(learning_rate=1.0, warmup_epochs=2, end_learning_rate=0.0)
  _, schedule = train_lib.make_optimizer(cfg, steps_per_epoch=5, total_steps=50)
  assert float(schedule(0)) == 0.0
  assert math.isclose(float(schedule(10)), 1.0, rel_tol=1e-6)
  assert float(schedule(30)) < float(schedule(20)) < 1.0
  assert float(schedule(50)) == pytest.approx(0.0, abs=1e-6)


def test_adam_is_pytorch_adam_with_coupled_l2_after_clipping():
  # PyTorch: clip_grad_norm_(0.5); Adam.step with weight_decay: g += wd * p; moments; bias
  # correction; p -= lr * m_hat / (sqrt(v_hat) + eps). Written out by hand here.
  lr, wd, clip, eps = 0.01, 0.1, 0.5, 1e-8
  cfg = train_lib.OptimConfig(optimizer="adam", schedule="constant", learning_rate=lr,
                              weight_decay=wd, grad_clip_norm=clip)
  tx, _ = train_lib.make_optimizer(cfg, 1, 1)
  params = {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([0.3], np.float32)}
  grads_seq = [{"w": np.array([3.0, 0.0, -1.0], np.float32), "b": np.array([0.2], np.float32)},
               {"w": np.array([0.1, 0.2, 0.1], np.float32), "b": np.array([-0.1], np.float32)}]
  state = tx.init(params)
  p_jax = params
  p_ref = {k: v.astype(np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p_ref.items()}
  v = {k: np.zeros_like(v) for k, v in p_ref.items()}
  for t, grads in enumerate(grads_seq, start=1):
    updates, state = tx.update(grads, state, p_jax)
    p_jax = optax.apply_updates(p_jax, updates)
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    scale = min(1.0, clip / norm)
    for k in p_ref:
      g = grads[k] * scale + wd * p_ref[k]
      m[k] = 0.9 * m[k] + 0.1 * g
      v[k] = 0.999 * v[k] + 0.001 * g * g
      m_hat, v_hat = m[k] / (1 - 0.9 ** t), v[k] / (1 - 0.999 ** t)
      p_ref[k] = p_ref[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
  for k in p_ref:
    np.testing.assert_allclose(np.asarray(p_jax[k]), p_ref[k], rtol=1e-5, atol=1e-7)


def test_unknown_optimizer_or_schedule_is_an_error():
  with pytest.raises(ValueError, match="unknown optimizer 'sgdx'"):
    train_lib.OptimConfig(optimizer="sgdx")
  with pytest.raises(ValueError, match="unknown schedule"):
    train_lib.OptimConfig(schedule="linear")


# ---------------------------------------------------------------------------------------------
# Data order, heads, few-shot
# ---------------------------------------------------------------------------------------------


def test_epoch_order_is_a_padded_seeded_permutation():
  order, valid = train_lib.epoch_order(seed=3, epoch=1, n=10, steps_per_epoch=3, global_batch=4)
  assert order.shape == valid.shape == (12,)
  assert sorted(order[valid]) == list(range(10))
  assert not valid[10:].any()
  again, _ = train_lib.epoch_order(3, 1, 10, 3, 4)
  np.testing.assert_array_equal(order, again)
  other, _ = train_lib.epoch_order(3, 2, 10, 3, 4)
  assert not np.array_equal(order[:10], other[:10])


def test_head_columns_target_first_and_errors():
  assert train_lib.head_columns(["a", "b", "c"], ["c", "a"]) == [2, 0]
  assert train_lib.head_columns(["a", "b"], []) == [0, 1]
  with pytest.raises(ValueError, match=r"\['z'\] not in the dataset's hardware"):
    train_lib.head_columns(["a", "b"], ["a", "z"])


def test_few_shot_mask_keeps_n_target_labels_deterministically():
  rng = np.random.default_rng(0)
  mask = rng.random((200, 2)) > 0.2
  present = int(mask[:, 0].sum())
  out = train_lib.few_shot_mask(mask, num_labels=17, fraction=1.0, seed=5)
  assert out[:, 0].sum() == 17
  assert not (out[:, 0] & ~mask[:, 0]).any()  # a subset of the present labels
  np.testing.assert_array_equal(out[:, 1], mask[:, 1])  # other heads untouched
  np.testing.assert_array_equal(out, train_lib.few_shot_mask(mask, 17, 1.0, seed=5))
  assert not np.array_equal(out, train_lib.few_shot_mask(mask, 17, 1.0, seed=6))
  frac = train_lib.few_shot_mask(mask, -1, 0.25, seed=5)
  assert frac[:, 0].sum() == math.floor(0.25 * present)
  assert train_lib.few_shot_mask(mask, -1, 1.0, seed=5) is mask


# ---------------------------------------------------------------------------------------------
# End to end on the embedded sample (configs/test.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, built_sample_dataset):
  workdir = str(tmp_path_factory.mktemp("train") / "run")
  config = _test_config(built_sample_dataset)
  result = train_lib.train_and_evaluate(config, workdir)
  return workdir, result


def test_end_to_end_test_config(trained, sample_arrays):
  workdir, result = trained
  dataset = sample_arrays("epyc-9004")
  steps_per_epoch = math.ceil(len(dataset.train) / 64)
  assert int(result.state.step) == 3 * steps_per_epoch
  for name in (train_lib.MODEL_CONFIG_FILE, train_lib.DATASET_META_FILE,
               train_lib.TRAIN_CONFIG_FILE):
    assert os.path.exists(os.path.join(workdir, name))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  latest = os.path.join(workdir, "checkpoints", "latest")
  assert str(3 * steps_per_epoch) in os.listdir(latest)
  assert os.listdir(os.path.join(workdir, "checkpoints", "best"))

  val = result.validation
  assert val["epoch"] == 3
  assert 0 < val["val_top1/epyc-9004"] <= val["val_top5/epyc-9004"] <= 1
  # Trained beats untrained on the held-out validation loss.
  devices = jax.devices()[:1]
  layout = train_lib.BatchLayout.create(128, devices)
  split = train_lib.select_split(dataset.validation, [0])
  p_eval = jax.pmap(lambda p, *b: train_lib.eval_step(
      p, *b, model=model_lib.TLPModel(result.model_config),
      loss_config=train_lib.loss_config_from(_config("test"))),
                    axis_name=train_lib.AXIS, devices=devices)
  init = train_lib.create_train_state(result.model_config, optax.sgd(0.0), seed=0).params
  before = train_lib.evaluate(p_eval, train_lib.replicate_to_devices(init, devices), split,
                              layout, result.hardware, (1,))
  after = train_lib.evaluate(p_eval, train_lib.replicate_to_devices(result.state.params, devices),
                             split, layout, result.hardware, (1,))
  np.testing.assert_allclose(after["val_loss"], val["val_loss"], rtol=1e-4)
  assert after["val_loss"] < before["val_loss"]


def test_eval_every_epochs_changes_only_when_it_validates(trained, sample_arrays,
                                                         built_sample_dataset, tmp_path):
  """Validating every 2nd epoch (and the last) trains the same parameters, with fewer saves."""
  _, full = trained
  config = _test_config(built_sample_dataset)
  with config.unlocked():
    config.eval_every_epochs = 2
    config.checkpoint_every_steps = 0
  result = train_lib.train_and_evaluate(config, str(tmp_path), dataset=sample_arrays("epyc-9004"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, result.state.params, full.state.params)
  steps_per_epoch = math.ceil(len(sample_arrays("epyc-9004").train) / 64)
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints" / "latest"))
  assert saved == [2 * steps_per_epoch, 3 * steps_per_epoch]
  assert result.validation["epoch"] == 3


def test_eval_every_epochs_below_one_fails_before_any_work(built_sample_dataset, tmp_path):
  config = _test_config(built_sample_dataset)
  with config.unlocked():
    config.eval_every_epochs = 0
  with pytest.raises(ValueError, match="eval_every_epochs"):
    train_lib.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_restore_for_export(trained, sample_arrays):
  workdir, result = trained
  params, model_config, meta = train_lib.restore_for_export(workdir, "latest")
  assert model_config == result.model_config
  assert meta["hardware"] == ["epyc-9004"]
  dataset = sample_arrays("epyc-9004")
  assert (meta["platform"], tuple(meta["crop"]), meta["vocab_json"]) == (
      dataset.platform, tuple(dataset.crop), dataset.vocab_json)
  assert meta["step"] == int(result.state.step)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(result.state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))
  best_params, _, best_meta = train_lib.restore_for_export(workdir, "best")
  assert best_meta["validation"]["val_loss/epyc-9004"] <= result.validation["val_loss/epyc-9004"]
  predict = train_lib.make_predict_fn(model_config, batch_size=100)
  x = dataset.test.features[:250]
  out = predict(best_params, x)
  assert out.shape == (250, 1) and np.isfinite(out).all()
  direct = model_lib.TLPModel(model_config).apply({"params": best_params}, x[:7])
  np.testing.assert_allclose(out[:7], np.asarray(direct), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="which must be"):
    train_lib.restore_for_export(workdir, "final")


def test_rerun_of_a_finished_run_resumes_and_does_nothing(trained, built_sample_dataset):
  workdir, result = trained
  again = train_lib.train_and_evaluate(_test_config(built_sample_dataset), workdir)
  assert int(again.state.step) == int(result.state.step)
  for a, b in zip(jax.tree_util.tree_leaves(again.state.params),
                  jax.tree_util.tree_leaves(result.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_mid_epoch_then_rerun_ends_like_an_unbroken_run(trained, built_sample_dataset,
                                                                tmp_path):
  unbroken_workdir, unbroken = trained
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
         os.path.join(REPO, "configs", "test.py"), "--workdir", workdir,
         f"--config.data_dir={built_sample_dataset}"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  # checkpoint_every_steps=10 in configs/test.py; step 10 is inside the first epoch.
  marker = os.path.join(workdir, "checkpoints", "latest", "10")
  final_step = str(int(unbroken.state.step))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  try:
    deadline = time.time() + 240
    while not os.path.isdir(marker):
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.time() < deadline, "no checkpoint for step 10 in time"
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  latest = os.path.join(workdir, "checkpoints", "latest")
  assert final_step not in os.listdir(latest), "the run finished before it was killed"

  done = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, timeout=300)
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  assert b"resumed from" in done.stderr
  for which in ("latest", "best"):
    resumed, _, resumed_meta = train_lib.restore_for_export(workdir, which)
    want, _, want_meta = train_lib.restore_for_export(unbroken_workdir, which)
    assert resumed_meta["step"] == want_meta["step"]
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Errors: corrupted / incompatible checkpoints
# ---------------------------------------------------------------------------------------------


def _copy_run(trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained[0], workdir)
  return workdir


def test_corrupted_checkpoint_is_a_clear_error(trained, sample_arrays, built_sample_dataset,
                                               tmp_path):
  workdir = _copy_run(trained, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "latest")
  step_dir = os.path.join(latest, max(os.listdir(latest), key=int))
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  config = _test_config(built_sample_dataset)
  with pytest.raises(train_lib.CheckpointError, match="cannot restore checkpoint .*latest"):
    train_lib.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  with pytest.raises(train_lib.CheckpointError, match=step_dir):
    train_lib.restore_for_export(workdir, "latest")


def test_incomplete_checkpoint_dir_is_not_a_fresh_start(trained, sample_arrays,
                                                        built_sample_dataset, tmp_path):
  workdir = _copy_run(trained, tmp_path)
  latest = os.path.join(workdir, "checkpoints", "latest")
  for step in os.listdir(latest):
    shutil.rmtree(os.path.join(latest, step))
  os.makedirs(os.path.join(latest, "20.orbax-checkpoint-tmp-1700000000"))
  with pytest.raises(train_lib.CheckpointError, match=f"{latest} has entries .* no complete"):
    train_lib.train_and_evaluate(_test_config(built_sample_dataset), workdir,
                                 dataset=sample_arrays("epyc-9004"))


def test_workdir_of_another_run_is_refused(trained, sample_arrays, built_sample_dataset,
                                           tmp_path):
  workdir = _copy_run(trained, tmp_path)
  config = _test_config(built_sample_dataset)
  config.model.res_blocks = 2
  with pytest.raises(train_lib.CheckpointError, match="different model config"):
    train_lib.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  config = _test_config(built_sample_dataset)
  config.batch_size = 128
  with pytest.raises(train_lib.CheckpointError, match="incompatible run"):
    train_lib.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))


# ---------------------------------------------------------------------------------------------
# Multi-host: two processes (4 CPU devices each, gloo collectives) vs one process of 8 devices
# ---------------------------------------------------------------------------------------------


def test_two_processes_train_like_one(built_sample_dataset, tmp_path):
  overrides = {"num_epochs": 1, "loss": "mse", "data_placement": "host",
               "checkpoint_every_steps": 0}
  config = _test_config(built_sample_dataset)
  for k, v in overrides.items():
    config[k] = v
  single = train_lib.train_and_evaluate(config, str(tmp_path / "single"))

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / "multi")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  procs = []
  for i in range(2):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
           os.path.join(REPO, "configs", "test.py"), "--workdir", workdir,
           f"--config.data_dir={built_sample_dataset}",
           "--config.distributed.enabled=True",
           f"--config.distributed.coordinator_address=localhost:{port}",
           "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE))
  errors = []
  try:
    for p in procs:
      _, err = p.communicate(timeout=300)
      errors.append(err.decode()[-3000:])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert [p.returncode for p in procs] == [0, 0], errors
  params, _, meta = train_lib.restore_for_export(workdir, "latest")
  assert meta["step"] == int(single.state.step)
  # Same global batches and the same global-batch loss; only the order of the cross-device sums
  # differs, so the parameters agree to float precision -- except the attention key bias, whose
  # true gradient is exactly zero (softmax ignores a per-query constant): Adam turns its
  # rounding-noise gradient into small steps that depend on the summation order.
  want = dict(jax.tree_util.tree_flatten_with_path(single.state.params)[0])
  for path, got in jax.tree_util.tree_flatten_with_path(params)[0]:
    ref = np.asarray(want[path])
    if jax.tree_util.keystr(path) == "['attention']['key']['bias']":
      assert np.abs(got - ref).max() < 1e-3
    else:
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=str(path))
  np.testing.assert_allclose(meta["validation"]["val_loss"], single.validation["val_loss"],
                             rtol=1e-3)


def test_mtl_heads_target_first_and_few_shot_on_the_joined_dataset(sample_arrays):
  dataset = sample_arrays("all")
  config = _config("mtl")
  columns = train_lib.head_columns(dataset.hardware, config.hardware)
  assert [dataset.hardware[c] for c in columns] == ["xeon-emr-16c", "epyc-9004"]
  split = train_lib.select_split(dataset.train, columns)
  np.testing.assert_array_equal(split.mask[:, 0], dataset.train.mask[:, columns[0]][
      dataset.train.mask[:, columns].any(axis=1)])
  assert split.mask.any(axis=1).all()  # rows without any selected label are dropped
  kept = train_lib.few_shot_mask(split.mask, num_labels=50, fraction=1.0, seed=0)
  assert kept[:, 0].sum() == 50 and (kept[:, 1] == split.mask[:, 1]).all()


def test_ensemble_trains_exports_and_predicts_like_flax(built_sample_dataset, sample_arrays,
                                                        tmp_path):
  """An ensemble config runs the whole path: train, checkpoint, export (format 3), NumPy."""
  config = _test_config(built_sample_dataset)
  with config.unlocked():
    config.model.ensemble_size = 2
    config.num_epochs = 2
  workdir = str(tmp_path / "ens")
  result = train_lib.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  assert result.model_config.ensemble_size == 2
  assert np.isfinite(result.validation["val_loss"])
  arrays = export.export_workdir(workdir, str(tmp_path / "ens.npz"), "latest")
  assert int(arrays[npred.META_FORMAT_VERSION]) == npred.ENSEMBLE_FORMAT_VERSION
  x = sample_arrays("epyc-9004").test.features[:300]
  params, model_config, _ = train_lib.restore_for_export(workdir, "latest")
  members = train_lib.make_predict_fn(model_config, per_member=True)(params, x)
  assert members.shape == (300, 2, 1)
  assert np.abs(members[:, 0] - members[:, 1]).max() > 1e-3  # two different models
  got = npred.Predictor.load(str(tmp_path / "ens.npz")).predict(x)
  np.testing.assert_allclose(got, members.mean(axis=1)[:, 0], rtol=1e-4, atol=1e-4)
