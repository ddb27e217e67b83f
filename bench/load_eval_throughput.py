"""The two per-record stages around training, in one process and in several: decoding a built
dataset into its array cache (``loader.load_arrays(decode_workers=N)``) and eval's prediction of
a split with the NumPy predictor (``topk.predict_in_batches(workers=N)``).

Each worker count is timed on the same dataset and model, and the outputs are compared with the
one-process ones (they must be the same bytes). Prints a table and writes a JSON with the
machine it ran on.

    python -m bench.load_eval_throughput --data_dir DIR --dataset CONFIG --model MODEL.npz \\
        --workers 1,2 --out bench/results/load_eval_throughput_HOST.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

from bench import common
from data_pipelines import loader
from tlp_jax.core import predictor as npred
from tlp_jax.evaluation import topk
from tlp_jax.evaluation.data import eval_data


def _decode(data_dir: str, dataset: str, workers: int) -> tuple[float, loader.DatasetArrays]:
  """Seconds to (re)make the array cache with ``workers`` processes, and the arrays."""
  cache = os.path.join(loader.find_dataset_dir(data_dir, dataset), loader.CACHE_DIR)
  shutil.rmtree(cache, ignore_errors=True)
  t0 = time.perf_counter()
  arrays = loader.load_arrays(data_dir, dataset, decode_workers=workers)
  return time.perf_counter() - t0, arrays


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True, help="a built dataset (data_pipelines.build)")
  parser.add_argument("--dataset", required=True, help="its config (a hardware name)")
  parser.add_argument("--model", required=True, help="an exported .npz of that platform")
  parser.add_argument("--split", default="test")
  parser.add_argument("--workers", default="1,2", help="worker counts, 1 first")
  parser.add_argument("--batch_size", type=int, default=4096)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  common.log_to_stderr()
  counts = [int(w) for w in args.workers.split(",")]
  if counts[0] != 1:
    raise SystemExit("--workers must start with 1 (the reference)")

  rows, ref_arrays, ref_pred = [], None, None
  predictor = npred.Predictor.load(args.model)
  for w in counts:
    decode_s, arrays = _decode(args.data_dir, args.dataset, w)
    examples = sum(len(arrays.split(s)) for s in ("train", "validation", "test"))
    data = eval_data(arrays, arrays.hardware[0], args.split)
    # The model's first head on the dataset's hardware (a synthetic copy's name differs).
    if predictor.reads_loop_tokens:
      tokens = data.split_loop_tokens

      def predict(x, t):
        return predictor.predict(x, loop_tokens=t)
    else:
      tokens, predict = None, predictor.predict
    t0 = time.perf_counter()
    pred = topk.predict_in_batches(
      predict, data.split_features, data.rows, args.batch_size, loop_tokens=tokens, workers=w
    )
    predict_s = time.perf_counter() - t0
    same_arrays = same_pred = True
    if ref_arrays is None:
      ref_arrays, ref_pred = arrays, pred
    else:
      same_pred = bool(np.array_equal(pred, ref_pred))
      for s in ("train", "validation", "test"):
        a, b = arrays.split(s), ref_arrays.split(s)
        for name in ("features", "scores", "mask", "task_index", "min_cost", "loop_tokens"):
          x, y = getattr(a, name, None), getattr(b, name, None)
          same_arrays &= (x is None and y is None) or bool(np.array_equal(x, y))
    rows.append(
      {
        "workers": w,
        "examples": examples,
        "decode_s": decode_s,
        "decode_examples_per_s": examples / decode_s,
        "predicted": int(len(pred)),
        "predict_s": predict_s,
        "predict_programs_per_s": len(pred) / predict_s,
        "same_arrays_as_1": same_arrays,
        "same_scores_as_1": same_pred,
      }
    )
  print(
    common.markdown_table(
      ["workers", "decode ex/s", "predict programs/s", "same arrays", "same scores"],
      [
        [
          r["workers"],
          f"{r['decode_examples_per_s']:,.0f}",
          f"{r['predict_programs_per_s']:,.0f}",
          r["same_arrays_as_1"],
          r["same_scores_as_1"],
        ]
        for r in rows
      ],
    )
  )
  common.write_json(
    args.out,
    {
      "machine": common.machine_info(),
      "args": vars(args),
      "model": os.path.basename(args.model),
      "results": rows,
    },
  )


if __name__ == "__main__":
  main()
