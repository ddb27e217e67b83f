"""bench.kernel_profile: a real trace is read back and summed per line and event name."""

import jax
import jax.numpy as jnp

from bench import kernel_profile


def test_trace_is_summed_per_line_and_name(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  xplane = kernel_profile.trace(lambda: [f(x).block_until_ready() for _ in range(4)], tmp_path)
  # No accelerator here: the host plane holds the work (on a GPU, "/device:GPU:0").
  assert kernel_profile.summarize(xplane, calls=4, plane_prefix="/device:") == {}
  host = kernel_profile.summarize(xplane, top=3, calls=4, plane_prefix="/host:CPU")
  lines = host["/host:CPU"]
  assert lines, "the host plane has no events"
  for line in lines.values():
    top = line["top"]
    assert 1 <= len(top) <= 3
    assert [e["ms_per_call"] for e in top] == sorted((e["ms_per_call"] for e in top), reverse=True)
    assert sum(e["ms_per_call"] for e in top) <= line["total_ms_per_call"] + 1e-9
    assert all(e["count_per_call"] > 0 for e in top)
