"""bench.dataset_build's parallel-build measures: the output digest and the RSS sampler."""

import subprocess
import sys

from bench import dataset_build


def test_digest_is_stable_and_tells_datasets_apart(built_sample_dataset):
  xeon = dataset_build._digest(built_sample_dataset, ["xeon-emr-16c"])
  assert xeon == dataset_build._digest(built_sample_dataset, ["xeon-emr-16c"])
  assert xeon != dataset_build._digest(built_sample_dataset, ["epyc-9004"])
  both = dataset_build._digest(built_sample_dataset, ["xeon-emr-16c", "epyc-9004"])
  assert both not in (xeon, dataset_build._digest(built_sample_dataset, ["epyc-9004"]))


def test_rss_sampler_counts_child_processes():
  code = "import time; x = bytearray(80_000_000); x[::4096] = b'1' * len(x[::4096]); time.sleep(1)"
  with dataset_build._RssSampler(period_s=0.05) as rss:
    subprocess.run([sys.executable, "-c", code], check=True)
  assert rss.peak_processes >= 2
  assert rss.peak_total >= rss.peak_main + 70_000_000


def test_files_digest_covers_every_byte_of_every_file(tmp_path, built_sample_dataset):
  import glob
  import shutil

  copy = str(tmp_path / "copy")
  shutil.copytree(built_sample_dataset, copy)
  digest = dataset_build._files_digest(copy)
  assert digest == dataset_build._files_digest(built_sample_dataset)
  shard = sorted(glob.glob(f"{copy}/tenset/xeon-emr-16c/*/tenset-test.array_record-*"))[-1]
  with open(shard, "r+b") as f:
    f.seek(-1, 2)
    last = f.read(1)
    f.seek(-1, 2)
    f.write(bytes([last[0] ^ 1]))
  flipped = dataset_build._files_digest(copy)
  assert flipped != digest
  # A renamed file (same bytes) is another dataset too.
  info = glob.glob(f"{copy}/tenset/epyc-9004/*/metadata.json")[0]
  shutil.move(info, info + ".x")
  assert dataset_build._files_digest(copy) != flipped
