"""What every benchmark shares: the machine it ran on, timing, tables and the results JSON.

Run the scripts from the repository root as ``python -m bench.<script>`` so that
``from bench import common`` resolves without editing ``sys.path``.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from tlp_jax.core import atomic_file


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo, else whatever ``platform`` knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_info(**extra) -> dict:
  """Platform, CPU, core count, load average now, Python and NumPy versions, plus ``extra``."""
  return {
    "platform": platform.platform(),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "load_average": os.getloadavg(),
    "python": platform.python_version(),
    "numpy": np.__version__,
    **extra,
  }


def gpu_name() -> str:
  """The NVIDIA GPUs' names as ``nvidia-smi`` lists them, or "none" (without starting JAX)."""
  try:
    got = subprocess.run(
      ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    )
  except OSError:
    return "none"
  return got.stdout.strip().replace("\n", ", ") or "none"


def device_info() -> dict[str, Any]:
  """The JAX accelerator a run used: device kind, count, backend, versions, date and host."""
  import jax  # only the JAX benchmarks need it; the host ones stay NumPy-only

  devices = jax.devices()
  return {
    "device": devices[0].device_kind,
    "num_devices": len(devices),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    "host": machine_info(node=platform.node()),
  }


@contextlib.contextmanager
def timed(into: dict[str, float], key: str) -> Iterator[None]:
  """``with timed(wall, "train"):`` stores the block's wall-clock seconds in ``wall["train"]``."""
  t0 = time.perf_counter()
  try:
    yield
  finally:
    into[key] = time.perf_counter() - t0


def best_time(fn: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
  """Fewest wall-clock seconds of ``fn()`` over ``repeats`` calls (after one untimed call when
  ``warmup``): the least disturbed run on a shared machine."""
  if warmup:
    fn()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def slug(name: str, empty: str = "unknown") -> str:
  """``name`` for a file name: lower case, runs of other characters as one ``-``."""
  return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or empty


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table (cells formatted with ``str``)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def log_to_stderr() -> None:
  """INFO logs of a training benchmark with timestamps, absl / Orbax / JAX held to warnings."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """``KEY=PYTHON_LITERAL`` command-line overrides (``--set num_epochs=2``,
  ``--model decoder_dims=(64,1)``) as a dict; a malformed item is a one-line SystemExit."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    try:
      if not sep or not key:
        raise ValueError("not KEY=VALUE")
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      raise SystemExit(f"bad override {item!r}: want KEY=PYTHON_LITERAL ({e})") from None
  return out


def write_json(path: str, obj: Any, announce: bool = True) -> None:
  """Writes a benchmark's results atomically (folders made as needed) and says where.

  Atomic (:mod:`tlp_jax.core.atomic_file`) so that a script rewriting its results after every
  variant never leaves half a file.
  """
  atomic_file.write_atomically(path, lambda f: json.dump(obj, f, indent=1, default=_json_default))
  if announce:
    print(f"wrote {path}")


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)
