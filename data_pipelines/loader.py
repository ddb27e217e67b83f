"""One-shot array loader: a built TenSet TFDS config -> contiguous NumPy arrays.

Decoding TFDS examples one by one runs at ~10-20k examples/s, far too slow to feed a trainer, so
:func:`load_arrays` reads each split once (raw array_record records, decoded in large batches
straight into preallocated arrays) and caches them as ``.npy`` files in ``arrays_cache/`` inside
the dataset's version folder. A split of TenSet size (>= ``PARALLEL_DECODE_MIN_EXAMPLES``) is
decoded by worker processes, each writing its record ranges into the cache's memory maps (one
process decodes ~40k examples/s: 8.6M records would take ~3.5 min). Later loads memory-map the
cache (millions of examples/s). The cache carries a fingerprint of the dataset files; a rebuilt
dataset invalidates it.

No JAX, and TFDS is imported only when the cache has to be (re)made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tqdm

from data_pipelines import schema
from tlp_jax.core import atomic_file

CACHE_DIR = "arrays_cache"
CACHE_FORMAT = 1
_DECODE_BATCH = 16384
# decode_workers=0 ("auto"): a split with at least this many examples is decoded by one process
# per core (spawned processes take ~1-2 s to start: not worth it for small splits).
PARALLEL_DECODE_MIN_EXAMPLES = 200_000
# Records per job of a parallel decode (a job writes one contiguous range of the arrays).
_DECODE_CHUNK = 65_536


class DatasetNotFoundError(FileNotFoundError):
  """No built config at the given place (the message says what exists)."""


@dataclasses.dataclass(frozen=True)
class SplitArrays:
  """One split as contiguous arrays (``H`` = hardware of the config).

  Attributes:
    features: ``(N, L, E)`` float32 TLP features.
    scores: ``(N, H)`` float32 ``min_cost / cost`` (0 where not measured).
    mask: ``(N, H)`` bool, the program has a valid measurement on that hardware.
    task_index: ``(N,)`` int32 row of :attr:`DatasetArrays.tasks`.
    min_cost: ``(N, H)`` float32 the task's best cost (s) per hardware (0 where none).
    loop_tokens: ``(N, T, W)`` float16 loop tokens (layout:
      :attr:`DatasetArrays.loop_token_layout`), or None for a build without them.
  """

  features: np.ndarray
  scores: np.ndarray
  mask: np.ndarray
  task_index: np.ndarray
  min_cost: np.ndarray
  loop_tokens: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.task_index.shape[0])


@dataclasses.dataclass(frozen=True)
class TaskTable:
  """All tasks of the config; ``task_index`` of the examples points here.

  Attributes:
    workload_keys: ``(T,)`` sorted workload keys.
    min_cost: ``(T, H)`` float64 best cost (s) per hardware, NaN where not measured.
    flop_ct: ``(T,)`` float64 FLOPs from network info (NaN for tasks in no network).
    num_records: ``(T, H)`` examples measured per task and hardware.
  """

  workload_keys: tuple[str, ...]
  min_cost: np.ndarray
  flop_ct: np.ndarray
  num_records: np.ndarray

  def __len__(self) -> int:
    return len(self.workload_keys)


@dataclasses.dataclass(frozen=True)
class HoldoutNetwork:
  """A hold-out network: its tasks that have records, and their occurrences (weights)."""

  name: str
  batch_size: int
  input_size: int
  label: str
  task_indices: np.ndarray
  weights: np.ndarray
  missing_workload_keys: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DatasetArrays:
  """A whole config: three splits plus everything stored with the dataset.

  ``loop_token_layout`` is the metadata entry of the loop tokens (``layout_version``,
  ``max_tokens`` = T, ``width`` = W, ``columns``, ``dtype``, ``skeletons_file``) or None;
  ``skeletons_path`` the dataset's ``skeletons.json`` (the skeletons of its tasks, for export)
  or None; ``validation_mode`` how validation was split (``by_record`` / ``by_task``).
  """

  config_name: str
  train: SplitArrays
  validation: SplitArrays
  test: SplitArrays
  hardware: tuple[str, ...]
  tasks: TaskTable
  networks: tuple[HoldoutNetwork, ...]
  vocab_json: str
  platform: str
  crop: tuple[int, int]
  read_stats: Mapping[str, Any]
  holdout: tuple[str, ...]
  seed: int
  metadata: Mapping[str, Any]
  fingerprint: str
  loop_token_layout: Mapping[str, Any] | None = None
  skeletons_path: str | None = None
  validation_mode: str = "by_record"

  @property
  def loop_token_shape(self) -> tuple[int, int] | None:
    """``(T, W)`` of the loop tokens, or None."""
    return schema.loop_token_shape(self.metadata)

  def split(self, name: str) -> SplitArrays:
    """``train``, ``validation`` or ``test``."""
    if name not in schema.SPLITS:
      raise ValueError(f"unknown split {name!r}; choose one of {schema.SPLITS}")
    return getattr(self, name)

  def summary(self) -> str:
    """A few lines: sizes per split and hardware, tasks, hold-out networks."""
    tokens = f", loop tokens {self.loop_token_shape}" if self.loop_token_layout else ""
    lines = [
      f"{self.config_name}: hardware {', '.join(self.hardware)}, {self.platform}, "
      f"features {self.crop}{tokens}, {len(self.tasks)} tasks, seed {self.seed}, "
      f"validation {self.validation_mode}"
    ]
    for name in schema.SPLITS:
      s = self.split(name)
      per_hw = ", ".join(f"{hw} {int(s.mask[:, h].sum())}" for h, hw in enumerate(self.hardware))
      n_tasks = np.unique(np.asarray(s.task_index)).size
      lines.append(f"  {name}: {len(s)} examples, {n_tasks} tasks (measured: {per_hw})")
    for net in self.networks:
      lines.append(
        f"  hold-out {net.label}: {net.task_indices.size} tasks, "
        f"{int(net.weights.sum())} occurrences, "
        f"{len(net.missing_workload_keys)} tasks without records"
      )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def find_dataset_dir(data_dir: str, config_name: str, version: str | None = None) -> str:
  """``DATA_DIR/tenset/CONFIG/VERSION`` (newest version when ``version`` is None)."""
  config_dir = schema.config_dir(data_dir, config_name)
  if not os.path.isdir(config_dir):
    root = os.path.dirname(config_dir)
    have = sorted(os.listdir(root)) if os.path.isdir(root) else []
    raise DatasetNotFoundError(
      f"{config_dir}: no such dataset config; built configs in {root}: {have or 'none'} "
      "(build with python -m data_pipelines.build)"
    )
  if version is None:
    versions = [
      v
      for v in os.listdir(config_dir)
      if os.path.isfile(os.path.join(config_dir, v, schema.DATASET_INFO_FILE))
    ]
    if not versions:
      raise DatasetNotFoundError(f"{config_dir}: no complete version folder")
    version = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
  path = schema.dataset_dir(data_dir, config_name, version)
  if not os.path.isfile(os.path.join(path, schema.DATASET_INFO_FILE)):
    raise DatasetNotFoundError(f"{path}: no {schema.DATASET_INFO_FILE} (incomplete build?)")
  return path


def dataset_fingerprint(ds_dir: str) -> str:
  """Hash of the dataset's info/metadata/skeleton files and of its record files' names, sizes,
  mtimes."""
  h = hashlib.sha256()
  for name in (
    schema.DATASET_INFO_FILE,
    "features.json",
    schema.METADATA_FILE,
    schema.SKELETONS_FILE,
  ):
    path = os.path.join(ds_dir, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        h.update(name.encode() + b"\0" + f.read() + b"\0")
  for split in schema.SPLITS:
    for path in schema.shard_files(ds_dir, split):
      st = os.stat(path)
      # Whole seconds: copies made with tar/rsync keep mtimes only to the second.
      h.update(f"{os.path.basename(path)}:{st.st_size}:{int(st.st_mtime)}\n".encode())
  return h.hexdigest()


def _split_lengths(ds_dir: str) -> dict[str, int]:
  with open(os.path.join(ds_dir, schema.DATASET_INFO_FILE), "rb") as f:
    info = json.load(f)
  return {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info["splits"]}


def _decode_records(records, out: dict[str, np.ndarray], start: int, num_hw: int) -> None:
  """Decodes serialized tf.Examples (TFDS's encoding) into ``out[*][start:start+len]``.

  Field access mirrors how TFDS serialized our FeaturesDict (bytes for ``features``, float
  lists for scores/min_cost, int64 lists for mask/task_index); tests check equality with
  ``tfds.data_source`` reads.
  """
  # TFDS is imported only to (re)make the cache: cached loads need neither it nor protobuf.
  from tensorflow_datasets.proto import tf_example_pb2

  parse = tf_example_pb2.Example.FromString
  arr = schema.ARRAY_NAMES
  tok_name = schema.OPTIONAL_ARRAY_NAMES[schema.LOOP_TOKENS]
  with_tokens = tok_name in out
  feats, scores, mask, task, min_cost, tokens = [], [], [], [], [], []
  for rec in records:
    fm = parse(rec).features.feature
    feats.append(fm[schema.FEATURES].bytes_list.value[0])
    if with_tokens:
      tokens.append(fm[schema.LOOP_TOKENS].bytes_list.value[0])
    scores.extend(fm[schema.SCORE].float_list.value)
    mask.extend(fm[schema.MASK].int64_list.value)
    task.extend(fm[schema.TASK_INDEX].int64_list.value)
    min_cost.extend(fm[schema.MIN_COST].float_list.value)
  n = len(feats)
  end = start + n
  if with_tokens:
    out[tok_name][start:end] = np.frombuffer(b"".join(tokens), schema.LOOP_TOKENS_DTYPE).reshape(
      (n,) + out[tok_name].shape[1:]
    )
  out[arr[schema.FEATURES]][start:end] = np.frombuffer(b"".join(feats), np.float32).reshape(
    (n,) + out[arr[schema.FEATURES]].shape[1:]
  )
  out[arr[schema.SCORE]][start:end] = np.asarray(scores, np.float32).reshape(n, num_hw)
  out[arr[schema.MASK]][start:end] = np.asarray(mask, np.int64).reshape(n, num_hw) != 0
  out[arr[schema.TASK_INDEX]][start:end] = np.asarray(task, np.int64)
  out[arr[schema.MIN_COST]][start:end] = np.asarray(min_cost, np.float32).reshape(n, num_hw)


def _array_names(token_shape) -> tuple[str, ...]:
  """Loader array names of a dataset (``loop_tokens`` only when it has them)."""
  names = tuple(schema.ARRAY_NAMES.values())
  if token_shape is not None:
    names += (schema.OPTIONAL_ARRAY_NAMES[schema.LOOP_TOKENS],)
  return names


def _decode_range(job: tuple) -> int:
  """Worker job of a parallel decode: records ``[begin, end)`` of one shard into rows
  ``pos...`` of the split's ``.npy`` memory maps (opened read-write here; disjoint rows per
  job). Returns the number of records decoded."""
  path, begin, end, pos, npy_paths, num_hw = job
  out = {name: np.load(p, mmap_mode="r+") for name, p in npy_paths.items()}
  decoded = sum(_decode_span(path, begin, end, pos, out, num_hw))
  for arr in out.values():
    arr.flush()
  return decoded


def _decode_span(path: str, begin: int, end: int, pos: int, out, num_hw: int) -> Iterator[int]:
  """Decodes records ``[begin, end)`` of shard ``path`` into rows ``pos...`` of ``out``, in
  batches of ``_DECODE_BATCH``; yields each batch's record count."""
  from array_record.python import array_record_module

  reader = array_record_module.ArrayRecordReader(path)
  try:
    for b in range(begin, end, _DECODE_BATCH):
      recs = reader.read(b, min(b + _DECODE_BATCH, end))
      _decode_records(recs, out, pos + b - begin, num_hw)
      yield len(recs)
  finally:
    reader.close()


