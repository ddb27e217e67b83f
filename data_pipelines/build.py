r"""Builds the TenSet TFDS dataset: one config per hardware plus the multi-hardware join.

  python -m data_pipelines.build --tenset_dir /work/shared/tenset-mini --data_dir ~/tlp_data \
      [--hardware epyc-9004,xeon-emr-16c] [--holdout resnet_50@224,bert_base@128] \
      [--seed 0] [--crop 25,22] [--loop_tokens auto|on|off] [--skeletons PATH] \
      [--validation by_record|by_task] [--workers N]

Features: TLP's step features always, and loop tokens (``--loop_tokens``, default ``auto``:
when the skeleton file exists) made without TVM from the per-task skeletons in ``--skeletons``
(default ``TENSET_DIR/network_info/skeletons.json``, written once with TVM by
``python -m tlp_jax.tvm.skeleton_extract --tenset_dir TENSET_DIR``).

Existing configs of the same name in ``--data_dir`` are rebuilt, all or nothing: the configs
are built into ``DATA_DIR/staging_*`` and swapped in together only when all of them are complete,
so a failed or killed build leaves the previous datasets as they were (the next build removes
what a killed one left; :mod:`data_pipelines.build_dir`). User errors (a missing TenSet dir, bad
flag values) print one line and exit 1. Prints one summary per config
(records read/kept/skipped by reason, loop tokens made/skipped by reason, tasks, examples per
split and hardware) and the build rate. ``--workers`` (default: all cores) processes read,
featurize and replay whole task files, then write the array_record shards, one shard per job
(:mod:`data_pipelines.shard_writer`); the dataset files are the same bytes for any number. A
program measured on several hardware is replayed once: later hardware copy its loop tokens
(:class:`tenset_tfds.RecordStaging`). Read them back with
``data_pipelines.loader.load_arrays(data_dir, config_name)``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from absl import app, flags

from data_pipelines import build_dir, loop_token_source, schema, tenset_tfds
from tlp_jax.core import network_info, skeleton

_TENSET_DIR = flags.DEFINE_string(
  "tenset_dir", None, "TenSet-layout root directory.", required=True
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where to write the TFDS dataset.", required=True)
_HARDWARE = flags.DEFINE_list("hardware", [], "Hardware folders to build (default: all).")
_HOLDOUT = flags.DEFINE_list(
  "holdout",
  [],
  "Hold-out networks NAME[@SIZE] (batch 1). Default: TenSet's five if all "
  "exist in the dataset, else tenset-mini's resnet_50@224,bert_base@128,mobilenet@240.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the 90/10 train/validation split.")
_VALIDATION = flags.DEFINE_enum(
  "validation",
  "by_record",
  list(schema.VALIDATION_MODES),
  "by_record: a seeded 10% of the training records (TLP). by_task: a seeded 10% of the "
  "training tasks, whole (TenSet's task-disjoint split; validation then measures unseen "
  "tasks, as test does).",
)
_LOOP_TOKENS = flags.DEFINE_enum(
  "loop_tokens",
  "auto",
  list(loop_token_source.MODES),
  "Loop tokens (the field loop_tokens, (T, W) float16 per example), replayed without TVM from "
  "the per-task skeletons of --skeletons. auto: when the skeleton file exists; on: required "
  "(a missing file or task is an error naming the extraction command); off: none.",
)
_SKELETONS = flags.DEFINE_string(
  "skeletons",
  None,
  "Skeleton collection JSON (default TENSET_DIR/network_info/"
  "skeletons.json; write it once with python -m tlp_jax.tvm.skeleton_extract "
  "--tenset_dir TENSET_DIR).",
)
_WORKERS = flags.DEFINE_integer(
  "workers",
  os.cpu_count() or 1,
  "Processes reading, featurizing and replaying whole task files, then writing the shards "
  "(default: all cores); the dataset files are the same bytes for any number.",
  lower_bound=1,
)
_CROP = flags.DEFINE_list(
  "crop", [], "Feature crop LENGTH,WIDTH (default: platform's, llvm 25,22 and cuda 40,20 as TLP)."
)
_MULTI = flags.DEFINE_bool("multi", True, "Also build the multi-hardware join config.")


_HELP = "python -m data_pipelines.build --helpshort lists the flags"


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with a flag error as one line (absl prints two, plus FATAL)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e} ({_HELP})")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]} ({_HELP})")
  crop = None
  if _CROP.value:
    if len(_CROP.value) != 2 or not all(c.isdigit() and int(c) > 0 for c in _CROP.value):
      sys.exit(f"error: --crop must be two positive ints LENGTH,WIDTH, got {_CROP.value}")
    crop = (int(_CROP.value[0]), int(_CROP.value[1]))
  start = time.perf_counter()
  try:
    configs = tenset_tfds.make_configs(
      _TENSET_DIR.value,
      hardware=_HARDWARE.value,
      holdout=_HOLDOUT.value,
      seed=_SEED.value,
      crop=crop,
      multi=_MULTI.value,
      loop_tokens=_LOOP_TOKENS.value,
      skeletons=_SKELETONS.value,
      validation=_VALIDATION.value,
    )
    metas = tenset_tfds.build(_TENSET_DIR.value, _DATA_DIR.value, configs, workers=_WORKERS.value)
  except (
    OSError,  # FileNotFoundError of a missing TenSet dir, an unwritable data_dir, ...
    build_dir.BuildDirError,
    network_info.NetworkInfoError,
    skeleton.SkeletonError,
    tenset_tfds.DatasetBuildError,
  ) as e:
    sys.exit(f"error: {e}")
  elapsed = time.perf_counter() - start
  for meta in metas:
    print(tenset_tfds.format_summary(meta))
  # Records read = valid + failed + malformed lines of every hardware built (each read once).
  lines = {hw: st.get("lines", 0) for m in metas for hw, st in m["read_stats"].items()}
  n_lines = sum(lines.values())
  print(
    f"built {len(metas)} configs ({', '.join(m['config'] for m in metas)}) into "
    f"{_DATA_DIR.value} in {elapsed:.1f} s ({n_lines / max(elapsed, 1e-9):.0f} records/s, "
    f"loop tokens {'on' if configs and configs[0].loop_tokens else 'off'}, "
    f"workers {_WORKERS.value})"
  )


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
