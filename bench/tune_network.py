r"""Compare cost models tuning one network: ``python -m tlp_jax.tvm.tune`` once per model.

Every variant runs the tune command (``tlp_jax/tvm/tune.py``, where the tuning logic lives) in
its own process with the same network, tasks, trials, measures per round, population and seed;
only the cost model differs. A process that dies inside TVM costs only its own variant, which
keeps the rounds it finished (its ``tune.json`` is rewritten after every round). The variants'
reports are merged into ``bench/results/<out_name>.json`` with the machine described, and their
curves plotted together in ``<out_name>.png``.

Usage::

  python -m bench.tune_network --load_model /tmp/tlp.npz --network mobilenet --size 240 \
      [--batch 1] [--num_tasks 3] [--n_trials 48] [--num_measures_per_round 8] \
      [--population 256] [--seed 0] [--variants tlp-none,tlp-online,xgb,random] \
      [--work_dir DIR] [--out_name tune_mobilenet_240]
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

from bench import common, tune_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("load_model", None, "TLP model of the tlp variants (.npz or pretrained:NAME).")
flags.DEFINE_string("network", "resnet_18", "Network name (tlp_jax.tvm.collect.NETWORKS).")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("size", 224, "Input size.")
flags.DEFINE_string("target", None, "TVM target (default: this CPU).")
flags.DEFINE_integer("num_tasks", 3, "Tune the N heaviest tasks (0 = all).")
flags.DEFINE_integer("n_trials", 48, "Trials per variant.")
flags.DEFINE_integer("num_measures_per_round", 8, "Programs measured per round.")
flags.DEFINE_integer("population", 256, "Evolutionary search population.")
flags.DEFINE_integer("seed", 0, "Seed (the same for every variant).")
flags.DEFINE_integer("e2e_repeat", 3, "End-to-end timing repeats (0 = skip).")
flags.DEFINE_list(
  "variants",
  ["tlp-none", "tlp-online", "xgb", "random"],
  "tlp-none, tlp-online, xgb, random; run in this order.",
)
flags.DEFINE_string("work_dir", None, "Per-variant outputs (default: /tmp/tune_<out_name>).")
flags.DEFINE_string("out_dir", os.path.join(REPO, "bench", "results"), "Where JSON/PNG go.")
flags.DEFINE_string("out_name", None, "Base name (default: tune_<network>_<size>).")
flags.DEFINE_string("note", "", "Free text stored in the JSON (e.g. what the run is not).")
flags.DEFINE_bool(
  "resume",
  True,
  "Keep the variants already done in OUT_DIR/OUT_NAME.json by a run with the same network, "
  "budget and model file, and run only the others (a session can stop between variants).",
)

_VARIANT_FLAGS = {
  "tlp-none": ["--cost_model=tlp", "--update=none"],
  "tlp-online": ["--cost_model=tlp", "--update=online"],
  "xgb": ["--cost_model=xgb"],
  "random": ["--cost_model=random"],
}


def _variant_args(name: str, out: str) -> list[str]:
  if name not in _VARIANT_FLAGS:
    raise app.UsageError(f"unknown variant {name!r}; choose from {sorted(_VARIANT_FLAGS)}")
  args = [
    f"--network={FLAGS.network}",
    f"--batch={FLAGS.batch}",
    f"--size={FLAGS.size}",
    f"--num_tasks={FLAGS.num_tasks}",
    f"--n_trials={FLAGS.n_trials}",
    f"--num_measures_per_round={FLAGS.num_measures_per_round}",
    f"--population={FLAGS.population}",
    f"--seed={FLAGS.seed}",
    f"--e2e_repeat={FLAGS.e2e_repeat}",
    f"--out={out}",
    "--noprogress",
  ] + _VARIANT_FLAGS[name]
  if FLAGS.target:
    args.append(f"--target={FLAGS.target}")
  if name.startswith("tlp"):
    if not FLAGS.load_model:
      raise app.UsageError("--load_model is required for the tlp variants")
    args.append(f"--load_model={FLAGS.load_model}")
  return args


def model_digest(path: str | None) -> str | None:
  """SHA-256 of the TLP model file (``pretrained:NAME`` as given), so that a resumed run only
  keeps variants tuned with the same model."""
  if not path or path.startswith("pretrained:"):
    return path
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def budget() -> dict:
  """What must match for two runs' variants to be comparable."""
  return {
    "num_tasks": FLAGS.num_tasks,
    "n_trials": FLAGS.n_trials,
    "num_measures_per_round": FLAGS.num_measures_per_round,
    "population": FLAGS.population,
    "seed": FLAGS.seed,
  }


def finished_variants(path: str, network: str, run_budget: dict, digest: str | None) -> dict:
  """The variants of an earlier report at ``path`` that finished (status ``done``) with the same
  network, budget and model digest; empty if there is none or it does not match."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  same = (
    old.get("network") == network
    and old.get("budget") == run_budget
    and old.get("tlp_model_sha256") == digest
  )
  if not same:
    logging.warning("%s is from another network, budget or model: not resumed", path)
    return {}
  return {k: v for k, v in old.get("results", {}).items() if v.get("status") == "done"}


def main(argv):
  del argv
  load_at_start = os.getloadavg()
  name = FLAGS.out_name or f"tune_{FLAGS.network}_{FLAGS.size}"
  work = FLAGS.work_dir or os.path.join("/tmp", name)
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
  )
  network = f"{FLAGS.network}:{FLAGS.batch}:{FLAGS.size}"
  digest = model_digest(FLAGS.load_model)
  out_json = os.path.join(FLAGS.out_dir, name + ".json")
  done = finished_variants(out_json, network, budget(), digest) if FLAGS.resume else {}
  # Kept variants stay in the report from the start, so that a rewrite after a later variant
  # never drops them (a session can stop between two variants).
  results = {v: done[v] for v in FLAGS.variants if v in done}
  for variant in results:
    logging.info("%s: done in %s, kept", variant, out_json)
  for variant in FLAGS.variants:
    if variant in done:
      continue
    out = os.path.join(work, variant)
    t0 = time.time()
    proc = subprocess.run(
      [sys.executable, "-m", "tlp_jax.tvm.tune", *_variant_args(variant, out)], env=env, check=False
    )
    path = os.path.join(out, "tune.json")
    result = {"status": "no result", "curve": []}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        result = json.load(f)
    if proc.returncode != 0:
      result["status"] = f"exit code {proc.returncode} after {len(result['curve'])} rounds"
      logging.warning("%s: %s", variant, result["status"])
    result["process_wall_s"] = round(time.time() - t0, 1)
    result["machine"] = common.machine_info(load_average_start=load_at_start)
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    results[variant] = result
    report = {
      "network": network,
      "note": FLAGS.note,
      "budget": budget(),
      "tlp_model": FLAGS.load_model,
      "tlp_model_sha256": digest,
      "results": results,
    }
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    common.write_json(out_json, report)  # after each variant
    load_at_start = os.getloadavg()
  # The same curves as bench.tune_summary's (over the tasks every variant measured), one seed.
  summary = tune_summary.summarise([{"network": network, "budget": budget(), "results": results}])
  tune_summary.plot(summary, os.path.join(FLAGS.out_dir, name + ".png"))
  for variant, r in results.items():
    e2e = r.get("end_to_end") or {}
    print(
      f"{variant:10s} {r.get('status')}: trials {r.get('trials')}, est. "
      f"{r.get('final_estimated_latency_ms')} ms, e2e {e2e.get('latency_ms_mean')} ms, "
      f"predict {r.get('predict_s_per_round_mean')} s/round"
    )


if __name__ == "__main__":
  app.run(main)
