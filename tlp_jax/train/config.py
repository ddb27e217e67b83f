"""The one mapping from a training ``ConfigDict`` (``configs/*.py``) to typed, frozen configs.

Every config derives from ``configs/default.get_config()``, so every field is present: the
mapping reads each one, with no defaults of its own, and an unknown (e.g. misspelled) or missing
field is a ``ValueError`` that names it and the known ones. Sections map one-to-one:

* ``config.model`` -> ``model.TLPConfig`` (``num_hardware_heads`` and the input size are set from
  the dataset by ``data.model_config_for``);
* ``config.loss`` -> ``losses.LossConfig``;
* ``config.optim`` -> ``optimizer.OptimConfig``;
* ``config.few_shot`` -> ``FewShotConfig``, ``config.distributed`` -> ``DistributedConfig``,
  ``config.stream`` -> ``StreamConfig``;
* every other top-level field -> a field of ``TrainConfig`` of the same name.

The values are validated here, so a bad run fails before it loads data.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from tlp_jax.train import losses, optimizer
from tlp_jax.train import model as model_lib

# config.loop_tokens: whether the model reads a dataset's replayed loop tokens (a default build
# has them when the TenSet dir has its skeletons). "auto": when the dataset has them;
# "required": refuse a dataset without them; "off": read TLP's step tokens only (the original's
# input, also on a dataset with tokens).
LOOP_TOKEN_MODES = ("auto", "required", "off")
BATCH_ORDERS = ("random", "by_task")
DATA_PLACEMENTS = ("auto", "device", "host", "stream")
# Values of jax.default_matmul_precision for config.matmul_precision.
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
# config.attention_impl (model.SelfAttention.implementation): the same function either way.
# "cudnn_pad8": cuDNN's fused attention (NVIDIA GPUs from Ampere on, bfloat16/float16 compute
# only); "auto": that where it runs, else "einsum_pad8" (model.resolve_attention).
ATTENTION_IMPLS = ("auto", "einsum", "einsum_pad8", "cudnn_pad8")
# config.init_mode (tlp_jax/train/init_from.py): what trains when starting from config.init_from.
INIT_MODES = ("all", "heads")

# Resuming a run (a rerun into a workdir that holds one) compares the config with the run's
# recorded ``train_config.json``, field by field (dotted names). These fields do not change what
# is trained, only where the data is read from, how it is placed, and how often the run logs or
# which processes run it: they may differ on a rerun.
RUNTIME_FIELDS = frozenset(
  {
    "data_dir",
    "data_placement",
    "device_data_max_bytes",
    "stream.num_workers",
    "stream.read_threads",
    "stream.prefetch_batches",
    "prefetch_to_device",
    "steps_per_execution",
    "log_every_steps",
    "checkpoints_to_keep",
    "distributed.enabled",
    "distributed.coordinator_address",
    "distributed.num_processes",
    "distributed.process_id",
  }
)
# These change a run in a way that keeps its checkpoints meaningful (e.g. more epochs), so a
# rerun may change them, but only when asked explicitly (``train.py --allow_config_change``),
# and the change is recorded in the workdir. Every other field (model, data, loss, optimizer,
# seed, batch, ...) makes a different run: it needs a new workdir.
OVERRIDABLE_FIELDS = frozenset(
  {
    "num_epochs",
    "eval_every_epochs",
    "checkpoint_every_steps",
    "eval_top_k",
    "matmul_precision",
    "attention_impl",
    "deterministic_gpu_ops",
  }
)

# Fields added to the config after runs were recorded without them, with the value that
# reproduces the code before them. Resuming such a run compares the field as that value, so a
# new default that would change the run is refused by name (``checkpoints.reconcile_train_config``)
# instead of surfacing later as a model mismatch.
ADDED_FIELDS = {"max_loop_tokens": 0}


class ConfigError(ValueError):
  """A configuration the user can fix: an unknown or missing field, an invalid value, or a
  value that does not fit the dataset (``train.py`` prints it as one line)."""


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
  """``config.few_shot``: keep only some of the target head's training labels (``data``)."""

  num_labels: int
  fraction: float


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """``config.stream``: the grain pipeline of ``data_placement="stream"`` (``stream.pipeline``)."""

  num_workers: int
  read_threads: int
  prefetch_batches: int

  def __post_init__(self):
    for name in ("num_workers", "read_threads", "prefetch_batches"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config.stream.{name} must be an integer >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """``config.distributed``: ``jax.distributed.initialize`` arguments (``train.py``)."""

  enabled: bool
  coordinator_address: str
  num_processes: int
  process_id: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A training run's configuration (``configs/default.py`` documents every field)."""

  data_dir: str
  dataset: str
  hardware: tuple[str, ...]
  few_shot: FewShotConfig
  init_from: str
  init_mode: str
  model: model_lib.TLPConfig
  loop_tokens: str
  max_loop_tokens: int
  loss: losses.LossConfig
  batch_order: str
  optim: optimizer.OptimConfig
  matmul_precision: str
  attention_impl: str
  deterministic_gpu_ops: bool
  batch_size: int
  eval_batch_size: int
  num_epochs: int
  seed: int
  data_placement: str
  device_data_max_bytes: int | str  # bytes, or "auto" (train.data.device_data_budget)
  stream: StreamConfig
  prefetch_to_device: int  # batches on the devices ahead of the step (host, stream); 0: off
  steps_per_execution: int  # training steps per dispatch (device placement); 1: one per call
  log_every_steps: int
  eval_every_epochs: int
  checkpoint_every_steps: int
  checkpoints_to_keep: int
  eval_top_k: tuple[int, ...]
  distributed: DistributedConfig

  def __post_init__(self):
    _check_choice("loop_tokens", self.loop_tokens, LOOP_TOKEN_MODES)
    if (
      isinstance(self.max_loop_tokens, bool)
      or not isinstance(self.max_loop_tokens, int)
      or self.max_loop_tokens < 0
    ):
      raise ConfigError(
        f"config.max_loop_tokens must be an integer >= 0 (0 = all the dataset stores), got "
        f"{self.max_loop_tokens!r}"
      )
    _check_choice("batch_order", self.batch_order, BATCH_ORDERS)
    _check_choice("data_placement", self.data_placement, DATA_PLACEMENTS)
    _check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("init_mode", self.init_mode, INIT_MODES)
    if self.init_mode == "heads" and not self.init_from:
      raise ConfigError('config.init_mode="heads" trains only the heads: it needs config.init_from')
    # "auto" or a byte count. The ConfigDict field is a string (its default is "auto"), so a
    # byte count given on the command line arrives as digits: read them as the number.
    budget = self.device_data_max_bytes
    if isinstance(budget, str) and budget.strip().isdigit():
      object.__setattr__(self, "device_data_max_bytes", int(budget))
    elif budget != "auto" and (
      isinstance(budget, bool) or not isinstance(budget, int) or budget < 0
    ):
      raise ConfigError(
        f"config.device_data_max_bytes must be 'auto' or a byte count, got {budget!r}"
      )
    prefetch = self.prefetch_to_device
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
      raise ConfigError(f"config.prefetch_to_device must be an integer >= 0, got {prefetch!r}")
    steps = self.steps_per_execution
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
      raise ConfigError(f"config.steps_per_execution must be an integer >= 1, got {steps!r}")
    for name in (
      "batch_size",
      "eval_batch_size",
      "num_epochs",
      "log_every_steps",
      "eval_every_epochs",
    ):
      if getattr(self, name) < 1:
        raise ConfigError(f"config.{name} must be >= 1, got {getattr(self, name)}")

  def to_dict(self) -> dict[str, Any]:
    """Plain-Python dict of every field (JSON-serialisable), nested like the ConfigDict."""
    return dataclasses.asdict(self)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(f"config.{name} must be one of {choices}, got {value!r}")


# Fields of a section that are not in the ConfigDict: set by the trainer from the dataset
# (num_hardware_heads) or constants of the loss (LambdaRank's sigma, eps, k).
_NOT_IN_CONFIG = {
  model_lib.TLPConfig: ("num_hardware_heads",),
  losses.LossConfig: ("sigma", "eps", "k"),
}


def _config_fields(cls: type) -> dict[str, Any]:
  """``{name: type}`` of the fields of ``cls`` that the ConfigDict holds."""
  hints = typing.get_type_hints(cls)
  skip = _NOT_IN_CONFIG.get(cls, ())
  return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in skip}


