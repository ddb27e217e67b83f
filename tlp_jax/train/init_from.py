"""Fine-tuning: start a training run from a trained model (``config.init_from``).

``config.init_from`` names the source: a training workdir (its ``best`` checkpoint, or its
``latest`` when it has no best, e.g. a run without validation) or an exported ``.npz``
(``tlp_jax.train.export``; float16 weights are read as float32). The new run starts from the
source's parameters instead of a random initialisation, with a fresh optimizer state and
schedule, and then trains as any run does (``loop``). A run that resumes from its own
checkpoint ignores the source's weights (its checkpoint already holds them).

The source must be the same model on the same input: every ``TLPConfig`` field but
``num_hardware_heads`` equal (so train with the same ``config.model`` and ``loop_tokens``), and
the same feature layout (platform, crop, vocabulary, loop-token layout). Anything else is an
``InitFromError`` with one line saying what differs.

Heads are matched by hardware name. A head of the new run whose hardware the source lacks
(fine-tuning an ``epyc-9004`` model for ``xeon-emr-16c``) starts as a copy of the source's
*first* head: the source's target, its best-trained decoder, and a better start than a random
one for a ranking of the same programs.

``config.init_mode``:

* ``"all"``: every parameter starts from the source and every parameter trains;
* ``"heads"``: the trunk (encoder, attention, residual blocks) is frozen at the source's values
  -- its updates are zero, weight decay included -- and only the decoder heads train.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

from tlp_jax.core import predictor as npred
from tlp_jax.core import pretrained
from tlp_jax.train import checkpoints, export
from tlp_jax.train import model as model_lib
from tlp_jax.train.config import INIT_MODES
from tlp_jax.train.step import TrainState

HEADS = "heads"  # the decoder heads' parameter subtree (model.TLPModel)
# Feature-layout fields of data.dataset_meta that source and run must share ("hardware" may
# differ: heads are matched by name).
_LAYOUT_FIELDS = ("platform", "crop", "vocab_json", "loop_tokens")


class InitFromError(ValueError):
  """``config.init_from`` cannot be used (unreadable, or a different model / feature layout)."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A trained model to start from.

  Attributes:
    path: the workdir or ``.npz`` it was read from.
    checkpoint: ``"best"`` / ``"latest"`` (a workdir) or ``"npz"``.
    params: nested dicts of float32 NumPy arrays (the Flax ``params`` collection).
    model_config: its ``TLPConfig``.
    meta: its input, as ``data.dataset_meta`` writes it (hardware, platform, crop, vocab_json,
      loop_tokens when it reads them).
  """

  path: str
  checkpoint: str
  params: dict[str, Any]
  model_config: model_lib.TLPConfig
  meta: dict[str, Any]

  @property
  def hardware(self) -> tuple[str, ...]:
    return tuple(str(h) for h in self.meta["hardware"])


def _fail(path: str, reason: str) -> InitFromError:
  return InitFromError(f"config.init_from={path}: {reason}")


def load_source(path: str) -> Source:
  """Reads a workdir (best checkpoint, else latest), an exported ``.npz``, or a starter model
  shipped with the package (``pretrained:NAME``).

  Raises:
    InitFromError: no such path, not a workdir / export, or an unreadable checkpoint / file.
  """
  if pretrained.is_spec(path):  # a starter model shipped with the package
    try:
      with pretrained.as_path(path[len(pretrained.SPEC_PREFIX) :]) as file:
        return dataclasses.replace(_from_npz(str(file)), path=path)
    except pretrained.PretrainedError as e:
      raise _fail(path, str(e)) from None
  if os.path.isdir(path):
    return _from_workdir(path)
  if os.path.isfile(path):
    return _from_npz(path)
  raise _fail(path, "no such training workdir or exported .npz")


def _from_workdir(path: str) -> Source:
  which = checkpoints.BEST
  try:
    manager = checkpoints.open_for_reading(path, checkpoints.BEST)
    try:
      if manager.latest_step() is None:
        which = checkpoints.LATEST
    finally:
      manager.close()
  except checkpoints.CheckpointError:
    which = checkpoints.LATEST  # a run without validation keeps no best checkpoint
  try:
    params, model_config, meta = export.restore_for_export(path, which)
  except (FileNotFoundError, checkpoints.CheckpointError, ValueError) as e:
    raise _fail(path, str(e)) from None
  meta = {k: meta[k] for k in ("hardware", *_LAYOUT_FIELDS) if k in meta}
  return Source(path, which, _float32(params), model_config, meta)


def _from_npz(path: str) -> Source:
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise _fail(path, f"not a readable .npz model export ({e})") from None
  if npred.META_FORMAT not in arrays or str(arrays[npred.META_FORMAT]) != npred.FORMAT_NAME:
    raise _fail(path, f"not a tlp-jax model export (no {npred.META_FORMAT})")
  version = int(np.asarray(arrays.get(npred.META_FORMAT_VERSION, -1)).reshape(()))
  if not 1 <= version <= npred.FORMAT_VERSION:
    raise _fail(path, f"export format_version {version}; this code reads 1-{npred.FORMAT_VERSION}")
  try:
    model_config = model_lib.TLPConfig.from_dict(json.loads(str(arrays[npred.META_MODEL_CONFIG])))
    meta: dict[str, Any] = {
      "hardware": [str(h) for h in np.asarray(arrays[npred.META_HARDWARE]).reshape(-1)],
      "platform": str(arrays[npred.META_PLATFORM]),
      "crop": [int(c) for c in np.asarray(arrays[npred.META_CROP]).reshape(-1)],
      "vocab_json": str(arrays[npred.META_VOCAB_JSON]),
    }
  except (KeyError, ValueError, TypeError) as e:
    raise _fail(path, f"bad export metadata ({type(e).__name__}: {e})") from None
  if int(np.asarray(arrays.get(npred.META_LOOP_TOKENS_MAX, 0)).reshape(())):
    meta["loop_tokens"] = {
      "layout_version": int(np.asarray(arrays[npred.META_LOOP_TOKENS_VERSION]).reshape(())),
      "max_tokens": int(np.asarray(arrays[npred.META_LOOP_TOKENS_MAX]).reshape(())),
      "width": int(np.asarray(arrays[npred.META_LOOP_TOKENS_WIDTH]).reshape(())),
    }
  params: dict[str, Any] = {}
  for key, value in arrays.items():
    if not key.startswith(npred.PARAMS_PREFIX):
      continue
    *parents, leaf = key[len(npred.PARAMS_PREFIX) :].split("/")
    node = params
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  if not params:
    raise _fail(path, "the export has no parameters")
  return Source(path, "npz", _float32(params), model_config, meta)


def _float32(tree: Mapping[str, Any]) -> dict[str, Any]:
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), dict(tree))


def head_sources(source_hardware: Sequence[str], hardware: Sequence[str]) -> list[int]:
  """For each head of the run, the source head it starts from: the one of the same hardware,
  else the source's first head."""
  source_hardware = list(source_hardware)
  return [source_hardware.index(h) if h in source_hardware else 0 for h in hardware]


