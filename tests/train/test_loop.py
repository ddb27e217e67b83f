"""tlp_jax.train.loop: end-to-end runs of configs/test.py on the sample, resume, multi-host."""

import functools
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from tlp_jax.core import loop_tokens
from tlp_jax.core import predictor as npred
from tlp_jax.train import checkpoints, data, export, loop
from tlp_jax.train import config as config_lib
from tlp_jax.train import model as model_lib
from tlp_jax.train import step as step_lib
from tlp_jax.train import writer as writer_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_end_to_end_test_config(trained, sample_arrays, new_test_config):
  workdir, result = trained
  dataset = sample_arrays("epyc-9004")
  steps_per_epoch = math.ceil(len(dataset.train) / 64)
  assert int(result.state.step) == 3 * steps_per_epoch
  for name in (
    checkpoints.MODEL_CONFIG_FILE,
    checkpoints.DATASET_META_FILE,
    checkpoints.TRAIN_CONFIG_FILE,
  ):
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
  layout = data.BatchLayout.create(128, devices)
  split = data.select_heads(dataset.validation, [0], loop_tokens=True)  # configs/test.py reads them
  p_eval = jax.pmap(
    lambda p, *b: step_lib.eval_step(
      p,
      *b,
      model=model_lib.TLPModel(result.model_config),
      loss_config=config_lib.from_config_dict(new_test_config()).loss,
    ),
    axis_name=data.AXIS,
    devices=devices,
  )
  init = step_lib.create_train_state(result.model_config, optax.sgd(0.0), seed=0).params
  before = loop.validate(
    p_eval, data.replicate_to_devices(init, devices), split, layout, result.hardware, (1,)
  )
  after = loop.validate(
    p_eval,
    data.replicate_to_devices(result.state.params, devices),
    split,
    layout,
    result.hardware,
    (1,),
  )
  np.testing.assert_allclose(after["val_loss"], val["val_loss"], rtol=1e-4)
  assert after["val_loss"] < before["val_loss"]


def test_validation_on_device_gives_the_host_gathered_results(
  trained, sample_arrays, new_test_config
):
  """The resident validation (arrays on every device, batches gathered there, read back at the
  end) evaluates the same batches as the host-gathered one: the same numbers, on 1 or 2
  devices."""
  _, result = trained
  split = data.select_heads(sample_arrays("epyc-9004").validation, [0], loop_tokens=True)
  kwargs = dict(
    model=model_lib.TLPModel(result.model_config),
    loss_config=config_lib.from_config_dict(new_test_config()).loss,
  )
  for n in (1, 2):
    devices = jax.devices()[:n]
    layout = data.BatchLayout.create(128, devices)
    assert split.size % layout.global_batch  # the last batch is padded
    params = data.replicate_to_devices(result.state.params, devices)
    p_host = jax.pmap(
      functools.partial(step_lib.eval_step, **kwargs), axis_name=data.AXIS, devices=devices
    )
    p_dev = jax.pmap(
      functools.partial(step_lib.eval_step_resident, global_batch=layout.global_batch, **kwargs),
      axis_name=data.AXIS,
      devices=devices,
    )
    host = loop.validate(p_host, params, split, layout, result.hardware, (1, 5))
    resident = loop.resident_split(split, layout, devices)
    dev = loop.validate(p_dev, params, split, layout, result.hardware, (1, 5), resident)
    assert set(dev) == set(host)
    for k in host:
      np.testing.assert_allclose(dev[k], host[k], rtol=1e-6, err_msg=k)