def _read_split(
  ds_dir: str,
  split: str,
  num_examples: int,
  crop,
  num_hw: int,
  out_dir: str | None,
  token_shape=None,
  decode_workers: int = 0,
) -> dict[str, np.ndarray]:
  """Reads one split's array_record shards into arrays (``.npy`` memmaps when out_dir).

  ``decode_workers``: processes decoding into the memmaps (``out_dir`` only); 0 = one per core
  when the split has at least ``PARALLEL_DECODE_MIN_EXAMPLES`` examples, else this process.
  The arrays are the same bytes whatever the number."""
  from array_record.python import array_record_module  # only to (re)make the cache, as TFDS

  specs = schema.example_specs(crop, num_hw, token_shape)
  names = dict(schema.ARRAY_NAMES, **schema.OPTIONAL_ARRAY_NAMES)
  shapes = {
    names[field]: ((num_examples,) + shape, dtype) for field, (shape, dtype) in specs.items()
  }
  out = {}
  for name, (shape, dtype) in shapes.items():
    if out_dir is None:
      out[name] = np.empty(shape, dtype)
    else:
      out[name] = np.lib.format.open_memmap(
        os.path.join(out_dir, f"{split}.{name}.npy"), mode="w+", dtype=dtype, shape=shape
      )
  # (shard, first record, end, row of the first record) for every range of every shard.
  jobs, pos = [], 0
  for path in schema.shard_files(ds_dir, split):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      total = reader.num_records()
    finally:
      reader.close()
    if pos + total > num_examples:
      raise ValueError(f"{path}: more records than dataset_info.json lists")
    jobs += [
      (path, b, min(b + _DECODE_CHUNK, total), pos + b) for b in range(0, total, _DECODE_CHUNK)
    ]
    pos += total
  if pos != num_examples:
    raise ValueError(
      f"{ds_dir}: split {split} has {pos} records, dataset_info.json says {num_examples}"
    )
  workers = decode_workers
  if workers == 0:
    workers = (os.cpu_count() or 1) if num_examples >= PARALLEL_DECODE_MIN_EXAMPLES else 1
  workers = min(workers, len(jobs)) if out_dir is not None else 1
  with tqdm.tqdm(
    total=num_examples,
    desc=f"decoding {split}",
    unit=" ex",
    mininterval=2,
    disable=num_examples < PARALLEL_DECODE_MIN_EXAMPLES,
  ) as bar:
    if workers > 1:
      for arr in out.values():
        arr.flush()  # the headers are on disk before the workers open the files
      npy_paths = {name: os.path.join(out_dir, f"{split}.{name}.npy") for name in out}
      # spawn, not fork: the caller may run threads (JAX, TFDS) that fork would copy mid-way.
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        work = [job + (npy_paths, num_hw) for job in jobs]
        for n in pool.imap_unordered(_decode_range, work):
          bar.update(n)
    else:
      for path, begin, end, start in jobs:
        for n in _decode_span(path, begin, end, start, out, num_hw):
          bar.update(n)
  for arr in out.values():
    if isinstance(arr, np.memmap):
      arr.flush()
  return out


