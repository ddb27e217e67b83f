"""tlp_jax.train.prefetch: batches put on the devices ahead of the step, the same batches in the
same order (so the same parameters as without prefetch), and the source's state of the steps
taken, not of those fetched ahead."""

import json
import threading

import jax
import numpy as np
import pytest

from tlp_jax.train import data, loop, prefetch


def _host_batch(step, devices=2):
  rng = np.random.default_rng(step)
  return (rng.standard_normal((devices, 3, 4)).astype(np.float32), np.full((devices, 3), step))


@pytest.mark.parametrize("thread", [False, True])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_yields_each_steps_batch_on_the_devices_and_the_state_of_the_steps_taken(thread, size):
  devices = jax.devices()[:2]
  fetched = []
  source_state = {"next": 3}

  def fetch(step):
    fetched.append(step)
    source_state["next"] = step + 1
    return _host_batch(step)

  feed = prefetch.DevicePrefetch(
    fetch, range(3, 10), devices, size, snapshot=lambda: dict(source_state), thread=thread
  )
  assert json.loads(feed.get_state()) == {"next": 3}
  for step in range(3, 10):
    batch = feed.next_batch(step)
    for got, want in zip(batch, _host_batch(step)):
      assert isinstance(got, jax.Array)
      assert [s.device for s in got.addressable_shards] == devices
      np.testing.assert_array_equal(np.asarray(got), want)
    # The checkpoint of the steps trained so far saves the state after this step's batch, even
    # though the source has run ahead.
    assert json.loads(feed.get_state()) == {"next": step + 1}
    if not thread:
      assert max(fetched) == min(step + size - 1, 9)  # exactly `size` batches ahead, inline
  assert fetched == list(range(3, 10))
  with pytest.raises(RuntimeError, match="asked for step 10"):
    feed.next_batch(10)
  feed.close()


@pytest.mark.parametrize("thread", [False, True])
def test_a_fetch_error_reaches_the_caller_and_steps_must_be_in_order(thread):
  def fetch(step):
    if step == 2:
      raise KeyboardInterrupt("killed")
    return _host_batch(step, devices=1)

  feed = prefetch.DevicePrefetch(fetch, range(0, 5), jax.devices()[:1], 2, thread=thread)
  with pytest.raises(RuntimeError, match="asked for step 1; its next step is 0"):
    feed.next_batch(1)
  feed.next_batch(0)
  with pytest.raises(KeyboardInterrupt, match="killed"):
    feed.next_batch(1)  # inline: step 2 is fetched ahead of step 1; in a thread, at its turn
    feed.next_batch(2)
  with pytest.raises(RuntimeError, match="no state"):
    feed.get_state()
  feed.close()


def test_close_stops_a_producer_waiting_on_the_full_look_ahead():
  feed = prefetch.DevicePrefetch(
    lambda step: _host_batch(step, devices=1), range(1000), jax.devices()[:1], 2, thread=True
  )
  feed.next_batch(0)
  feed.close()
  assert not any(t.name == "device-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("placement", ["host", "stream"])
@pytest.mark.parametrize("thread", [False, True])
def test_prefetch_trains_the_same_parameters_as_none(
  placement, thread, new_test_config, tmp_path, monkeypatch
):
  monkeypatch.setitem(loop.PREFETCH_IN_THREAD, placement, thread)
  devices = jax.devices()[:2]
  results = {}
  for size in (0, 2):
    config = new_test_config()
    config.num_epochs, config.data_placement, config.prefetch_to_device = 2, placement, size
    results[size] = loop.train_and_evaluate(config, str(tmp_path / str(size)), devices=devices)
  assert int(results[0].state.step) == int(results[2].state.step) > 0
  for a, b in zip(
    jax.tree_util.tree_leaves(results[0].state.params),
    jax.tree_util.tree_leaves(results[2].state.params),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert results[0].validation["val_loss"] == results[2].validation["val_loss"]


def test_shard_to_devices_splits_the_leading_axis_as_pmap_reads_it():
  devices = jax.devices()[:4]
  x = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
  put = data.shard_to_devices((x,), devices)[0]
  assert put.sharding == data.pmap_sharding(devices)
  for i, shard in enumerate(sorted(put.addressable_shards, key=lambda s: devices.index(s.device))):
    np.testing.assert_array_equal(np.asarray(shard.data)[0], x[i])
  doubled = jax.pmap(lambda a: a * 2, devices=devices)(put)
  np.testing.assert_array_equal(np.asarray(doubled), 2 * x)