def check_compatible(
  source: Source, model_config: model_lib.TLPConfig, meta: Mapping[str, Any]
) -> None:
  """Refuses a source that is not this run's model on this run's input.

  Args:
    source: the loaded source.
    model_config: the run's ``TLPConfig`` (``data.model_config_for``).
    meta: the run's ``data.dataset_meta`` (its feature layout).

  Raises:
    InitFromError: naming the differing model fields or feature-layout fields.
  """
  # The compute dtype does not change the parameters (always float32): a model trained in
  # bfloat16 on a GPU fine-tunes in float32 on a CPU.
  ignored = ("num_hardware_heads", "dtype")
  want = {k: v for k, v in model_config.to_dict().items() if k not in ignored}
  got = {k: v for k, v in source.model_config.to_dict().items() if k not in ignored}
  diff = {k: (got[k], want[k]) for k in want if got.get(k) != want[k]}
  if diff:
    raise _fail(
      source.path,
      "its model differs from this run's (source vs run: "
      + ", ".join(f"model.{k} {a} vs {b}" for k, (a, b) in sorted(diff.items()))
      + "); train with the source's config.model, loop_tokens and max_loop_tokens",
    )
  layout_diff = [k for k in _LAYOUT_FIELDS if not _same_layout(k, source.meta.get(k), meta.get(k))]
  if layout_diff:
    shown = {k: (source.meta.get(k), meta.get(k)) for k in layout_diff if k != "vocab_json"}
    raise _fail(
      source.path,
      f"its input differs from this dataset's in {layout_diff}"
      + (f" (source vs run: {shown})" if shown else "")
      + "; the source was trained on another feature layout",
    )
  template = jax.eval_shape(
    lambda: model_lib.init_params(
      dataclasses.replace(model_config, num_hardware_heads=len(source.hardware)),
      jax.random.PRNGKey(0),
    )
  )
  _check_shapes(source, template)


