"""Export of a training run: its checkpoint as a flat ``.npz`` for the pure-NumPy predictor, and
a batched JAX predict function of the restored parameters.

Format (``tlp_jax.core.predictor`` defines the key names and ``FORMAT_VERSION``):

* ``params/<module>/<...>/<name>``: every parameter of the Flax tree, float32 (or float16 with
  ``--weights_dtype float16``; the predictor upcasts to float32, any format version), the tree path
  joined with ``/`` (hardware heads keep their leading ``num_hardware_heads`` axis; an ensemble's
  parameters are under ``params/members/`` with a leading ``ensemble_size`` axis);
* ``meta/format`` (``"tlp-jax-model"``), ``meta/format_version`` (int), ``meta/model_config``
  (``TLPConfig`` as JSON), ``meta/hardware`` (``(H,)`` head names, in head order),
  ``meta/platform``, ``meta/crop`` (``(2,)`` int: steps, width), ``meta/vocab_json``,
  ``meta/vocab_version``, ``meta/step`` (source checkpoint step); for models of replayed loop
  tokens (format 5) ``meta/loop_tokens_version``, ``meta/loop_tokens_max`` and
  ``meta/loop_tokens_width`` (int: ``crop`` is the step crop grown by ``(max, width)``,
  ``loop_tokens.model_input``) and ``meta/skeletons_json`` (the training
  tasks' skeleton collection, so the predictor featurizes their programs without TVM).

Strings are NumPy unicode arrays, so ``np.load(path, allow_pickle=False)`` reads everything.

CLI::

    python -m tlp_jax.train.export --workdir DIR --out model.npz [--which best|latest] \
        [--weights_dtype float32|float16]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from tlp_jax.core import atomic_file, features
from tlp_jax.core import predictor as npred
from tlp_jax.train import checkpoints, runtime
from tlp_jax.train import model as model_lib


def flatten_params(
  params: Mapping[str, Any], prefix: str = npred.PARAMS_PREFIX
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


def export_params(
  params: Mapping[str, Any],
  model_config: model_lib.TLPConfig,
  *,
  hardware: Sequence[str],
  platform: str,
  crop: Sequence[int] | None,
  vocab_json: str,
  step: int,
  loop_tokens: Mapping[str, int] | None = None,
  skeletons_json: str | None = None,
) -> dict[str, np.ndarray]:
  """Flat export dict of a trained model (what ``save_npz`` writes).

  Args:
    params: the Flax ``params`` collection (nested dicts of arrays).
    model_config: the model's ``TLPConfig``.
    hardware: head names, one per head, in head order.
    platform: featurizer platform ("llvm" / "cuda").
    crop: featurizer crop ``(steps, width)``; None = the model's ``(seq_len, feature_dim)``.
    vocab_json: the featurizer vocabulary (``Vocabulary.to_json()``).
    step: training step of the source checkpoint.
    loop_tokens: ``{"layout_version", "max_tokens", "width"}`` of the replayed loop tokens the
      model reads (``crop`` then includes them); None = none.
    skeletons_json: the skeleton collection (``tlp_jax.core.skeleton``) embedded with a model
      of loop tokens; None = none (its predictor then needs a skeleton per call).

  Returns:
    ``{key: np.ndarray}``, loadable by ``predictor.Predictor``.
  """
  hardware = [str(h) for h in hardware]
  if len(hardware) != model_config.num_hardware_heads:
    raise ValueError(
      f"{len(hardware)} hardware names {hardware} for a model with "
      f"{model_config.num_hardware_heads} heads"
    )
  if len(set(hardware)) != len(hardware):
    raise ValueError(f"duplicate hardware names: {hardware}")
  if crop is None:
    crop = (model_config.seq_len, model_config.feature_dim)
  crop = [int(c) for c in crop]
  if len(crop) != 2:
    raise ValueError(f"crop must be (steps, width), got {crop}")
  out = flatten_params(params)
  out.update(
    {
      npred.META_FORMAT: np.array(npred.FORMAT_NAME),
      npred.META_FORMAT_VERSION: np.array(npred.FORMAT_VERSION, np.int64),
      npred.META_MODEL_CONFIG: np.array(json.dumps(model_config.to_dict(), sort_keys=True)),
      npred.META_HARDWARE: np.array(hardware, dtype=np.str_),
      npred.META_PLATFORM: np.array(str(platform)),
      npred.META_CROP: np.array(crop, np.int64),
      npred.META_VOCAB_JSON: np.array(str(vocab_json)),
      npred.META_VOCAB_VERSION: np.array(_vocab_version(vocab_json)),
      npred.META_STEP: np.array(int(step), np.int64),
    }
  )
  if loop_tokens:
    out[npred.META_LOOP_TOKENS_VERSION] = np.array(int(loop_tokens["layout_version"]), np.int64)
    out[npred.META_LOOP_TOKENS_MAX] = np.array(int(loop_tokens["max_tokens"]), np.int64)
    out[npred.META_LOOP_TOKENS_WIDTH] = np.array(int(loop_tokens["width"]), np.int64)
    if skeletons_json is not None:
      out[npred.META_SKELETONS_JSON] = np.array(str(skeletons_json))
  elif skeletons_json is not None:
    raise ValueError("skeletons_json is for models of loop tokens (give loop_tokens)")
  # Validates shapes against the config (raises PredictorError on mismatch).
  npred.Predictor(out, source="<export>")
  return out


WEIGHTS_DTYPES = ("float32", "float16")


def save_npz(
  path: str,
  params: Mapping[str, Any],
  model_config: model_lib.TLPConfig,
  weights_dtype: str = "float32",
  **meta: Any,
) -> dict[str, np.ndarray]:
  """Exports (see ``export_params``) and writes ``path`` atomically; returns the arrays written.

  The file gets the umask's mode, like any file the user creates. ``weights_dtype``
  ``"float16"`` stores the weights as float16 (half the file; the predictor computes in float32
  after upcasting them, within about 1e-3 relative of the float32 export's scores, see
  docs/EVAL.md).

  Raises:
    ValueError: an unknown ``weights_dtype``, or a weight outside float16's range.
  """
  arrays = cast_weights(export_params(params, model_config, **meta), weights_dtype)
  atomic_file.write_atomically(path, lambda f: np.savez(f, **arrays), binary=True)
  return arrays


def cast_weights(arrays: Mapping[str, np.ndarray], weights_dtype: str) -> dict[str, np.ndarray]:
  """The export ``arrays`` with their weights (``params/...``) stored as ``weights_dtype``.

  Raises:
    ValueError: an unknown ``weights_dtype``, or a weight that overflows it.
  """
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
  if weights_dtype == "float32":  # export_params' own dtype, already validated
    return dict(arrays)
  out = dict(arrays)
  for key, value in arrays.items():
    if key.startswith(npred.PARAMS_PREFIX):
      with np.errstate(over="ignore"):
        cast = np.asarray(value).astype(weights_dtype)
      if not np.all(np.isfinite(cast)):
        raise ValueError(
          f"weight {key} overflows {weights_dtype} (max |w| = {np.abs(value).max():.3g}); "
          "export it as float32"
        )
      out[key] = cast
  # The file's predictor must accept what is written.
  npred.Predictor(out, source=f"<export, {weights_dtype} weights>")
  return out


def meta_kwargs(meta: Mapping[str, Any]) -> dict[str, Any]:
  """``export_params`` keyword arguments from a training run's dataset meta plus ``step`` (and
  ``skeletons_json`` for a model of loop tokens, see ``restore_for_export``)."""
  return dict(
    hardware=meta["hardware"],
    platform=meta["platform"],
    crop=meta.get("crop"),
    vocab_json=meta["vocab_json"],
    step=int(meta["step"]),
    loop_tokens=meta.get("loop_tokens"),
    skeletons_json=meta.get("skeletons_json"),
  )


def restore_for_export(
  workdir: str, which: str = "best"
) -> tuple[Any, model_lib.TLPConfig, dict[str, Any]]:
  """``(params, TLPConfig, meta)`` of a training run, for export and evaluation.

  Args:
    workdir: the training run's workdir.
    which: "best" (lowest target-head validation loss) or "latest".

  Returns:
    ``params`` as nested dicts of NumPy arrays; the model config; ``meta`` = the dataset
    metadata (``hardware``, ``platform``, ``crop``, ``vocab_json``, loop-token layout) plus
    ``step``, ``epoch`` and the validation metrics of the restored checkpoint, and for a model
    of loop tokens ``skeletons_json`` (the workdir's copy of the dataset's skeletons, if any).

  Raises:
    FileNotFoundError: ``workdir`` is not a training workdir.
    checkpoints.CheckpointError: no readable ``which`` checkpoint.
  """
  if which not in (checkpoints.BEST, checkpoints.LATEST):
    raise ValueError(f"which must be {checkpoints.BEST!r} or {checkpoints.LATEST!r}, got {which!r}")
  model_path = os.path.join(workdir, checkpoints.MODEL_CONFIG_FILE)
  meta_path = os.path.join(workdir, checkpoints.DATASET_META_FILE)
  for p in (model_path, meta_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} missing: {workdir} is not a training workdir")
  model_config = model_lib.TLPConfig.from_dict(checkpoints.read_json(model_path))
  meta = dict(checkpoints.read_json(meta_path))
  # open_for_reading silences Orbax's INFO/WARNING chatter (checkpoints.silence_orbax_logs).
  manager = checkpoints.open_for_reading(workdir, which)
  try:
    tree, ckpt_meta = checkpoints.restore_checkpoint(manager, None)
  finally:
    manager.close()
  params = jax.tree_util.tree_map(np.asarray, tree["params"])
  meta.update({k: ckpt_meta[k] for k in ("step", "epoch", "validation") if k in ckpt_meta})
  if meta.get("loop_tokens"):
    skeletons_json = checkpoints.read_skeletons_json(workdir)
    if skeletons_json is not None:
      meta["skeletons_json"] = skeletons_json
  return params, model_config, meta


def export_workdir(
  workdir: str, out: str, which: str = "best", weights_dtype: str = "float32"
) -> dict[str, np.ndarray]:
  """Restores a training run's checkpoint (``restore_for_export``) and saves it to ``out``
  (weights stored as ``weights_dtype``, see ``save_npz``)."""
  params, model_config, meta = restore_for_export(workdir, which)
  return save_npz(out, params, model_config, weights_dtype=weights_dtype, **meta_kwargs(meta))


def make_predict_fn(
  model_config: model_lib.TLPConfig, batch_size: int = 4096, per_member: bool = False
) -> Callable[[Any, np.ndarray], np.ndarray]:
  """``predict(params, features (N, L, E)) -> scores (N, H)`` on one device, in fixed batches.

  ``per_member``: each ensemble member's scores, ``(N, ensemble_size, H)``, instead of their
  mean. The last batch is padded to ``batch_size`` so only one program is compiled.
  """
  model = model_lib.TLPModel(model_config)

  @jax.jit
  def apply(params, x):
    return model.apply({"params": params}, x, per_member=per_member)

  def predict(params, features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    n = features.shape[0]
    shape = ((model_config.ensemble_size,) if per_member else ()) + (
      model_config.num_hardware_heads,
    )
    out = np.zeros((n,) + shape, np.float32)
    bs = max(1, min(batch_size, n))
    for start in range(0, n, bs):
      chunk = features[start : start + bs]
      m = chunk.shape[0]
      if m < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], np.float32)])
      out[start : start + m] = np.asarray(apply(params, chunk))[:m]
    return out

  return predict


def _define_flags() -> None:
  # Defined only when run as a script, so importing this library never registers flags that
  # could clash with an entry point's own --workdir.
  flags.DEFINE_string("workdir", None, "Training workdir to export.")
  flags.DEFINE_string("out", None, "Output .npz path.")
  flags.DEFINE_enum("which", "best", ["best", "latest"], "Which checkpoint to export.")
  flags.DEFINE_enum(
    "weights_dtype",
    "float32",
    list(WEIGHTS_DTYPES),
    "Dtype the weights are stored in: float16 halves their bytes (docs/EVAL.md).",
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  runtime.quiet_backend_probe_logs()  # before JAX starts a backend, as train.py
  try:
    arrays = export_workdir(fl.workdir, fl.out, fl.which, fl.weights_dtype)
  except (FileNotFoundError, checkpoints.CheckpointError, ValueError) as e:
    # A user error (not a workdir, no readable checkpoint, weights beyond float16): one line.
    raise SystemExit(f"export: error: {e}") from None
  logging.info(
    "wrote %s (%.2f MB, %s weights): %d arrays, heads %s, step %d",
    fl.out,
    os.path.getsize(fl.out) / 1e6,
    fl.weights_dtype,
    len(arrays),
    [str(h) for h in arrays[npred.META_HARDWARE]],
    int(arrays[npred.META_STEP]),
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