def test_eval_every_epochs_changes_only_when_it_validates(
  new_test_config, trained, sample_arrays, built_sample_dataset, tmp_path
):
  """Validating every 2nd epoch (and the last) trains the same parameters, with fewer saves."""
  _, full = trained
  steps_per_epoch = math.ceil(len(sample_arrays("epyc-9004").train) / 64)
  config = new_test_config()
  with config.unlocked():
    config.eval_every_epochs = 2
    # A step checkpoint falls on every epoch's last step, validated (2, 3) or not (1): the
    # non-validated one is saved too, as a step checkpoint.
    config.checkpoint_every_steps = steps_per_epoch
    config.checkpoints_to_keep = 5
  result = loop.train_and_evaluate(config, str(tmp_path), dataset=sample_arrays("epyc-9004"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, result.state.params, full.state.params)
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints" / "latest"))
  assert saved == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
  assert result.validation["epoch"] == 3
  _, meta = checkpoints.restore_checkpoint(
    checkpoints.open_for_reading(str(tmp_path), "latest"), None, step=steps_per_epoch
  )
  assert "validation" not in meta  # epoch 1 was not validated


@pytest.mark.parametrize(
  "field, value",
  [
    ("eval_every_epochs", 0),
    ("batch_order", "by_net"),
    ("steps_per_execution", 0),
  ],
)
def test_a_bad_config_fails_before_any_work(new_test_config, tmp_path, field, value):
  config = new_test_config()
  config[field] = value
  with pytest.raises(ValueError, match=field):
    loop.train_and_evaluate(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_rerun_of_a_finished_run_resumes_and_does_nothing(new_test_config, trained):
  workdir, result = trained
  again = loop.train_and_evaluate(new_test_config(), workdir)
  assert int(again.state.step) == int(result.state.step)
  for a, b in zip(
    jax.tree_util.tree_leaves(again.state.params), jax.tree_util.tree_leaves(result.state.params)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_empty_hardware_and_the_same_heads_named_are_one_run(new_test_config, trained, tmp_path):
  """``hardware=()`` means the dataset's heads: a workdir recorded either way resumes with the
  other spelling (workdirs from before the empty default named the heads)."""
  source, result = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  config = new_test_config()
  config.hardware = ("epyc-9004",)
  again = loop.train_and_evaluate(config, workdir)
  assert int(again.state.step) == int(result.state.step)
  recorded = json.load(open(os.path.join(workdir, "train_config.json")))
  assert recorded["hardware"] == ["epyc-9004"]


def test_sigkill_mid_epoch_then_rerun_ends_like_an_unbroken_run(
  trained, built_sample_dataset, tmp_path, train_argv
):
  unbroken_workdir, unbroken = trained
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, *train_argv(workdir, f"--config.data_dir={built_sample_dataset}")]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  # checkpoint_every_steps=10 in configs/test.py; step 10 is inside the first epoch.
  marker = os.path.join(workdir, "checkpoints", "latest", "10")
  final_step = str(int(unbroken.state.step))
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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

  done = subprocess.run(
    cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300
  )
  assert done.returncode == 0, done.stderr.decode()[-3000:]
  assert b"resumed from" in done.stderr
  for which in ("latest", "best"):
    resumed, _, resumed_meta = export.restore_for_export(workdir, which)
    want, _, want_meta = export.restore_for_export(unbroken_workdir, which)
    assert resumed_meta["step"] == want_meta["step"]
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(a, b)


def test_two_processes_train_like_one(new_test_config, built_sample_dataset, tmp_path, train_argv):
  # Two processes stream their own rows of every global batch (data_placement="stream", grain
  # reading ahead in 2 threads); one process gathers the whole batch on the host.
  overrides = {
    "num_epochs": 1,
    "loss.name": "mse",
    "data_placement": "stream",
    "stream.read_threads": 2,
    "checkpoint_every_steps": 0,
  }
  config = new_test_config()
  config.num_epochs, config.loss.name, config.data_placement = 1, "mse", "host"
  config.checkpoint_every_steps = 0
  single = loop.train_and_evaluate(config, str(tmp_path / "single"))

  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / "multi")
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
  )
  procs = []
  for i in range(2):
    cmd = [
      sys.executable,
      *train_argv(workdir, f"--config.data_dir={built_sample_dataset}"),
      "--config.distributed.enabled=True",
      f"--config.distributed.coordinator_address=localhost:{port}",
      "--config.distributed.num_processes=2",
      f"--config.distributed.process_id={i}",
    ]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    procs.append(
      subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    )
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
  params, _, meta = export.restore_for_export(workdir, "latest")
  assert meta["step"] == int(single.state.step)
  # Each process saved its own input stream's state with the checkpoint.
  saved = os.listdir(os.path.join(workdir, "checkpoints", "latest", str(meta["step"]), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(saved)
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
  np.testing.assert_allclose(
    meta["validation"]["val_loss"], single.validation["val_loss"], rtol=1e-3
  )


def test_ensemble_trains_exports_and_predicts_like_flax(
  new_test_config, built_sample_dataset, sample_arrays, tmp_path
):
  """An ensemble config runs the whole path: train, checkpoint, export, NumPy."""
  config = new_test_config()
  with config.unlocked():
    config.model.ensemble_size = 2
    config.num_epochs = 2
  workdir = str(tmp_path / "ens")
  result = loop.train_and_evaluate(config, workdir, dataset=sample_arrays("epyc-9004"))
  assert result.model_config.ensemble_size == 2
  assert np.isfinite(result.validation["val_loss"])
  arrays = export.export_workdir(workdir, str(tmp_path / "ens.npz"), "latest")
  assert int(arrays[npred.META_FORMAT_VERSION]) == npred.FORMAT_VERSION
  test = sample_arrays("epyc-9004").test  # configs/test.py reads the sample's loop tokens
  steps, tokens = test.features[:300], test.loop_tokens[:300]
  params, model_config, _ = export.restore_for_export(workdir, "latest")
  members = export.make_predict_fn(model_config, per_member=True)(
    params, loop_tokens.model_input(steps, tokens)
  )
  assert members.shape == (300, 2, 1)
  assert np.abs(members[:, 0] - members[:, 1]).max() > 1e-3  # two different models
  got = npred.Predictor.load(str(tmp_path / "ens.npz")).predict(steps, loop_tokens=tokens)
  np.testing.assert_allclose(got, members.mean(axis=1)[:, 0], rtol=1e-4, atol=1e-4)


def test_matmul_precision_is_in_force_while_training(monkeypatch, tmp_path, new_test_config):
  seen = []
  monkeypatch.setattr(
    loop, "_train_and_evaluate", lambda *a: seen.append(jax.config.jax_default_matmul_precision)
  )
  config = new_test_config()
  config.matmul_precision = "highest"
  loop.train_and_evaluate(config, str(tmp_path))
  assert seen == ["highest"]
  assert jax.config.jax_default_matmul_precision != "highest"  # restored afterwards


def test_loop_tokens_are_decided_once(monkeypatch, new_test_config, sample_arrays, tmp_path):
  calls = []
  real = data.reads_loop_tokens
  monkeypatch.setattr(data, "reads_loop_tokens", lambda *a: calls.append(a) or real(*a))

  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop

  monkeypatch.setattr(checkpoints, "check_or_write_json", stop)  # right after the model config
  with pytest.raises(Stop):
    loop.train_and_evaluate(new_test_config(), str(tmp_path), dataset=sample_arrays())
  assert len(calls) == 1


def _events(workdir):
  """The TensorBoard events of a workdir (TFRecord framing: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2

  (path,) = glob.glob(os.path.join(workdir, "events.out.tfevents*"))
  with open(path, "rb") as f:
    raw = f.read()
  events, pos = [], 0
  while pos < len(raw):
    (n,) = struct.unpack("<Q", raw[pos : pos + 8])
    event = event_pb2.Event()
    event.ParseFromString(raw[pos + 12 : pos + 12 + n])
    events.append(event)
    pos += 12 + n + 4
  return events


def test_run_logs_above_the_bar_ends_with_a_summary_and_writes_tensorboard_hparams(
  new_test_config, sample_arrays, tmp_path, capsys, caplog
):
  from tensorboardX.proto import plugin_hparams_pb2

  config = new_test_config()
  config.num_epochs = 1
  workdir = str(tmp_path / "run")
  handler = logging.StreamHandler(sys.stderr)  # the captured stderr, where the bar draws too
  handler.setFormatter(logging.Formatter("LOG:%(message)s"))
  logging.getLogger().addHandler(handler)
  try:
    with caplog.at_level(logging.INFO):
      result = loop.train_and_evaluate(config, workdir, dataset=sample_arrays())
  finally:
    logging.getLogger().removeHandler(handler)
  err = capsys.readouterr().err
  # Every log line starts a line of its own: the bar is cleared first, never written into.
  segments = re.split(r"[\r\n]", err)
  assert any(seg.startswith("LOG:[") for seg in segments)
  assert all(seg.startswith("LOG:") for seg in segments if "LOG:" in seg)
  # The bar's epoch is 1-based, as the log's.
  assert "epoch=1" in err and "epoch=0" not in err
  # The summary: best step and its metrics, the checkpoints, the next commands.
  step = int(result.state.step)
  assert result.best_step == step
  assert f"Best checkpoint: step {step} (epoch 1)" in caplog.text
  assert f"val_top1/epyc-9004={result.best_validation['val_top1/epyc-9004']:.4g}" in caplog.text
  assert os.path.join(workdir, "checkpoints", "best") in caplog.text
  assert f"python eval.py --workdir {workdir} --checkpoint best --hw epyc-9004" in caplog.text
  assert f"python -m tlp_jax.train.export --workdir {workdir} --which best" in caplog.text

  values = [v for e in _events(workdir) for v in e.summary.value]
  scalars = {v.tag for v in values if v.HasField("simple_value")}
  assert {"train/loss", "train/learning_rate", "val/loss", "val/top1/epyc-9004"} <= scalars
  assert all(t.startswith(("train/", "val/", "time/")) for t in scalars), scalars
  assert {"time/epoch_s", "time/validation_s", "time/checkpoint_s"} <= scalars
  assert "hparams/text_summary" not in {v.tag for v in values}
  (start,) = [v for v in values if v.tag == "_hparams_/session_start_info"]
  hparams = plugin_hparams_pb2.HParamsPluginData.FromString(
    start.metadata.plugin_data.content
  ).session_start_info.hparams
  assert hparams["optim.learning_rate"].number_value == pytest.approx(1e-3)
  assert hparams["loss.name"].string_value == "pairwise_log"


def test_multi_step_calls_train_and_log_like_single_steps(
  new_test_config, trained, monkeypatch, tmp_path
):
  """``steps_per_execution`` > 1 runs several steps per call where no log, checkpoint or epoch
  end falls inside them: the same parameters, the same losses logged at the same steps and the
  same checkpoints as one step per call, up to float rounding (the step compiled inside the
  scan's loop may fuse differently). MSE, for the reason given in tests/train/test_step.py."""
  _, full = trained
  calls = {"multi": 0, "single": 0}
  fits = loop.fits_multi_step

  def counting(step, epoch_end, config):
    ok = fits(step, epoch_end, config)
    calls["multi" if ok else "single"] += 1
    return ok

  logged = {}
  write = writer_lib.MetricWriter.write_scalars

  def recording(self, step, scalars):
    if "train/loss" in scalars:
      logged.setdefault(run, {})[step] = (scalars["train/loss"], scalars["train/grad_norm"])
    return write(self, step, scalars)

  monkeypatch.setattr(loop, "fits_multi_step", counting)
  monkeypatch.setattr(writer_lib.MetricWriter, "write_scalars", recording)
  results = {}
  for run in (1, 3):
    config = new_test_config()
    with config.unlocked():
      config.steps_per_execution = run
      config.loss.name = "mse"
      config.log_every_steps = 9
      config.checkpoint_every_steps = 18
      config.checkpoints_to_keep = 10
    results[run] = loop.train_and_evaluate(config, str(tmp_path / str(run)))
  assert calls["multi"] > 0 and calls["single"] > 0
  assert int(results[1].state.step) == int(results[3].state.step) == int(full.state.step)
  jax.tree_util.tree_map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
    results[3].state.params,
    results[1].state.params,
  )
  assert sorted(logged[3]) == sorted(logged[1]) and len(logged[1]) > 3
  np.testing.assert_allclose(
    [logged[3][k] for k in sorted(logged[3])], [logged[1][k] for k in sorted(logged[1])], rtol=1e-5
  )
  saved = [sorted(os.listdir(tmp_path / str(run) / "checkpoints" / "latest")) for run in (1, 3)]
  assert saved[0] == saved[1]


@pytest.mark.parametrize(
  "step, epoch_end, expected",
  [
    (0, 100, True),  # steps 0-3: the log after step 8 and the save after 16 are later
    (4, 100, True),  # ends exactly at the log step 8
    (5, 100, False),  # would run past the log at 8
    (12, 100, True),  # ends at 16: a log and a save, both after the call's last step
    (13, 100, False),
    (96, 100, True),  # ends exactly at the epoch end
    (97, 100, False),  # would cross the epoch end
  ],
)
def test_fits_multi_step(new_test_config, step, epoch_end, expected):
  config = new_test_config()
  with config.unlocked():
    config.steps_per_execution = 4
    config.log_every_steps = 8
    config.checkpoint_every_steps = 16
  assert loop.fits_multi_step(step, epoch_end, config_lib.from_config_dict(config)) is expected


def test_fits_multi_step_checkpoints_not_a_multiple_of_logs(new_test_config):
  """A checkpoint step between log steps ends a call too (checkpoint every 6, log every 8)."""
  config = new_test_config()
  with config.unlocked():
    config.steps_per_execution, config.log_every_steps, config.checkpoint_every_steps = 4, 8, 6
  typed = config_lib.from_config_dict(config)
  assert not loop.fits_multi_step(4, 100, typed)  # would run past the checkpoint at 6
  assert loop.fits_multi_step(2, 100, typed)  # ends at the checkpoint at 6
  assert not loop.fits_multi_step(6, 100, typed)  # would run past the log at 8
  assert loop.fits_multi_step(8, 100, typed)  # ends at 12, the next checkpoint


def test_steps_per_execution_that_does_not_divide_the_log_period_warns(
  new_test_config, tmp_path, caplog
):
  config = new_test_config()
  with config.unlocked():
    config.steps_per_execution, config.num_epochs = 3, 1
  with caplog.at_level(logging.WARNING):
    loop.train_and_evaluate(config, str(tmp_path / "wd"))
  assert "does not divide log_every_steps=5" in caplog.text


def test_fits_multi_step_without_step_checkpoints(new_test_config):
  config = new_test_config()
  with config.unlocked():
    config.steps_per_execution, config.log_every_steps, config.checkpoint_every_steps = 5, 10, 0
  typed = config_lib.from_config_dict(config)
  assert loop.fits_multi_step(5, 100, typed) and not loop.fits_multi_step(6, 100, typed)


def test_the_epoch_order_thread_ends_with_the_run(trained):
  """The thread that computes the next epoch's order ahead is gone once the run returns (the
  ``trained`` run ran its epochs with it)."""
  import threading

  _, result = trained
  assert int(result.state.step) > 0
  assert not [t for t in threading.enumerate() if t.name.startswith("epoch-order")]