def _build(cls: type, section: Mapping[str, Any], path: str) -> Any:
  """``cls`` from a ConfigDict section; nested dataclass fields from nested sections."""
  fields = _config_fields(cls)
  given = set(section.keys())
  unknown = sorted(given - set(fields))
  missing = sorted(set(fields) - given)
  if unknown or missing:
    where = f"config.{path}" if path else "config"
    problems = []
    if unknown:
      problems.append(f"unknown field(s) {[f'{where}.{k}' for k in unknown]}")
    if missing:
      problems.append(f"missing field(s) {[f'{where}.{k}' for k in missing]}")
    raise ConfigError(
      f"{' and '.join(problems)}; the known fields of {where} are "
      f"{sorted(fields)} (configs/default.py)"
    )
  values = {}
  for name, hint in fields.items():
    value = section[name]
    if dataclasses.is_dataclass(hint):
      value = _build(hint, value, f"{path}.{name}" if path else name)
    elif _is_tuple(hint) and value is not None:
      value = tuple(value)
    values[name] = value
  return cls(**values)


def _is_tuple(hint: Any) -> bool:
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_is_tuple(a) for a in typing.get_args(hint))
  return hint is tuple or origin is tuple


def from_config_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> TrainConfig:
  """The typed ``TrainConfig`` of a training ConfigDict (derived from ``configs/default.py``).

  Raises:
    ConfigError: an unknown, misspelled or missing field (named with the known ones), or an
      invalid value.
  """
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  try:
    return _build(TrainConfig, config, "")
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:  # a section's own check (model, loss, optim) of a value
    raise ConfigError(str(e)) from e


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{dotted.name: value}`` of a nested config dict (``TrainConfig.to_dict()``)."""
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, name + "."))
    else:
      out[name] = v
  return out


def config_changes(
  recorded: Mapping[str, Any], now: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
  """``{dotted field: (recorded, now)}`` of the fields that differ between two config dicts
  (JSON-like: tuples and lists compare equal), ``RUNTIME_FIELDS`` excluded. A field present on
  one side only (a config of an older version) differs too, with ``None`` on the other side."""
  old, new = flatten(recorded), flatten(now)
  changes = {}
  for name in sorted(set(old) | set(new)):
    if name in RUNTIME_FIELDS:
      continue
    a, b = old.get(name), new.get(name)
    if _jsonish(a) != _jsonish(b):
      changes[name] = (a, b)
  return changes


def _jsonish(v: Any) -> Any:
  return list(map(_jsonish, v)) if isinstance(v, (list, tuple)) else v
