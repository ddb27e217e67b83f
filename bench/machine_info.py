"""What every benchmark records about the machine it ran on (imported by the bench scripts)."""
from __future__ import annotations

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
