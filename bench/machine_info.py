"""What every benchmark records about the machine it ran on (imported by the bench scripts)."""
from __future__ import annotations

import json
import os
import platform

import numpy as np


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
  return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
          "load_average": os.getloadavg(), "python": platform.python_version(),
          "numpy": np.__version__, **extra}


def write_json(path: str, obj) -> None:
  """Writes a benchmark's results (folders made as needed) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)
  print(f"wrote {path}")
