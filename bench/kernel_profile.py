"""Where a device's time goes: trace a few calls with ``jax.profiler`` and sum the device events.

``trace(run, trace_dir)`` records ``run()`` with the JAX profiler; ``summarize(trace_dir)`` reads
the XSpace it wrote (``jax.profiler.ProfileData``, no TensorBoard needed) and, for every device
plane (``/device:GPU:0``, ...), sums the events of each line by name: the ``XLA Ops`` line gives
time per HLO instruction (fusion, GEMM, ...), the stream lines time per kernel. Used by
``bench.train_throughput --profile_steps`` to say which ops a change of XLA flags or dtype
moves, since XLA's own cost analysis is no guide for the resident-gather step (bench/README.md).
"""

from __future__ import annotations

import collections
import glob
import os
from collections.abc import Callable

import jax


def trace(run: Callable[[], None], trace_dir: str) -> str:
  """Runs ``run()`` under ``jax.profiler.trace`` into ``trace_dir``; the ``.xplane.pb`` path."""
  with jax.profiler.trace(trace_dir):
    run()
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not files:
    raise FileNotFoundError(f"the profiler wrote no .xplane.pb under {trace_dir}")
  return files[-1]


def summarize(
  xplane_path: str, top: int = 25, calls: int = 1, plane_prefix: str = "/device:"
) -> dict:
  """Per plane whose name starts with ``plane_prefix`` (the accelerators by default) and per
  line: total ms per call of the ``top`` event names, their counts per call, and the line's
  total. ``calls`` = how many calls the trace holds."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  out = {}
  for plane in data.planes:
    if not plane.name.startswith(plane_prefix):
      continue
    lines = {}
    for line in plane.lines:
      total_ns: dict[str, int] = collections.defaultdict(int)
      count: dict[str, int] = collections.defaultdict(int)
      for event in line.events:
        total_ns[event.name] += event.duration_ns
        count[event.name] += 1
      if not total_ns:
        continue
      ranked = sorted(total_ns.items(), key=lambda kv: -kv[1])
      lines[line.name] = {
        "total_ms_per_call": sum(total_ns.values()) / 1e6 / calls,
        "events": len(total_ns),
        "top": [
          {"name": name, "ms_per_call": ns / 1e6 / calls, "count_per_call": count[name] / calls}
          for name, ns in ranked[:top]
        ],
      }
    out[plane.name] = lines
  return out