def _load_cache(
  cache: str, fingerprint: str, mmap: bool, names: tuple[str, ...]
) -> dict[str, dict] | None:
  try:
    with open(os.path.join(cache, "fingerprint.json"), "rb") as f:
      stamp = json.load(f)
  except (OSError, ValueError):
    return None
  if stamp.get("fingerprint") != fingerprint or stamp.get("format") != CACHE_FORMAT:
    logging.info("%s: stale array cache (dataset changed); rebuilding", cache)
    return None
  try:
    return {
      split: {
        name: np.load(
          os.path.join(cache, f"{split}.{name}.npy"),
          mmap_mode="r" if mmap else None,
          allow_pickle=False,
        )
        for name in names
      }
      for split in schema.SPLITS
    }
  except (OSError, ValueError) as e:
    logging.warning("%s: unreadable array cache (%s); rebuilding", cache, e)
    return None


def _build_arrays(
  ds_dir: str,
  fingerprint: str,
  crop,
  num_hw: int,
  use_cache: bool,
  mmap: bool,
  token_shape=None,
  decode_workers: int = 0,
) -> dict[str, dict]:
  lengths = _split_lengths(ds_dir)
  cache = os.path.join(ds_dir, CACHE_DIR)
  tmp = f"{cache}.tmp-{os.getpid()}"
  if use_cache:
    try:
      shutil.rmtree(tmp, ignore_errors=True)
      os.makedirs(tmp)
    except OSError as e:
      logging.warning("cannot write an array cache next to %s (%s); loading into memory", ds_dir, e)
      use_cache = False
  try:
    arrays = {
      split: _read_split(
        ds_dir,
        split,
        lengths.get(split, 0),
        crop,
        num_hw,
        tmp if use_cache else None,
        token_shape,
        decode_workers,
      )
      for split in schema.SPLITS
    }
    if not use_cache:
      return arrays
    # The fingerprint is what makes the cache valid: written last, whole, on disk.
    stamp = {"format": CACHE_FORMAT, "fingerprint": fingerprint}
    atomic_file.write_atomically(
      os.path.join(tmp, "fingerprint.json"), lambda f: json.dump(stamp, f)
    )
    del arrays  # close the write memmaps before the folder moves
    # A folder cannot be swapped in with one os.replace over a non-empty one: the old cache
    # goes first (a reader meanwhile finds none and decodes).
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
  except BaseException:
    if use_cache:  # no half-written staging folder left next to the dataset
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  loaded = _load_cache(cache, fingerprint, mmap, _array_names(token_shape))
  if loaded is None:
    raise RuntimeError(f"{cache}: cache just written cannot be read back")
  return loaded