def _same_layout(field: str, a: Any, b: Any) -> bool:
  if field == "vocab_json" and a is not None and b is not None:
    return json.loads(a) == json.loads(b)
  if field == "crop" and a is not None and b is not None:
    return [int(c) for c in a] == [int(c) for c in b]
  return a == b


def _check_shapes(source: Source, template: Any) -> None:
  want = jax.tree_util.tree_map(lambda x: tuple(x.shape), template)
  got = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), source.params)
  if jax.tree_util.tree_structure(want) != jax.tree_util.tree_structure(got) or (
    jax.tree_util.tree_leaves(want) != jax.tree_util.tree_leaves(got)
  ):
    raise _fail(
      source.path,
      "its parameters do not match its model config "
      f"(a damaged or edited export; {len(jax.tree_util.tree_leaves(got))} arrays)",
    )


def _head_axis(model_config: model_lib.TLPConfig) -> int:
  # An ensemble's leaves carry the member axis first, then the head axis.
  return 1 if model_config.ensemble_size > 1 else 0


def _is_head(path: tuple[Any, ...]) -> bool:
  return any(getattr(k, "key", None) == HEADS for k in path)


def initial_params(
  source: Source, model_config: model_lib.TLPConfig, hardware: Sequence[str]
) -> dict[str, Any]:
  """The source's parameters with the heads laid out for ``hardware`` (``head_sources``)."""
  index = np.asarray(head_sources(source.hardware, hardware))
  axis = _head_axis(model_config)
  for h, i in zip(hardware, index):
    if h not in source.hardware:
      logging.info(
        "init_from: head %s starts from the source's %s head (the source has no %s head)",
        h,
        source.hardware[i],
        h,
      )

  def pick(path, leaf):
    return np.take(leaf, index, axis=axis) if _is_head(path) else leaf

  return jax.tree_util.tree_map_with_path(pick, source.params)


def initial_state(
  source: Source,
  state: TrainState,
  tx: optax.GradientTransformation,
  model_config: model_lib.TLPConfig,
  hardware: Sequence[str],
) -> TrainState:
  """``state`` (a fresh one, step 0) with the source's parameters and a fresh optimizer state."""
  params = jax.tree_util.tree_map(np.asarray, initial_params(source, model_config, hardware))
  logging.info(
    "init_from: parameters of %s (%s checkpoint, heads %s) for heads %s",
    source.path,
    source.checkpoint,
    list(source.hardware),
    list(hardware),
  )
  return state.replace(params=params, opt_state=tx.init(params))


def _labels(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "train" if _is_head(path) else "frozen", params
  )


def wrap_optimizer(
  tx: optax.GradientTransformation, init_mode: str
) -> optax.GradientTransformation:
  """``tx`` for ``init_mode``: unchanged for ``"all"``; for ``"heads"``, ``tx`` on the heads and
  zero updates for the trunk."""
  if init_mode not in INIT_MODES:
    raise ValueError(f"init_mode must be one of {INIT_MODES}, got {init_mode!r}")
  if init_mode == "all":
    return tx
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, _labels)
