#!/usr/bin/env bash
# Parallel dataset build sweep on the GPU machine (16 cores): records/s, staging vs shard-writing
# seconds, peak RSS (main + all children) and the same-output digests at 1, 2, 4, 8, 16 workers
# on a SYNTHETIC TenSet-layout dir generated there (bench.make_tenset_scale), JSON under $OUT.
#
# The device image has no tensorflow_datasets, array_record, orjson (nor TFDS's small pure-Python
# needs); they travel as wheels (9.5 MiB, not committed; .whl_build/ is git-ignored):
#
#   1. here, once, in the repo root (needs the package registry and a python with pip):
#        PYTHON=/work/venv/bin/python bash bench/device_build_sweep.sh --download
#      fills .whl_build/ with exactly these (--no-deps; the rest of what the build imports,
#      numpy, absl-py, etils, tqdm, wrapt, six, pillow, typing_extensions, psutil, is on the image):
#        tensorflow-datasets==4.9.10 array-record==0.8.6 (cp312) orjson==3.13.0 (cp312)
#        immutabledict==4.3.1 toml==0.10.2 tensorflow-metadata==1.21.0 importlib-resources==7.1.0
#        (etils's epath imports it when TFDS builds) promise==2.3 (built here from its sdist, pure
#        Python) protobuf==7.36.2 (TFDS's generated code needs >= 6.31.1; the image's version is
#        unknown, so ours goes first on PYTHONPATH, for these processes only)
#      Checked here: a fresh venv with only numpy absl-py tqdm etils wrapt six pillow
#      typing_extensions psutil fsspec zipp, plus these wheels (cp311 builds of the two compiled
#      ones), ran this script end to end (RECORDS=8000 WORKERS=1,2).
#   2. on the device machine (the run tool, carry [".whl_build"]):
#        bash bench/device_build_sweep.sh
#      which installs them with
#        python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl_build/*.whl
#        export PYTHONPATH=/tmp/site:$PWD
#
# Size (RECORDS=200000 in TASKS=106 tasks, ~1,900 records per task: each of the 106 tasks of
# the embedded sample's source hardware, epyc-9004, copied once, so the hold-out is whole;
# SHARD_SIZE=6000: ~33 shards, ~2 per worker at 16 workers, as TenSet's 200,000-example shards
# give one 8.6M-record platform ~43): estimated from ~1,500 records/s per core staging (read +
# featurize + replay; ~2,000 measured here) and ~15,000 examples/s per worker writing (measured
# here, bench/README.md), one worker's build takes ~150 s and the sweep 1, 2, 4, 8, 16 ~1.94 x
# that = ~290 s, plus ~15 s per run of start-up and digests and ~10 s generating: ~6-7 min,
# under 9 (the run tool stops a command at 10). RECORDS, TASKS, SHARD_SIZE, WORKERS, SOURCE,
# SCRATCH, WHEEL_DIR and SITE can be set in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(tensorflow-datasets==4.9.10 array-record==0.8.6 orjson==3.13.0 immutabledict==4.3.1
  toml==0.10.2 tensorflow-metadata==1.21.0 protobuf==7.36.2 importlib-resources==7.1.0)

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p .whl_build
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl_build "${WHEELS[@]}"
  # No wheel on the registry: build the pure-Python one from its sdist.
  "${PYTHON:-python3}" -m pip wheel -q --no-deps promise==2.3 -w .whl_build
  ls -l .whl_build
  du -sh .whl_build
  exit 0
fi

: "${OUT:?set OUT to the folder for the results}"
RECORDS=${RECORDS:-200000}
TASKS=${TASKS:-106}
SHARD_SIZE=${SHARD_SIZE:-6000}
WORKERS=${WORKERS:-1,2,4,8,16}
SOURCE=${SOURCE:-data/sample/tenset-mini}
SCRATCH=${SCRATCH:-/tmp/tenset_scale}
WHEEL_DIR=${WHEEL_DIR:-.whl_build}
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1

if ! python3 -c 'import tensorflow_datasets, array_record' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    "$WHEEL_DIR"/*.whl
  export PYTHONPATH=$SITE:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
python3 -c 'import tensorflow_datasets, array_record, orjson; print("tfds", tensorflow_datasets.__version__)'
nproc

mkdir -p "$OUT"
{
  python3 -m bench.make_tenset_scale --source "$SOURCE" --out_dir "$SCRATCH" \
    --records "$RECORDS" --tasks "$TASKS" --workers "$(nproc)"
  python3 -m bench.dataset_build --tenset_dir "$SCRATCH" --workers_runs "$WORKERS" \
    --shard_size "$SHARD_SIZE" --out "$OUT/dataset_build_sweep.json"
} 2>&1 | tee "$OUT/device_build_sweep.log"