def load_arrays(
  data_dir: str,
  config_name: str,
  version: str | None = None,
  use_cache: bool = True,
  mmap: bool = True,
  decode_workers: int = 0,
) -> DatasetArrays:
  """Loads a built config as contiguous arrays (decoding once, then from the ``.npy`` cache).

  Args:
    data_dir: the ``--data_dir`` the dataset was built into.
    config_name: hardware name, or the multi-hardware config (e.g. ``all``).
    version: dataset version; newest if None.
    use_cache: read/write the ``.npy`` cache (False: always decode, write nothing).
    mmap: memory-map the cached arrays (read-only) instead of reading them into memory.
    decode_workers: processes that (re)make the cache (0: one per core for a split of at least
      ``PARALLEL_DECODE_MIN_EXAMPLES`` examples, else this process); the same arrays either way.

  Raises:
    DatasetNotFoundError: nothing built there (the message lists the built configs).
  """
  ds_dir = find_dataset_dir(data_dir, config_name, version)
  with open(os.path.join(ds_dir, schema.METADATA_FILE), "rb") as f:
    meta = json.load(f)
  if meta.get("format") != schema.METADATA_FORMAT:
    raise ValueError(
      f"{ds_dir}: metadata format {meta.get('format')!r}, this loader reads "
      f"{schema.METADATA_FORMAT}; rebuild the dataset"
    )
  fingerprint = dataset_fingerprint(ds_dir)
  hardware = tuple(meta["hardware"])
  crop = tuple(int(c) for c in meta["crop"])
  token_shape = schema.loop_token_shape(meta)
  arrays = (
    _load_cache(os.path.join(ds_dir, CACHE_DIR), fingerprint, mmap, _array_names(token_shape))
    if use_cache
    else None
  )
  if arrays is None:
    arrays = _build_arrays(
      ds_dir, fingerprint, crop, len(hardware), use_cache, mmap, token_shape, decode_workers
    )
  skeletons_path = None
  if token_shape is not None:
    skeletons_path = os.path.join(
      ds_dir, meta[schema.LOOP_TOKENS_META].get("skeletons_file", schema.SKELETONS_FILE)
    )
    if not os.path.isfile(skeletons_path):
      raise ValueError(
        f"{ds_dir}: a loop-token dataset without its {schema.SKELETONS_FILE} "
        "(incomplete copy?); rebuild the dataset"
      )
  t = meta["tasks"]
  nan = float("nan")
  tasks = TaskTable(
    workload_keys=tuple(t["workload_keys"]),
    min_cost=np.array(
      [[nan if v is None else v for v in row] for row in t["min_cost"]], np.float64
    ).reshape(-1, len(hardware)),
    flop_ct=np.array([nan if v is None else v for v in t["flop_ct"]], np.float64),
    num_records=np.asarray(t["num_records"], np.int64).reshape(-1, len(hardware)),
  )
  networks = tuple(
    HoldoutNetwork(
      name=n["name"],
      batch_size=int(n["batch_size"]),
      input_size=int(n["input_size"]),
      label=n["label"],
      task_indices=np.asarray(n["task_indices"], np.int64),
      weights=np.asarray(n["weights"], np.float64),
      missing_workload_keys=tuple(n["missing_workload_keys"]),
    )
    for n in meta["networks"]
  )
  return DatasetArrays(
    config_name=config_name,
    **{split: SplitArrays(**arrays[split]) for split in schema.SPLITS},
    hardware=hardware,
    tasks=tasks,
    networks=networks,
    vocab_json=meta["vocab_json"],
    platform=meta["platform"],
    crop=crop,
    read_stats=meta["read_stats"],
    holdout=tuple(meta["holdout"]),
    seed=int(meta["seed"]),
    metadata=meta,
    fingerprint=fingerprint,
    loop_token_layout=meta.get(schema.LOOP_TOKENS_META) or None,
    skeletons_path=skeletons_path,
    validation_mode=meta.get(schema.VALIDATION_META, "by_record"),
  )
