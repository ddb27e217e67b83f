"""Network info in TenSet's layout, and TLP's hold-out split.

A TenSet directory has one file per network configuration under ``network_info/`` (beside
``skeletons.json``, the task skeletons, which is no network). This project reads the JSON form
``(NAME,[(BATCH,SIZE)]).json``::

    {"network": "resnet_50", "batch_size": 1, "input_size": 224,
     "tasks": [{"workload_key": "...", "weight": 3, "flop_ct": 1.0e8, "desc": "..."}, ...]}

(``weight`` = how many times the task occurs in the network.) A converted file may also carry a
``"target"`` and be named ``((NAME,[(BATCH,SIZE)]),TARGET).json``.

Real TenSet ships ``((NAME,[(1,3,224,224)]),llvm).task.pkl`` instead: pickles of TVM
``SearchTask`` lists. Unpickling runs arbitrary code and needs TVM, so they are never read
implicitly: ``python -m tlp_jax.tvm.search_tasks convert --tenset_dir DIR --allow_pickle``
converts them once (only do this for a TenSet copy you trust), after which everything reads JSON.

Hold-out (TLP's protocol): every workload key that occurs in a hold-out network goes to the test
split only; the remaining records are split 90/10 train/validation by record with a seed
(:func:`train_validation_split`), or, task-disjoint, by whole task (TenSet's ``by_task`` split,
:func:`train_validation_split_by_task`: validation then measures tasks never trained on, as test
does). Specs are ``NAME[@SIZE]`` at batch 1 (no size: every input
size). Default (:func:`default_holdout`): TLP's TenSet list (resnet_50@224, mobilenet_v2@224,
resnext_50@224, bert_base@128, bert_tiny@128) when all five exist in the directory, else
tenset-mini's (resnet_50@224, bert_base@128, mobilenet@240) when all three exist, else an error
asking for an explicit list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence

import numpy as np
from absl import app, flags

from tlp_jax.core import skeleton, tenset

# Default hold-out networks (TLP's choice for TenSet; the three hold-out networks of tenset-mini,
# see its README). :func:`default_holdout` picks the first list whose networks all exist.
TENSET_HOLDOUT = (
  "resnet_50@224",
  "mobilenet_v2@224",
  "resnext_50@224",
  "bert_base@128",
  "bert_tiny@128",
)
TENSET_MINI_HOLDOUT = ("resnet_50@224", "bert_base@128", "mobilenet@240")
DEFAULT_HOLDOUTS = (TENSET_HOLDOUT, TENSET_MINI_HOLDOUT)

# TLP trains on 90% of the non-hold-out records and validates on the rest.
TRAIN_FRACTION = 0.9

_JSON_NAME = re.compile(
  r"^\(?\((?P<name>[^,()\[\]]+),\[\((?P<shape>[0-9, ]+)\)\]\)(?:,(?P<target>[^()]+)\))?\.json$"
)


class NetworkInfoError(ValueError):
  """A network-info file is malformed or a hold-out spec cannot be resolved."""


@dataclasses.dataclass(frozen=True)
class NetworkTask:
  """One task (workload) of a network and how often it occurs there."""

  workload_key: str
  weight: int
  flop_ct: float
  desc: str = ""


@dataclasses.dataclass(frozen=True)
class NetworkInfo:
  """One network configuration (name, batch size, input size) and its tasks."""

  name: str
  batch_size: int
  input_size: int
  tasks: tuple[NetworkTask, ...]
  target: str = ""
  path: str = ""

  @property
  def label(self) -> str:
    """Human-readable id, e.g. ``resnet_50 (1,224)``."""
    suffix = f" [{self.target}]" if self.target else ""
    return f"{self.name} ({self.batch_size},{self.input_size}){suffix}"

  @property
  def workload_keys(self) -> frozenset[str]:
    return frozenset(t.workload_key for t in self.tasks)

  def to_json_dict(self) -> dict:
    """The JSON form read by :func:`read_network_info`."""
    out = {"network": self.name, "batch_size": self.batch_size, "input_size": self.input_size}
    if self.target:
      out["target"] = self.target
    out["tasks"] = [dataclasses.asdict(t) for t in self.tasks]
    return out


def _fail(path: str, reason: str) -> NetworkInfoError:
  return NetworkInfoError(f"{path}: {reason}")


def _parse_task(path: str, i: int, raw) -> NetworkTask:
  where = f"tasks[{i}]"
  if not isinstance(raw, dict):
    raise _fail(path, f"{where} is not an object")
  wk = raw.get("workload_key")
  if not isinstance(wk, str) or not wk:
    raise _fail(path, f"{where}.workload_key missing or not a non-empty string")
  weight = raw.get("weight")
  if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
    raise _fail(path, f"{where}.weight must be a positive integer, got {weight!r}")
  flop_ct = raw.get("flop_ct", float("nan"))
  if isinstance(flop_ct, bool) or not isinstance(flop_ct, (int, float)):
    raise _fail(path, f"{where}.flop_ct must be a number, got {flop_ct!r}")
  desc = raw.get("desc", "")
  if not isinstance(desc, str):
    raise _fail(path, f"{where}.desc must be a string")
  return NetworkTask(workload_key=wk, weight=weight, flop_ct=float(flop_ct), desc=desc)


def read_network_info(path: str) -> NetworkInfo:
  """Reads and validates one ``network_info/*.json`` file.

  Raises:
    NetworkInfoError: naming the file and what is wrong with it (unreadable, a directory,
      not UTF-8, invalid or too deeply nested JSON, a bad field, an empty task list).
  """
  if os.path.isdir(path):
    raise _fail(path, "is a directory, not a network-info file")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise _fail(path, f"cannot read: {e.strerror or e}") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _fail(path, f"not UTF-8 text (byte {e.start}: {e.reason})") from None
  try:
    raw = json.loads(text)
  except json.JSONDecodeError as e:
    raise _fail(path, f"invalid JSON at line {e.lineno}: {e.msg}") from None
  except RecursionError:
    raise _fail(path, "JSON nested too deeply to be network info") from None
  if not isinstance(raw, dict):
    raise _fail(path, "top level is not a JSON object")
  name = raw.get("network")
  if not isinstance(name, str) or not name:
    raise _fail(path, "'network' missing or not a string")
  ints = {}
  for key in ("batch_size", "input_size"):
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise _fail(path, f"'{key}' must be a positive integer, got {v!r}")
    ints[key] = v
  tasks = raw.get("tasks")
  if not isinstance(tasks, list):
    raise _fail(path, "'tasks' missing or not a list")
  if not tasks:
    # A network has at least one task; an empty list would silently take a hold-out network's
    # tasks out of the test split (they would be trained on instead).
    raise _fail(path, "'tasks' is empty: a network has at least one task")
  parsed = tuple(_parse_task(path, i, t) for i, t in enumerate(tasks))
  seen = set()
  for t in parsed:
    if t.workload_key in seen:
      raise _fail(path, f"workload key listed twice: {t.workload_key}")
    seen.add(t.workload_key)
  target = raw.get("target", "")
  if not isinstance(target, str):
    raise _fail(path, "'target' must be a string")
  # The file name repeats name/batch/size; a mismatch means a mislabelled file, which would
  # silently move tasks in or out of the hold-out set.
  m = _JSON_NAME.match(os.path.basename(path))
  if m:
    shape = [int(s) for s in m.group("shape").split(",")]
    if m.group("name") != name or shape[0] != ints["batch_size"] or shape[-1] != ints["input_size"]:
      raise _fail(
        path,
        f"file name disagrees with content ({name}, batch {ints['batch_size']}, "
        f"input size {ints['input_size']})",
      )
  return NetworkInfo(
    name=name,
    batch_size=ints["batch_size"],
    input_size=ints["input_size"],
    tasks=parsed,
    target=target,
    path=path,
  )


def load_network_infos(tenset_dir: str) -> list[NetworkInfo]:
  """Reads every network of a TenSet directory, sorted by (name, batch, input size, target).

  Raises:
    FileNotFoundError: no ``network_info`` folder.
    NetworkInfoError: no JSON network info (with instructions when only TenSet's pickles are
      there), or a malformed file.
  """
  folder = os.path.join(tenset_dir, tenset.NETWORK_INFO_DIR)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no network_info folder (is {tenset_dir} a TenSet dir?)")
  names = sorted(os.listdir(folder))
  # The task skeletons live in the same folder (tlp_jax.core.skeleton); they are no network.
  not_networks = {os.path.basename(skeleton.TENSET_SKELETONS_FILE)}
  jsons = [n for n in names if n.endswith(".json") and n not in not_networks]
  if not jsons:
    pkls = [n for n in names if n.endswith(".task.pkl")]
    if pkls:
      raise NetworkInfoError(
        f"{folder} has {len(pkls)} TenSet *.task.pkl files but no JSON network info. Pickles "
        "are code execution and need TVM, so they are not read implicitly. If you trust this "
        "TenSet copy, convert them once (needs `pip install -e '.[tvm]'`): python -m "
        f"tlp_jax.tvm.search_tasks convert --tenset_dir {tenset_dir} --allow_pickle"
      )
    raise NetworkInfoError(f"{folder}: no network info (*.json) files")
  infos = [read_network_info(os.path.join(folder, n)) for n in jsons]
  infos.sort(key=lambda n: (n.name, n.batch_size, n.input_size, n.target))
  return infos


@dataclasses.dataclass(frozen=True)
class HoldoutSpec:
  """``NAME[@SIZE]`` at batch 1; no size = every input size of that network at batch 1."""

  name: str
  input_size: int | None = None

  @classmethod
  def parse(cls, spec: str) -> HoldoutSpec:
    spec = spec.strip()
    name, sep, size = spec.partition("@")
    if not name or (sep and not size.isdigit()):
      raise NetworkInfoError(f"bad hold-out spec {spec!r}: expected NAME or NAME@SIZE")
    return cls(name=name, input_size=int(size) if sep else None)

  def matches(self, net: NetworkInfo) -> bool:
    return (
      net.name == self.name
      and net.batch_size == 1
      and (self.input_size is None or net.input_size == self.input_size)
    )

  def __str__(self) -> str:
    return self.name if self.input_size is None else f"{self.name}@{self.input_size}"


def parse_holdout(specs: str | Sequence[str]) -> tuple[HoldoutSpec, ...]:
  """Parses ``"a@224, b"`` or ``["a@224", "b"]`` into hold-out specs (empty entries dropped)."""
  if isinstance(specs, str):
    specs = specs.split(",")
  return tuple(HoldoutSpec.parse(s) for s in specs if s.strip())


def default_holdout(networks: Iterable[NetworkInfo]) -> tuple[str, ...]:
  """TLP's TenSet hold-out if all of its networks exist, else tenset-mini's if all of its exist.

  Raises:
    NetworkInfoError: neither default fits; the caller must pass a hold-out explicitly.
  """
  networks = list(networks)
  for candidate in DEFAULT_HOLDOUTS:
    if all(any(s.matches(n) for n in networks) for s in parse_holdout(candidate)):
      return candidate
  raise NetworkInfoError(
    "no default hold-out fits this dataset (neither TenSet's "
    f"{','.join(TENSET_HOLDOUT)} nor tenset-mini's {','.join(TENSET_MINI_HOLDOUT)} are all "
    f"present); pass one explicitly. Available: {available_networks(networks)}"
  )


def available_networks(networks: Iterable[NetworkInfo]) -> str:
  """Comma-separated ``NAME@SIZE (batch B)`` list, for error messages."""
  return ", ".join(f"{n.name}@{n.input_size} (batch {n.batch_size})" for n in networks)


def select_holdout(
  networks: Sequence[NetworkInfo], specs: str | Sequence[str] | Sequence[HoldoutSpec]
) -> list[NetworkInfo]:
  """The networks named by hold-out specs, in ``networks`` order.

  Raises:
    NetworkInfoError: a spec matches no network (the message lists the available ones).
  """
  if isinstance(specs, str) or (specs and isinstance(specs[0], str)):
    specs = parse_holdout(specs)
  chosen = []
  for spec in specs:
    hits = [n for n in networks if spec.matches(n)]
    if not hits:
      raise NetworkInfoError(
        f"hold-out network {spec} (batch 1) not found. Available: {available_networks(networks)}"
      )
    chosen.extend(h for h in hits if h not in chosen)
  return [n for n in networks if n in chosen]


def holdout_workload_keys(holdout: Iterable[NetworkInfo]) -> frozenset[str]:
  """Every workload key that occurs in any hold-out network (these are test-only)."""
  keys = set()
  for n in holdout:
    keys |= n.workload_keys
  return frozenset(keys)


def train_validation_split(
  num_records: int, seed: int, train_fraction: float = TRAIN_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
  """Splits record indices ``0..num_records-1`` into sorted (train, validation) index arrays.

  As TLP: shuffle the records with the seed, the first ``int(n * train_fraction)`` train.
  The caller must enumerate records in a deterministic order (we use sorted task file, line).
  """
  if not 0.0 < train_fraction <= 1.0:
    raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
  perm = np.random.default_rng(seed).permutation(num_records)
  n_train = int(num_records * train_fraction)
  return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def train_validation_split_by_task(
  record_task: np.ndarray, seed: int, train_fraction: float = TRAIN_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
  """Splits records by whole task into sorted (train, validation) record position arrays.

  The distinct values of ``record_task`` (sorted) are split with :func:`train_validation_split`
  (seeded permutation, the first ``int(n_tasks * train_fraction)`` tasks train); every record
  goes where its task went, so no task is in both.
  """
  record_task = np.asarray(record_task)
  tasks = np.unique(record_task)
  _, val_tasks = train_validation_split(tasks.size, seed, train_fraction)
  is_val = np.isin(record_task, tasks[val_tasks])
  return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def json_file_name(net: NetworkInfo) -> str:
  """TenSet-layout JSON file name; the target is part of it when it is not plain llvm."""
  base = f"({net.name},[({net.batch_size},{net.input_size})])"
  return f"{base}.json" if net.target in ("", "llvm") else f"({base},{net.target}).json"


def main(argv: Sequence[str]) -> None:
  """Lists the networks of a TenSet dir and its default hold-out."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    nets = load_network_infos(flags.FLAGS.tenset_dir)
  except (FileNotFoundError, NetworkInfoError) as e:
    sys.exit(f"error: {e}")
  for n in nets:
    print(f"{n.label}: {len(n.tasks)} tasks, {sum(t.weight for t in n.tasks)} occurrences")
  try:
    print("default hold-out:", ",".join(default_holdout(nets)))
  except NetworkInfoError as e:
    print(e)


if __name__ == "__main__":
  flags.DEFINE_string("tenset_dir", None, "TenSet root directory.", required=True)
  app.run(main)
