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
import re
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


# Kernel families, first match wins: which kind of work a kernel name stands for, so that a
# change can be read off the family totals rather than off ~140 names.
FAMILIES = (
  ("attention", re.compile(r"cudnn|fmha|flash|sdpa|softmax", re.I)),
  ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|magma|cublas|wmma", re.I)),
  ("reduce", re.compile(r"reduce", re.I)),
  (
    "transpose_copy",
    re.compile(r"transpose|copy|pad|slice|concatenate|bitcast|memcpy|memset", re.I),
  ),
  ("gather_scatter", re.compile(r"gather|scatter|dynamic", re.I)),
)


def family(name: str) -> str:
  """The ``FAMILIES`` key of a kernel or op name; "elementwise" for the other fusions."""
  for key, pattern in FAMILIES:
    if pattern.search(name):
      return key
  return "elementwise"


def summarize(
  xplane_path: str, top: int = 25, calls: int = 1, plane_prefix: str = "/device:"
) -> dict:
  """Per plane whose name starts with ``plane_prefix`` (the accelerators by default) and per
  line: total ms per call of the ``top`` event names, their counts per call, the line's total,
  and per kernel ``family`` its ms and kernel count per call. ``calls`` = how many calls the
  trace holds."""
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
      families: dict[str, dict[str, float]] = {}
      for name, ns in ranked:
        fam = families.setdefault(family(name), {"ms_per_call": 0.0, "kernels_per_call": 0.0})
        fam["ms_per_call"] += ns / 1e6 / calls
        fam["kernels_per_call"] += count[name] / calls
      lines[line.name] = {
        "total_ms_per_call": sum(total_ns.values()) / 1e6 / calls,
        "events": len(total_ns),
        "launches_per_call": sum(count.values()) / calls,
        "families": families,
        "top": [
          {"name": name, "ms_per_call": ns / 1e6 / calls, "count_per_call": count[name] / calls}
          for name, ns in ranked[:top]
        ],
      }
    out[plane.name] = lines
  return out
