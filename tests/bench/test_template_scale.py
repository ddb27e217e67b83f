"""bench.template_scale's per-task measurement on the sample's records (no TVM: the committed
skeletons; the sampling itself needs TVM and is not run here)."""

import glob
import json
import os

from bench import template_scale
from tlp_jax.core import replay_cache as rc
from tlp_jax.core import skeleton as sk


def test_measure_counts_templates_and_checks_both_paths(sample_tenset_dir):
  skeletons = sk.load_collection(sk.tenset_skeletons_path(sample_tenset_dir))
  files = sorted(glob.glob(os.path.join(sample_tenset_dir, "measure_records", "epyc-9004", "*")))
  path = max(files, key=os.path.getsize)
  with open(path, "rb") as f:
    lines = f.readlines()
  row = template_scale.measure(path, skeletons)
  sigs = {rc.signature(json.loads(ln)["i"][1][1])[0] for ln in lines}
  assert row["programs"] == len(lines)
  assert row["templates"] == len(sigs)
  assert row["same_tokens"] is True
  stats = row["template_cache"]
  assert stats["hits"] + stats["full"] + stats["traced"] == len(lines)
  assert row["full_programs_per_s_cpu"] > 0 and row["templates_programs_per_s_cpu"] > 0
