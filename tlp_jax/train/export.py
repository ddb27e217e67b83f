"""Export trained TLP parameters to a flat ``.npz`` for the pure-NumPy predictor.

Format (``tlp_jax.core.predictor`` defines the key names and ``FORMAT_VERSION``):

* ``params/<module>/<...>/<name>``: every parameter of the Flax tree, float32, the tree path
  joined with ``/`` (hardware heads keep their leading ``num_heads`` axis; an ensemble's
  parameters are under ``params/members/`` with a leading ``ensemble_size`` axis);
* ``meta/format`` (``"tlp-jax-model"``), ``meta/format_version`` (int), ``meta/model_config``
  (``TLPConfig`` as JSON), ``meta/hardware`` (``(H,)`` head names, in head order),
  ``meta/platform``, ``meta/crop`` (``(2,)`` int: steps, width), ``meta/vocab_json``,
  ``meta/vocab_version``, ``meta/step`` (source checkpoint step); for models trained on the
  "loop" feature version also ``meta/loop_stores`` and ``meta/loop_dim`` (int: the last
  ``loop_stores`` tokens and ``loop_dim`` columns of ``crop`` are loop-nest store vectors).

Strings are NumPy unicode arrays, so ``np.load(path, allow_pickle=False)`` reads everything.

CLI::

    python -m tlp_jax.train.export --workdir DIR --out model.npz [--which best|latest]
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from tlp_jax.core import features
from tlp_jax.train import model as model_lib
from tlp_jax.core import predictor as npred


def flatten_params(params: Mapping[str, Any], prefix: str = npred.PARAMS_PREFIX
                   ) -> dict[str, np.ndarray]:
  """``{"params/a/b/kernel": float32 array}`` from a nested parameter dict."""
  flat: dict[str, np.ndarray] = {}

  def walk(node, path):
    if isinstance(node, Mapping):
      for k in sorted(node):
        if "/" in str(k):
          raise ValueError(f"parameter name {k!r} under {path!r} contains '/'")
        walk(node[k], f"{path}{k}/")
    else:
      flat[path[:-1]] = np.asarray(node, dtype=np.float32)

  walk(params, prefix)
  return flat


def _vocab_version(vocab_json: str) -> str:
  """The ``version`` field of a vocabulary document, validated by the featurizer."""
  # Parsing with the featurizer rejects a vocabulary this code could not featurize with.
  features.Vocabulary.from_json(vocab_json)
  return str(json.loads(vocab_json)["version"])


def format_version(model_config: model_lib.TLPConfig, loop_stores: int) -> int:
  """The lowest export format version that can describe this model (see numpy_predictor)."""
  if model_config.ensemble_size > 1:
    return npred.ENSEMBLE_FORMAT_VERSION
  return npred.LOOP_FORMAT_VERSION if loop_stores else npred.TLP_FORMAT_VERSION


def export_params(params: Mapping[str, Any], model_config: model_lib.TLPConfig, *,
                  hardware: Sequence[str], platform: str, crop: Sequence[int] | None,
                  vocab_json: str, step: int, loop_stores: int = 0,
                  loop_dim: int = 0) -> dict[str, np.ndarray]:
  """Flat export dict of a trained model (what ``save_npz`` writes).

  Args:
    params: the Flax ``params`` collection (nested dicts of arrays).
    model_config: the model's ``TLPConfig``.
    hardware: head names, one per head, in head order.
    platform: featurizer platform ("llvm" / "cuda").
    crop: featurizer crop ``(steps, width)``; None = the model's ``(seq_len, feature_dim)``.
    vocab_json: the featurizer vocabulary (``Vocabulary.to_json()``).
    step: training step of the source checkpoint.
    loop_stores, loop_dim: loop-nest store tokens appended to the step features (the "loop"
      feature version, ``features.append_loop_features``); 0 = TLP features only.

  Returns:
    ``{key: np.ndarray}``, loadable by ``numpy_predictor.Predictor``.
  """
  hardware = [str(h) for h in hardware]
  if len(hardware) != model_config.num_heads:
    raise ValueError(f"{len(hardware)} hardware names {hardware} for a model with "
                     f"{model_config.num_heads} heads")
  if len(set(hardware)) != len(hardware):
    raise ValueError(f"duplicate hardware names: {hardware}")
  if crop is None:
    crop = (model_config.seq_len, model_config.feature_dim)
  crop = [int(c) for c in crop]
  if len(crop) != 2:
    raise ValueError(f"crop must be (steps, width), got {crop}")
  out = flatten_params(params)
  out.update({
      npred.META_FORMAT: np.array(npred.FORMAT_NAME),
      npred.META_FORMAT_VERSION: np.array(
          format_version(model_config, loop_stores), np.int64),
      npred.META_MODEL_CONFIG: np.array(json.dumps(model_config.to_dict(), sort_keys=True)),
      npred.META_HARDWARE: np.array(hardware, dtype=np.str_),
      npred.META_PLATFORM: np.array(str(platform)),
      npred.META_CROP: np.array(crop, np.int64),
      npred.META_VOCAB_JSON: np.array(str(vocab_json)),
      npred.META_VOCAB_VERSION: np.array(_vocab_version(vocab_json)),
      npred.META_STEP: np.array(int(step), np.int64),
  })
  if loop_stores:
    out[npred.META_LOOP_STORES] = np.array(int(loop_stores), np.int64)
    out[npred.META_LOOP_DIM] = np.array(int(loop_dim), np.int64)
  # Validates shapes against the config (raises PredictorError on mismatch).
  npred.Predictor(out, source="<export>")
  return out


def save_npz(path: str, params: Mapping[str, Any], model_config: model_lib.TLPConfig,
             **meta: Any) -> dict[str, np.ndarray]:
  """Exports (see ``export_params``) and writes ``path`` atomically; returns the arrays."""
  arrays = export_params(params, model_config, **meta)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return arrays


def meta_kwargs(meta: Mapping[str, Any]) -> dict[str, Any]:
  """``export_params`` keyword arguments from a training run's dataset meta plus ``step``."""
  return dict(hardware=meta["hardware"], platform=meta["platform"], crop=meta.get("crop"),
              vocab_json=meta["vocab_json"], step=int(meta["step"]),
              loop_stores=int(meta.get("loop_stores", 0)), loop_dim=int(meta.get("loop_dim", 0)))


def export_workdir(workdir: str, out: str, which: str = "best") -> dict[str, np.ndarray]:
  """Restores a training run's checkpoint via ``train_lib.restore_for_export`` and saves it."""
  from tlp_jax.train import train_lib  # pylint: disable=import-outside-toplevel
  params, model_config, meta = train_lib.restore_for_export(workdir, which)
  return save_npz(out, params, model_config, **meta_kwargs(meta))


def _define_flags() -> None:
  # Defined only when run as a script, so importing this library never registers flags that
  # could clash with an entry point's own --workdir.
  flags.DEFINE_string("workdir", None, "Training workdir to export.")
  flags.DEFINE_string("out", None, "Output .npz path.")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint to export.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  arrays = export_workdir(fl.workdir, fl.out, fl.which)
  logging.info("wrote %s: %d arrays, heads %s, step %d", fl.out, len(arrays),
               [str(h) for h in arrays[npred.META_HARDWARE]], int(arrays[npred.META_STEP]))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
