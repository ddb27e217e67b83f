r"""Top-k of a TLP cost model on the held-out networks of one hardware.

    python eval.py --hw epyc-9004 --data_dir DATA [--dataset CONFIG] \
        (--workdir WORKDIR | --model model.npz) [--split test] [--out DIR]

Prints the per-network top-1/5/10/20 table with TenSet's mean and TLP's pooled aggregate, next to
the exact random-ranking expectation and the oracle, and writes JSON, Markdown and PNG to --out.
See docs/EVAL.md.
"""

from absl import app, flags, logging

from tlp_jax.evaluation import report as report_lib
from tlp_jax.evaluation import run
from tlp_jax.evaluation.data import EvalError
from tlp_jax.train import runtime

_HW = flags.DEFINE_string(
  "hw",
  None,
  "Hardware to evaluate on (a hardware of the dataset; for an MTL model also the head to use).",
  required=True,
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built dataset directory.", required=True)
_DATASET = flags.DEFINE_string(
  "dataset",
  None,
  "Dataset config name (default: the config named "
  "--hw, else the first built config that has --hw).",
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Training workdir (its --checkpoint is exported in memory)."
)
_MODEL = flags.DEFINE_string("model", None, "Exported model .npz.")
_CHECKPOINT = flags.DEFINE_enum(
  "checkpoint", "best", ["best", "latest"], "Checkpoint of --workdir to evaluate."
)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to evaluate.")
_OUT = flags.DEFINE_string(
  "out", None, "Output folder (default: WORKDIR/eval, or the model file's folder)."
)
_BATCH = flags.DEFINE_integer("batch_size", 4096, "Prediction batch size.")
_WORKERS = flags.DEFINE_integer(
  "workers", 0, "Threads predicting batches at once (0: one per core); the same scores."
)
_KS = flags.DEFINE_list("ks", ["1", "5", "10", "20"], "k values of top-k.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_WORKDIR.value is None) == (_MODEL.value is None):
    raise app.UsageError("give exactly one of --workdir and --model")
  runtime.quiet_backend_probe_logs()  # before JAX starts a backend, as train.py
  try:
    ks = run.parse_ks(_KS.value)
    if _BATCH.value < 1:
      raise EvalError(f"--batch_size must be >= 1, got {_BATCH.value}")
    report = run.evaluate_model(
      hw=_HW.value,
      data_dir=_DATA_DIR.value,
      dataset=_DATASET.value,
      workdir=_WORKDIR.value,
      model_path=_MODEL.value,
      which=_CHECKPOINT.value,
      split=_SPLIT.value,
      ks=ks,
      batch_size=_BATCH.value,
      workers=_WORKERS.value,
    )
    out_dir = report_lib.default_out_dir(_OUT.value, _WORKDIR.value, _MODEL.value)
    paths = report_lib.write_report(report, out_dir)
  except (EvalError, OSError) as e:
    # A user error (unknown hardware, missing head, bad model file, non-finite predictions,
    # unwritable --out, ...): the message says it all. The previous reports stay as they were.
    raise SystemExit(f"eval.py: error: {e}") from None
  print(report_lib.format_report(report))
  logging.info("wrote %s", ", ".join(paths.values()))


if __name__ == "__main__":
  app.run(main)
