r"""Builds the TenSet TFDS dataset: one config per hardware plus the multi-hardware join.

  python -m data_pipelines.build --tenset_dir /work/shared/tenset-mini --data_dir ~/tlp_data \
      [--hardware epyc-9004,xeon-emr-16c] [--holdout resnet_50@224,bert_base@128] \
      [--seed 0] [--crop 25,22] [--loop_stores 10]

Existing configs of the same name in ``--data_dir`` are rebuilt. Prints one summary per config
(records read/kept/skipped by reason, tasks, examples per split and hardware). Read them back
with ``data_pipelines.loader.load_arrays(data_dir, config_name)``.
"""
from __future__ import annotations

import sys
import time
from typing import Sequence

from absl import app
from absl import flags

from data_pipelines import tenset_tfds
from tlp_jax.core import network_info

_TENSET_DIR = flags.DEFINE_string("tenset_dir", None, "TenSet-layout root directory.",
                                  required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where to write the TFDS dataset.",
                                required=True)
_HARDWARE = flags.DEFINE_list("hardware", [], "Hardware folders to build (default: all).")
_HOLDOUT = flags.DEFINE_list(
    "holdout", [], "Hold-out networks NAME[@SIZE] (batch 1). Default: TenSet's five if all "
    "exist in the dataset, else tenset-mini's resnet_50@224,bert_base@128,mobilenet@240.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the 90/10 train/validation split.")
_CROP = flags.DEFINE_list("crop", [], "Feature crop LENGTH,WIDTH (default: platform's, "
                          "llvm 25,22 and cuda 40,20 as TLP).")
_LOOP_STORES = flags.DEFINE_integer(
    "loop_stores", 0, "0: TLP's step features only. N > 0: the 'loop' feature version, each "
    "program's first N loop-nest store vectors (Ansor's per-store features, computed with TVM "
    "from network_info/all_tasks.pkl) appended as extra tokens; needs pip install -e '.[tvm]'.")
_MULTI = flags.DEFINE_bool("multi", True, "Also build the multi-hardware join config.")


def tvm_store_features(tenset_dir: str) -> tenset_tfds.StoreFeatures:
  """TVM's loop-nest store vectors of records, for the "loop" feature version (--loop_stores).

  Registers every workload of ``network_info/all_tasks.pkl`` so TVM can replay the records.

  Raises:
    ImportError: TVM is not installed.
    FileNotFoundError: the TenSet dir has no ``all_tasks.pkl``.
  """
  # TVM is an optional extra that only the "loop" feature version needs.
  from tlp_jax.tvm import loop_features
  from tlp_jax.tvm import search_tasks
  search_tasks.register_tenset_tasks(tenset_dir)
  return tenset_tfds.StoreFeatures(dim=loop_features.feature_dim(),
                                   of_lines=loop_features.store_features_from_lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  crop = None
  if _CROP.value:
    if len(_CROP.value) != 2 or not all(c.isdigit() and int(c) > 0 for c in _CROP.value):
      raise app.UsageError(f"--crop must be two positive ints LENGTH,WIDTH, got {_CROP.value}")
    crop = (int(_CROP.value[0]), int(_CROP.value[1]))
  start = time.perf_counter()
  try:
    configs = tenset_tfds.make_configs(_TENSET_DIR.value, hardware=_HARDWARE.value,
                                       holdout=_HOLDOUT.value, seed=_SEED.value, crop=crop,
                                       multi=_MULTI.value, loop_stores=_LOOP_STORES.value)
    store_features = (tvm_store_features(_TENSET_DIR.value) if _LOOP_STORES.value > 0
                      else None)
    metas = tenset_tfds.build(_TENSET_DIR.value, _DATA_DIR.value, configs,
                              store_features=store_features)
  except (FileNotFoundError, ImportError, network_info.NetworkInfoError,
          tenset_tfds.DatasetBuildError) as e:
    sys.exit(f"error: {e}")
  elapsed = time.perf_counter() - start
  for meta in metas:
    print(tenset_tfds.format_summary(meta))
  print(f"built {len(metas)} configs ({', '.join(m['config'] for m in metas)}) into "
        f"{_DATA_DIR.value} in {elapsed:.1f} s")


if __name__ == "__main__":
  app.run(main)
