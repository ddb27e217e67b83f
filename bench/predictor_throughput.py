"""Throughput of the pure-NumPy predictor: programs/s for predict and for featurization.

Uses real TenSet-format records (default: /work/shared/tenset-mini, one hardware), a
randomly initialised model of the original TLP dimensions exported to the predictor format
(throughput does not depend on the weights' values), and times:

* ``predict``: ``Predictor.predict`` on ``(batch, 25, 22)`` float32 features, batches drawn
  uniformly at random from all records ("mixed") and batches of one task's programs
  ("one task", what a tuner sends);
* ``featurize``: ``Predictor.featurize_steps`` from raw step lists (cold cache = fresh
  featurizer, warm = a featurizer that has seen the steps);
* ``predict_steps``: both together, warm.

Prints a table and writes ``bench/results/predictor_throughput.json`` with machine info.

    python -m bench.predictor_throughput [--records DIR] [--batch 512] [--repeats 10]
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

import numpy as np

from bench import common
from tlp_jax.core import features, records
from tlp_jax.core import predictor as npred

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _machine_info() -> dict:
  info = common.machine_info()
  cfg = np.show_config(mode="dicts") if "mode" in np.show_config.__code__.co_varnames else {}
  blas = cfg.get("Build Dependencies", {}).get("blas", {}) if isinstance(cfg, dict) else {}
  info["blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
  return info


def _sgemm_gflops(repeats: int = 20) -> float:
  """Measured float32 GEMM rate of this machine (the bound on any dense predictor)."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((8192, 256), dtype=np.float32)
  w = rng.standard_normal((256, 256), dtype=np.float32)
  a @ w
  t = time.perf_counter()
  for _ in range(repeats):
    a @ w
  return 2 * 8192 * 256 * 256 * repeats / (time.perf_counter() - t) / 1e9


def _export_random_model(num_heads: int, vocab_json: str) -> npred.Predictor:
  """A randomly initialised model of TLP's dimensions with ``num_heads`` hardware heads."""
  # JAX is only needed to build the parameters; keep it out of the timed process state.
  code = (
    "import sys, jax; from tlp_jax.train import model, export;"
    f"cfg = model.TLPConfig(num_hardware_heads={num_heads});"
    "p = model.init_params(cfg, jax.random.PRNGKey(0));"
    f"export.save_npz(sys.argv[1], p, cfg, hardware=[f'hw{{i}}' for i in range({num_heads})],"
    "platform='llvm', crop=None, vocab_json=sys.stdin.read(), step=0)"
  )
  path = os.path.join("/tmp", f"tlp_bench_model_{os.getpid()}.npz")
  subprocess.run(
    [sys.executable, "-c", code, path],
    input=vocab_json,
    text=True,
    check=True,
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  try:
    return npred.Predictor.load(path)
  finally:
    os.remove(path)


def _load_steps(records_dir: str) -> list[list]:
  tasks = []
  for path in sorted(glob.glob(os.path.join(records_dir, "*.json"))):
    tasks.append([r.steps for r in records.iter_records(path)])
  if not tasks:
    raise SystemExit(f"no record files in {records_dir}")
  return tasks


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", default="/work/shared/tenset-mini/measure_records/epyc-9004")
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--heads", type=int, default=1)
  parser.add_argument(
    "--out", default=os.path.join(REPO, "bench", "results", "predictor_throughput.json")
  )
  args = parser.parse_args()
  load_start = os.getloadavg()[0]

  vocab_json = features.Vocabulary.original("llvm").to_json()
  predictor = _export_random_model(args.heads, vocab_json)
  tasks = _load_steps(args.records)
  all_steps = [s for t in tasks for s in t]
  rng = np.random.default_rng(0)
  feats = predictor.featurize_steps(all_steps)

  b = args.batch
  mixed_idx = [rng.choice(len(all_steps), b, replace=False) for _ in range(args.repeats)]
  big_task = max(tasks, key=len)
  task_feats = predictor.featurize_steps((big_task * (b // len(big_task) + 1))[:b])
  results = {}

  def per_s(seconds, n=b):
    return n / seconds

  i = iter(range(10**9))
  results["predict_mixed"] = per_s(
    common.best_time(
      lambda: predictor.predict(feats[mixed_idx[next(i) % args.repeats]]), args.repeats
    )
  )
  results["predict_one_task"] = per_s(
    common.best_time(lambda: predictor.predict(task_feats), args.repeats)
  )
  all_feats = feats[: (len(feats) // b) * b]
  results["predict_all_records_default_chunks"] = per_s(
    common.best_time(lambda: predictor.predict(all_feats), 2), len(all_feats)
  )
  if args.heads > 1:
    results["predict_mixed_all_heads"] = per_s(
      common.best_time(lambda: predictor.predict(feats[mixed_idx[0]], hw="all"), args.repeats)
    )

  batch_steps = [all_steps[j] for j in mixed_idx[0]]

  def cold():
    predictor._featurizer = None
    predictor.featurize_steps(batch_steps)

  results["featurize_cold"] = per_s(common.best_time(cold, args.repeats))
  predictor.featurize_steps(batch_steps)
  results["featurize_warm"] = per_s(
    common.best_time(lambda: predictor.featurize_steps(batch_steps), args.repeats)
  )
  results["predict_steps_warm"] = per_s(
    common.best_time(lambda: predictor.predict_steps(batch_steps), args.repeats)
  )

  valid = np.any(feats != 0, axis=-1)
  # Measured after the predictor timings so both see similar machine load.
  flops_per_program = _model_flops(predictor)
  gflops = _sgemm_gflops()
  machine = _machine_info()
  machine["loadavg_1m_start"] = load_start
  machine["loadavg_1m_end"] = os.getloadavg()[0]
  report = {
    "machine": machine,
    "sgemm_gflops_measured": gflops,
    "model": {
      "heads": args.heads,
      "config": predictor.config,
      "dense_mflop_per_program": flops_per_program / 1e6,
      "dense_bound_programs_per_s": gflops * 1e9 / flops_per_program,
    },
    "data": {
      "records_dir": args.records,
      "programs": len(all_steps),
      "mean_real_steps": float(valid.sum(1).mean()),
    },
    "batch": b,
    "repeats": args.repeats,
    "timing": "best of repeats",
    "note": (
      "the 2 cores are shared with other jobs; compare programs/s with the "
      "sgemm rate measured in the same run (dense_bound_programs_per_s)"
    ),
    "programs_per_s": results,
  }
  common.write_json(args.out, report, announce=False)
  print(
    f"sgemm {gflops:.0f} GFLOP/s; dense model {flops_per_program / 1e6:.1f} MFLOP/program "
    f"-> dense bound {report['model']['dense_bound_programs_per_s']:.0f} programs/s"
  )
  for k, v in results.items():
    print(f"{k:34s} {v:12.0f} programs/s")
  print(f"wrote {args.out}")


def _model_flops(predictor: npred.Predictor) -> float:
  """FLOPs of a plain dense forward of one program (every row, every layer)."""
  cfg = predictor.config
  dims = [cfg["feature_dim"], *cfg["encoder_dims"]]
  per_row = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
  d = cfg["encoder_dims"][-1]
  per_row += 4 * d * d + cfg["res_blocks"] * d * d
  dec = [d, *cfg["decoder_dims"]]
  per_row += sum(a * b for a, b in zip(dec[:-1], dec[1:]))
  seq = cfg["seq_len"]
  return 2.0 * (seq * per_row + 2 * seq * seq * d)


if __name__ == "__main__":
  main()
