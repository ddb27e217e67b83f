r"""Training-step throughput on one GPU: the trainer's step (JAX) vs the PyTorch TLP reference.

Measures samples/s of the whole training step -- forward, LambdaRank over the batch, backward,
clip + Adam update -- for

* JAX: ``tlp_jax.train.step.train_step_resident`` under ``pmap``, built exactly as
  ``tlp_jax.train.loop.train_and_evaluate`` builds it (same partial, axis name, donation), fed from
  device-resident arrays with the epoch order drawn on the device; host loop and metric fetch
  every 50 steps as the trainer does. ``jax_scan16`` runs 16 of the same steps per dispatch
  (``lax.scan`` inside the ``pmap``), a proposed trainer change;
* PyTorch (``bench/torch_tlp_reference.py``): eager as the original loop (``loss.item()`` and
  the boolean pair selection each step), eager without the per-step syncs, and ``torch.compile``;

at batch 1024 (TLP's), 4096 and 16384, in float32 (no TF32), TF32 and bfloat16. Also measured in
the same process: the device's bf16 / TF32 / fp32 matmul rate and copy bandwidth (the ceilings),
and loss curves of a few hundred steps on the real tenset-mini training arrays (JAX f32 / TF32 /
bf16 and the PyTorch reference from the same initial weights) with validation loss and top-k.

Throughput runs use ``--synthetic_rows`` rows drawn with replacement from the real training
arrays (the real set has only ~8k rows, less than one batch of 16384).

Prepare the arrays here (no TFDS on the GPU machine), then run there:

    python -m bench.train_throughput --prepare_arrays=.carry/F_arrays \
        --data_dir=/tmp/tfds --dataset=epyc-9004
    python -m bench.train_throughput --arrays_dir=.carry/F_arrays --out_dir=bench/results

Writes ``<out_dir>/<device>.json`` (after every variant, so a run cut short keeps what it
measured) and prints a table. ``--smoke`` runs tiny sizes (CPU, seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# JAX and PyTorch share the GPU in this process: JAX must not grab 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import (
  app,  # noqa: E402  (the environment above must be set before JAX)
  flags,  # noqa: E402
  logging,  # noqa: E402
)

from bench import common, kernel_profile  # noqa: E402
from configs import default as default_config  # noqa: E402
from configs import tlp_original  # noqa: E402
from data_pipelines import loader  # noqa: E402

# The trainer's step API, used as the trainer's loop uses it: this benchmark times that step.
from tlp_jax.train import config as config_lib  # noqa: E402
from tlp_jax.train import data as train_data  # noqa: E402
from tlp_jax.train import (
  loop,  # noqa: E402
  optimizer,  # noqa: E402
)
from tlp_jax.train import losses as losses_lib  # noqa: E402
from tlp_jax.train import model as model_lib  # noqa: E402
from tlp_jax.train import step as step_lib  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PREPARE = flags.DEFINE_string(
  "prepare_arrays",
  None,
  "Write the train/validation arrays of --data_dir/--dataset as .npy into this folder and exit.",
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Built dataset dir (for --prepare_arrays).")
_DATASET = flags.DEFINE_string("dataset", "epyc-9004", "Dataset config (one hardware).")
_ARRAYS = flags.DEFINE_string("arrays_dir", None, "Folder written by --prepare_arrays.")
_OUT_DIR = flags.DEFINE_string(
  "out_dir", os.path.join(_REPO, "bench", "results"), "Where <device>.json goes."
)
_BATCHES = flags.DEFINE_list("batches", ["1024", "4096", "16384"], "Global batch sizes.")
_PRECISIONS = flags.DEFINE_list("precisions", ["bf16", "tf32", "float32"], "Precisions.")
_SECTIONS = flags.DEFINE_list(
  "sections",
  [
    "ceilings",
    "jax",
    "torch_eager",
    "curves",
    "jax_big",
    "scan",
    "torch_big",
    "torch_compile",
    "extras",
  ],
  "Sections, run in this order.",
)
_TORCH_COMPILE = flags.DEFINE_list(
  "torch_compile_runs",
  ["tf32:1024", "bf16:1024", "bf16:16384"],
  "precision:batch pairs for torch.compile.",
)
_TORCH_EAGER = flags.DEFINE_list(
  "torch_eager_runs", [], "precision:batch pairs of the torch_extra section (eager, original loop)."
)
_CURVE_PRECISIONS = flags.DEFINE_list(
  "curve_precisions", None, "Precisions of the JAX loss curves (default --precisions)."
)
_CURVE_SEEDS = flags.DEFINE_list(
  "curve_seed_offsets", ["0"], "Seed offsets of the JAX curves (>0: a seed-noise reference)."
)
_TORCH_CURVE = flags.DEFINE_bool("torch_curve", True, "Also the PyTorch reference curve.")
_TAG = flags.DEFINE_string("tag", "", "Suffix of the JSON file name (several runs per device).")
_ROWS = flags.DEFINE_integer("synthetic_rows", 1 << 18, "Rows of the throughput arrays.")
_MIN_TIME = flags.DEFINE_float("min_time_s", 1.0, "Timed seconds per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats per variant (median kept).")
_CURVE_STEPS = flags.DEFINE_integer("curve_steps", 300, "Steps of each loss curve.")
_BUDGET = flags.DEFINE_float(
  "time_budget_s", 420.0, "Skip (and record as skipped) variants that would end later."
)
_MATMUL_N = flags.DEFINE_integer("matmul_n", 8192, "Size of the ceiling matmuls.")
_COPY_MB = flags.DEFINE_integer("copy_mb", 1024, "Size of the ceiling copy (MiB).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the init, data draw and order.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny sizes for a CPU check.")
_RECIPE_DATA = flags.DEFINE_string(
  "recipe_data_dir",
  None,
  "Built dataset (with loop tokens; its arrays_cache is enough) for the default_* sections.",
)
_RECIPE_ROWS = flags.DEFINE_integer(
  "recipe_rows", 8_600_000, "Device-resident rows of the default_recipe section (tiled)."
)
_RECIPE_TASK_COPIES = flags.DEFINE_list(
  "recipe_task_copies",
  ["1", "80"],
  "Tiled copies of a real task merged into one synthetic task: 1 = tenset-mini's task sizes "
  "(~48 programs), 80 = TenSet's (~3,800).",
)
_RECIPE_VARIANTS = flags.DEFINE_list(
  "recipe_variants",
  None,
  "Variants of the default_recipe section (names of RECIPE_VARIANTS; default all).",
)
_RECIPE_RUNS = flags.DEFINE_list(
  "recipe_accuracy_runs",
  ["tf32", "bf16", "tf32_b4096", "bf16_b4096"],
  "Runs of the default_accuracy section (names of RECIPE_ACCURACY_RUNS).",
)
_RECIPE_SEEDS = flags.DEFINE_list("recipe_seeds", ["0", "1"], "Seeds of default_accuracy.")
_RECIPE_EPOCHS = flags.DEFINE_integer("recipe_epochs", 50, "Epochs of default_accuracy runs.")
_PROFILE_STEPS = flags.DEFINE_integer(
  "profile_steps",
  0,
  "After timing a default_recipe variant, trace this many steps with the JAX profiler and store "
  "device time per op and per kernel (bench/kernel_profile.py) in its entry. 0 = off.",
)

LOG_EVERY = 50  # train_and_evaluate's default log_every_steps: a metric fetch (sync) that often
SCAN_K = 16
SPLIT_FIELDS = ("features", "scores", "mask", "task_index")


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------


def prepare_arrays(data_dir: str, dataset: str, out: str) -> None:
  """Saves train/validation arrays of a built config as .npy (allow_pickle-free) into ``out``."""
  ds = loader.load_arrays(data_dir, dataset)
  os.makedirs(out, exist_ok=True)
  for split in ("train", "validation"):
    arrays = ds.split(split)
    for field in SPLIT_FIELDS:
      np.save(os.path.join(out, f"{split}_{field}.npy"), np.asarray(getattr(arrays, field)))
  with open(os.path.join(out, "meta.json"), "w") as f:
    json.dump(
      {
        "data_dir": data_dir,
        "dataset": dataset,
        "hardware": [str(h) for h in ds.hardware],
        "train": len(ds.train),
        "validation": len(ds.validation),
      },
      f,
      indent=1,
    )
  logging.info(
    "wrote %s: train %d, validation %d rows, hardware %s",
    out,
    len(ds.train),
    len(ds.validation),
    list(ds.hardware),
  )


def load_split(arrays_dir: str, split: str):
  """``tlp_jax.train.data.HeadArrays`` of the saved arrays (every hardware column)."""
  a = {
    f: np.load(os.path.join(arrays_dir, f"{split}_{f}.npy"), allow_pickle=False)
    for f in SPLIT_FIELDS
  }
  for f in SPLIT_FIELDS[1:]:
    if a[f].shape[0] != a["features"].shape[0]:
      raise ValueError(
        f"{arrays_dir}/{split}_{f}.npy: {a[f].shape[0]} rows, features have "
        f"{a['features'].shape[0]}"
      )
  return train_data.HeadArrays(
    features=a["features"].astype(np.float32),
    scores=a["scores"].astype(np.float32),
    mask=a["mask"].astype(bool),
    task_index=a["task_index"].astype(np.int32),
  )


def smoke_split(rows: int, seed: int):
  """Random stand-in arrays of the real shapes (for --smoke without --arrays_dir)."""
  rng = np.random.default_rng(seed)
  return train_data.HeadArrays(
    features=rng.normal(size=(rows, 25, 22)).astype(np.float32),
    scores=rng.random((rows, 1)).astype(np.float32),
    mask=np.ones((rows, 1), bool),
    task_index=rng.integers(0, 50, rows).astype(np.int32),
  )


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


def train_flops_per_sample(cfg) -> dict[str, float]:
  """Matmul FLOPs of one sample's forward and forward+backward for a ``TLPConfig``.

  Dense layers run per step (L of them): ``2 * fan_in * width`` FLOPs forward; the backward
  needs the input gradient (same count, none for the first layer whose input is data) and the
  weight gradient (same count). Attention adds ``QK^T`` and ``PV``: ``2 * 2 * L^2 * D`` forward,
  twice that backward. Elementwise work (bias, ReLU, softmax, loss, Adam) is not counted.
  """
  length, d = cfg.seq_len, cfg.hidden_dim
  dense = []
  fan_in = cfg.feature_dim
  for w in cfg.encoder_dims:
    dense.append(fan_in * w)
    fan_in = w
  dense += [d * d] * 4  # q, k, v, out projections
  dense += [d * d] * cfg.res_blocks
  fan_in = d
  for w in cfg.decoder_dims:
    dense.append(fan_in * w * cfg.num_hardware_heads)
    fan_in = w
  fwd_dense = 2.0 * length * sum(dense)
  fwd_attn = 2.0 * 2 * length * length * d
  fwd = fwd_dense + fwd_attn
  first = 2.0 * length * dense[0]
  bwd = 2.0 * fwd_dense - first + 2.0 * fwd_attn
  return {"forward": fwd, "train": fwd + bwd}


def param_count(cfg) -> int:
  """Parameters of a ``TLPConfig`` model (weights + biases)."""
  n, fan_in = 0, cfg.feature_dim
  for w in cfg.encoder_dims:
    n += fan_in * w + w
    fan_in = w
  d = cfg.hidden_dim
  n += 4 * (d * d + d) + cfg.res_blocks * (d * d + d)
  fan_in = d
  for w in cfg.decoder_dims:
    n += cfg.num_hardware_heads * (fan_in * w + w)
    fan_in = w
  return n


# ---------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------


class Budget:
  """Wall-clock budget of the run: variants that would end past it are recorded as skipped."""

  def __init__(self, seconds: float):
    self.start = time.time()
    self.seconds = seconds

  def left(self) -> float:
    return self.seconds - (time.time() - self.start)

  def allows(self, estimate_s: float) -> bool:
    return self.left() >= estimate_s


class Report:
  """The JSON report, rewritten after every variant."""

  def __init__(self, path: str, header: dict[str, Any]):
    self.path = path
    self.data: dict[str, Any] = dict(header)
    self.data.setdefault("variants", [])

  def add(self, entry: dict[str, Any]) -> None:
    self.data["variants"].append(entry)
    self.write()

  def set(self, key: str, value: Any) -> None:
    self.data[key] = value
    self.write()

  def write(self) -> None:
    common.write_json(self.path, self.data, announce=False)


def time_loop(run: Callable[[int], None], min_time: float, repeats: int) -> dict[str, Any]:
  """Median seconds per step of ``run(n)`` (runs n steps and blocks), after a warm-up."""
  t0 = time.perf_counter()
  run(2)  # compile + first steps
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  run(3)
  per = (time.perf_counter() - t0) / 3
  n = max(3, int(math.ceil(min_time / max(per, 1e-6))))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run(n)
    times.append((time.perf_counter() - t0) / n)
  return {
    "step_s": statistics.median(times),
    "step_s_all": times,
    "steps_per_repeat": n,
    "warmup_s": first,
  }


# ---------------------------------------------------------------------------------------------
# Device ceilings
# ---------------------------------------------------------------------------------------------


def measure_ceilings(matmul_n: int, copy_mb: int) -> dict[str, Any]:
  """bf16 / TF32 / fp32 matmul TFLOP/s (random data) and copy GB/s (read + write) via JAX."""

  def bench(fn, *args, reps=10):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

  out: dict[str, Any] = {}
  key = jax.random.PRNGKey(1)
  ka, kb = jax.random.split(key)
  n = matmul_n
  a32 = jax.random.normal(ka, (n, n), jnp.float32)
  b32 = jax.random.normal(kb, (n, n), jnp.float32)
  for name, dtype, prec in (
    ("bf16", jnp.bfloat16, "default"),
    ("tf32", jnp.float32, "tensorfloat32"),
    ("float32", jnp.float32, "highest"),
  ):
    a, b = a32.astype(dtype), b32.astype(dtype)
    f = jax.jit(functools.partial(jnp.matmul, precision=prec))
    t = bench(f, a, b)
    out[f"matmul_{name}_tflops"] = 2.0 * n**3 / t / 1e12
  # What a plain float32 matmul gives under the default precision (TF32 or not): its error
  # against HIGHEST, next to TF32's.
  m = min(n, 2048)
  x, y = a32[:m, :m], b32[:m, :m]
  exact = jnp.matmul(x, y, precision="highest")
  for name, prec in (("default", None), ("tf32", "tensorfloat32")):
    got = jnp.matmul(x, y, precision=prec)
    out[f"f32_matmul_{name}_precision_rel_err"] = float(
      jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)
    )
  elems = copy_mb * (1 << 20) // 4
  src = jax.random.normal(key, (elems,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0001)
  t = bench(copy, src, reps=20)
  out["copy_gbps"] = 2.0 * elems * 4 / t / 1e9
  out["copy_bytes"] = elems * 4
  del a32, b32, src
  return out


# ---------------------------------------------------------------------------------------------
# JAX: the trainer's step
# ---------------------------------------------------------------------------------------------

PRECISION_JAX = {  # name -> (model dtype, jax default_matmul_precision)
  "float32": ("float32", "highest"),
  "tf32": ("float32", "tensorfloat32"),
  "bf16": ("bfloat16", "default"),
}


def original() -> config_lib.TrainConfig:
  """``configs/tlp_original.py``: its optimizer (Adam, coupled L2 1e-6, lr 7e-4, clip 0.5,
  constant rate) and loss (LambdaRank over the whole batch) are the ones timed here."""
  return config_lib.from_config_dict(tlp_original.get_config())


@dataclasses.dataclass
class JaxData:
  """Training arrays resident on the (one) device, in pmap layout ``(1, N, ...)``."""

  resident: tuple
  rows: int
  heads: int


def make_jax_data(split, rows: int, seed: int) -> JaxData:
  """``rows`` rows drawn on the device, with replacement, from the real ``split``."""
  devices = jax.local_devices()[:1]
  real = train_data.replicate_to_devices(
    (split.features, split.scores, split.mask, split.task_index), devices
  )

  def draw(data, key):
    idx = jax.random.randint(key, (rows,), 0, data[0].shape[0])
    return tuple(x[idx] for x in data)

  keys = train_data.replicate_to_devices(np.asarray(jax.random.PRNGKey(seed)), devices)
  resident = jax.pmap(draw, devices=devices)(real, keys)
  jax.block_until_ready(resident)
  return JaxData(resident=resident, rows=rows, heads=int(split.scores.shape[1]))


def _compile_with_cost(p_train, args: tuple, out: dict):
  """Compiles ``p_train`` for ``args`` once, used both for XLA's cost analysis and for the run
  (pmap's own call path would compile the same program a second time); records ``compile_s``
  and XLA's FLOPs / bytes per call in ``out``."""
  t0 = time.perf_counter()
  compiled = p_train.lower(*args).compile()
  out["compile_s"] = time.perf_counter() - t0
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    out["xla_flops_per_call"] = float(ca.get("flops", float("nan")))
    out["xla_bytes_per_call"] = float(ca.get("bytes accessed", float("nan")))
  except Exception as e:  # informative only
    logging.warning("cost analysis unavailable: %s", e)
  return compiled


def run_jax(
  data: JaxData,
  batch: int,
  precision: str,
  min_time: float,
  repeats: int,
  seed: int,
  scan_k: int = 0,
  group_by_task: bool = False,
) -> dict[str, Any]:
  """samples/s of ``step.train_step_resident`` (``scan_k`` > 0: that many per dispatch)."""

  dtype, matmul_precision = PRECISION_JAX[precision]
  devices = jax.local_devices()[:1]
  cfg = model_lib.TLPConfig(dtype=dtype, num_hardware_heads=data.heads)
  recipe = original()
  loss_config = dataclasses.replace(recipe.loss, group_by_task=group_by_task)
  steps_per_epoch = data.rows // batch
  if steps_per_epoch < 1 or (scan_k and steps_per_epoch % scan_k):
    raise ValueError(
      f"{data.rows} rows give {steps_per_epoch} steps of {batch} per epoch; "
      f"need >= 1 and a multiple of scan_k={scan_k}"
    )
  tx, _ = optimizer.make_optimizer(recipe.optim, steps_per_epoch, steps_per_epoch * 1000)
  # Exactly train_and_evaluate's construction of the resident-data step.
  step = functools.partial(
    step_lib.train_step_resident,
    steps_per_epoch=steps_per_epoch,
    global_batch=batch,
    model=model_lib.TLPModel(cfg),
    tx=tx,
    loss_config=loss_config,
  )
  if scan_k:

    def multi(state, resident, order, valid):
      def body(s, _):
        s, m = step(s, resident, order, valid)
        return s, m["loss"]

      state, losses_k = jax.lax.scan(body, state, None, length=scan_k)
      return state, {"loss": losses_k[-1]}

    fn, per_call = multi, scan_k
  else:
    fn, per_call = step, 1

  def draw_order(key):
    order = jax.random.permutation(key, data.rows).astype(np.int32)
    return order, np.ones((data.rows,), bool)

  out: dict[str, Any] = {}
  with jax.default_matmul_precision(matmul_precision):
    p_train = jax.pmap(fn, axis_name=train_data.AXIS, devices=devices, donate_argnums=(0,))
    p_order = jax.pmap(draw_order, devices=devices)
    state = step_lib.create_train_state(cfg, tx, seed)
    rstate = train_data.replicate_to_devices(state, devices)
    key = jax.random.PRNGKey(seed + 1)
    order_keys = iter(jax.random.split(key, 100000))
    cur = {"state": rstate, "step": 0, "order": None, "pending": []}

    def new_order():
      k = train_data.replicate_to_devices(np.asarray(next(order_keys)), devices)
      cur["order"] = p_order(k)

    new_order()
    compiled = _compile_with_cost(p_train, (cur["state"], data.resident, *cur["order"]), out)

    def run(n_calls: int) -> None:
      for _ in range(n_calls):
        if cur["step"] % steps_per_epoch == 0 and cur["step"]:
          new_order()
        cur["state"], m = compiled(cur["state"], data.resident, *cur["order"])
        cur["step"] += per_call
        cur["pending"].append(m["loss"])
        if len(cur["pending"]) * per_call >= LOG_EVERY:  # the trainer's metric fetch
          vals = jax.device_get(cur["pending"])
          cur["pending"] = []
          if not np.all(np.isfinite(np.asarray(vals))):
            raise FloatingPointError("non-finite loss")
      jax.block_until_ready(cur["state"].step)

    timing = time_loop(run, min_time / per_call, repeats)
  timing["step_s"] /= per_call
  timing["step_s_all"] = [t / per_call for t in timing["step_s_all"]]
  out.update(timing)
  out["samples_per_s"] = batch / timing["step_s"]
  out["flops_per_sample"] = train_flops_per_sample(cfg)
  out["params"] = param_count(cfg)
  out["heads"] = data.heads
  return out


# ---------------------------------------------------------------------------------------------
# Loss curves on the real training arrays
# ---------------------------------------------------------------------------------------------


def jax_curve(
  train, val, batch: int, steps: int, precision: str, seed: int, hardware: tuple[str, ...]
) -> dict[str, Any]:
  """Per-step training loss of the trainer's step on ``train`` in the trainer's data order."""

  dtype, matmul_precision = PRECISION_JAX[precision]
  devices = jax.local_devices()[:1]
  layout = train_data.BatchLayout.create(batch, devices)
  cfg = model_lib.TLPConfig(dtype=dtype, num_hardware_heads=train.scores.shape[1])
  recipe = original()
  loss_config = recipe.loss
  spe = -(-train.size // batch)
  tx, _ = optimizer.make_optimizer(recipe.optim, spe, spe * 1000)
  model = model_lib.TLPModel(cfg)
  with jax.default_matmul_precision(matmul_precision):
    p_train = jax.pmap(
      functools.partial(
        step_lib.train_step_resident,
        steps_per_epoch=spe,
        global_batch=batch,
        model=model,
        tx=tx,
        loss_config=loss_config,
      ),
      axis_name=train_data.AXIS,
      devices=devices,
      donate_argnums=(0,),
    )
    p_eval = jax.pmap(
      functools.partial(step_lib.eval_step, model=model, loss_config=loss_config),
      axis_name=train_data.AXIS,
      devices=devices,
    )
    resident = train_data.replicate_to_devices(
      (train.features, train.scores, train.mask, train.task_index), devices
    )
    rstate = train_data.replicate_to_devices(step_lib.create_train_state(cfg, tx, seed), devices)
    got = []
    t0 = time.perf_counter()
    for s in range(steps):
      epoch, in_epoch = divmod(s, spe)
      if in_epoch == 0:
        order, valid = train_data.epoch_order(seed, epoch, train.size, spe, batch)
        d_order, d_valid = train_data.replicate_to_devices((order, valid), devices)
      rstate, m = p_train(rstate, resident, d_order, d_valid)
      got.append(m["loss"])
    losses_host = [float(v[0]) for v in jax.device_get(got)]
    wall = time.perf_counter() - t0
    params = jax.tree_util.tree_map(lambda x: x[0], rstate.params)
    validation = loop.validate(p_eval, rstate.params, val, layout, hardware, (1, 5))
  return {
    "loss": losses_host,
    "wall_s": wall,
    "validation": validation,
    "final_params": jax.device_get(params),
  }


def epoch_batches(train, batch: int, steps: int, seed: int):
  """The trainer's batches (rows of each step, padding dropped), for the PyTorch curve."""
  spe = -(-train.size // batch)
  for s in range(steps):
    epoch, in_epoch = divmod(s, spe)
    if in_epoch == 0:
      order, valid = train_data.epoch_order(seed, epoch, train.size, spe, batch)
    sl = slice(in_epoch * batch, (in_epoch + 1) * batch)
    yield order[sl][valid[sl]]


def curve_summary(loss: list[float], ref: list[float], window: int = 10) -> dict[str, float]:
  """How far a loss curve is from a reference curve (window means, relative)."""
  a, b = np.asarray(loss, np.float64), np.asarray(ref, np.float64)
  n = min(a.size, b.size) // window * window
  wa = a[:n].reshape(-1, window).mean(1)
  wb = b[:n].reshape(-1, window).mean(1)
  rel = np.abs(wa - wb) / np.maximum(np.abs(wb), 1e-12)
  return {
    "first_step_rel_diff": float(abs(a[0] - b[0]) / max(abs(b[0]), 1e-12)),
    "max_window_rel_diff": float(rel.max()),
    "mean_window_rel_diff": float(rel.mean()),
    "last50_mean": float(a[-50:].mean()),
    "ref_last50_mean": float(b[-50:].mean()),
  }


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------


def load_reference():
  """``bench.torch_tlp_reference``, imported only here: PyTorch is an optional dependency."""
  from bench import torch_tlp_reference

  return torch_tlp_reference


def torch_precision(precision: str):
  """Sets PyTorch's TF32 switches for ``precision``; returns the autocast dtype (or None)."""
  import torch

  tf32 = precision == "tf32"
  torch.backends.cuda.matmul.allow_tf32 = tf32
  torch.backends.cudnn.allow_tf32 = tf32
  return torch.bfloat16 if precision == "bf16" else None


def torch_model_from_jax(ref, seed: int):
  """Reference model with the same initial weights as ``step.create_train_state(seed)``."""
  cfg = model_lib.TLPConfig()
  init_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  params = jax.device_get(model_lib.init_params(cfg, init_rng))
  model = ref.TLPTorchModel(ref.model_config_from_tlp(cfg))
  ref.load_flax_params(model, params)
  return model


def run_torch(
  ref,
  split,
  batch: int,
  precision: str,
  rows: int,
  min_time: float,
  repeats: int,
  seed: int,
  compile_: bool,
  faithful: bool,
) -> dict[str, Any]:
  """samples/s of the reference step on device-resident data (drawn like the JAX data)."""
  import torch

  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  amp = torch_precision(precision)
  gen = torch.Generator(device="cpu").manual_seed(seed)
  idx = torch.randint(0, split.size, (rows,), generator=gen)
  feats = torch.from_numpy(split.features)[idx].to(dev)
  labels = torch.from_numpy(split.scores[:, 0])[idx].to(dev)
  model = torch_model_from_jax(ref, seed).to(dev)
  trainer = ref.TorchTrainer(
    model,
    ref.TorchTrainConfig(
      amp_dtype=amp, compile=compile_, sync_loss_every_step=faithful, boolean_index=faithful
    ),
  )
  steps_per_epoch = rows // batch
  cur = {"step": 0, "perm": None, "pending": []}

  def run(n: int) -> None:
    for _ in range(n):
      in_epoch = cur["step"] % steps_per_epoch
      if in_epoch == 0:
        cur["perm"] = torch.randperm(rows, device=dev)
      sel = cur["perm"][in_epoch * batch : (in_epoch + 1) * batch]
      loss = trainer.step(feats[sel], labels[sel])
      cur["step"] += 1
      if not faithful:
        cur["pending"].append(loss.detach())
        if len(cur["pending"]) >= LOG_EVERY:
          vals = torch.stack(cur["pending"]).cpu().numpy()
          cur["pending"] = []
          if not np.all(np.isfinite(vals)):
            raise FloatingPointError("non-finite loss")
    if dev.type == "cuda":
      torch.cuda.synchronize()

  if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  out = time_loop(run, min_time, repeats)
  out["samples_per_s"] = batch / out["step_s"]
  if dev.type == "cuda":
    out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model, feats, labels, cur
    torch.cuda.empty_cache()  # give the memory back for the JAX variants that follow
  return out


def torch_curve(ref, train, batch: int, steps: int, seed: int) -> dict[str, Any]:
  """Per-step loss of the reference (float32) from JAX's initial weights, trainer's batches."""
  import torch

  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch_precision("float32")
  feats = torch.from_numpy(train.features).to(dev)
  labels = torch.from_numpy(train.scores[:, 0]).to(dev)
  model = torch_model_from_jax(ref, seed).to(dev)
  trainer = ref.TorchTrainer(model, ref.TorchTrainConfig())
  got = []
  t0 = time.perf_counter()
  for rows in epoch_batches(train, batch, steps, seed):
    sel = torch.from_numpy(rows.astype(np.int64)).to(dev)
    got.append(trainer.step(feats[sel], labels[sel]).item())
  return {"loss": got, "wall_s": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# The default recipe (configs/default.py) at TenSet scale
# ---------------------------------------------------------------------------------------------


def max_group_size(task_index: np.ndarray) -> int:
  """Most rows of one task (at least 1): no batch holds more, so it bounds the band."""
  t = np.asarray(task_index)
  return int(np.unique(t, return_counts=True)[1].max()) if t.size else 1


def pairwise_log_band(preds, labels, valid, groups, config, window: int):
  """``losses.pairwise_log_head`` evaluated block-diagonally (the measured lever; not adopted).

  The batch is sorted by group (absent labels last), so each group's items are contiguous and
  every comparable pair lies within ``window`` positions when no group has more than
  ``window + 1`` items; each unordered pair ``(i, i + d)``, ``1 <= d <= window``, is evaluated
  once, in the direction its labels order it: ``B * window`` pairs instead of ``B^2``. The same
  loss up to float rounding (tests/bench/test_recipe_loss.py); slower on the H200 than the dense
  form (bench/README.md: the sort and the ``(B, window)`` gathers cost more than the pairs saved).
  """
  n = preds.shape[0]
  window = min(n - 1, window)
  if window < 1:
    return jnp.zeros((), jnp.float32)
  preds = preds.astype(jnp.float32)
  log_y = losses_lib._log_scores(labels, valid)
  # Sort key: the group, absent labels after every group (so they never split one).
  key = jnp.where(valid, groups.astype(jnp.int32), jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, stable=True)
  key, preds, log_y, valid = key[order], preds[order], log_y[order], valid[order]
  j = jnp.arange(n)[:, None] + jnp.arange(1, window + 1)[None, :]  # (n, window) partners
  inside = j < n
  j = jnp.minimum(j, n - 1)
  pair = inside & valid[:, None] & valid[j] & (key[:, None] == key[j])
  gap = log_y[:, None] - log_y[j]  # > 0: i is faster, so the pair says s_i > s_j
  margin = config.sigma * jnp.where(gap > 0, preds[:, None] - preds[j], preds[j] - preds[:, None])
  weights = jnp.where(pair, jnp.abs(gap), 0.0)
  return -jnp.sum(weights * jax.nn.log_sigmoid(margin)) / jnp.maximum(jnp.sum(weights), config.eps)


def band_loss_config(loss: losses_lib.LossConfig, window: int) -> losses_lib.LossConfig:
  """``loss`` computed by ``pairwise_log_band`` with ``window`` (registered in LOSSES)."""
  name = f"pairwise_log_band{window}"
  losses_lib.LOSSES.setdefault(name, functools.partial(pairwise_log_band, window=window))
  return dataclasses.replace(loss, name=name)


@dataclasses.dataclass(frozen=True)
class RecipeVariant:
  """One timed configuration of the default recipe's step."""

  batch: int = 1024
  dtype: str = "float32"  # "float32" = TF32 matmuls (config.matmul_precision "default")
  attention: str = "einsum"  # model.SelfAttention implementation ("cudnn": fused kernel)
  loss: str = "dense"  # "dense" (the library's, B^2 pairs) or "band" (pairwise_log_band)
  task_copies: int = 1  # synthetic task size = this x the real task's
  ensemble: int = 1
  loop_tokens: int = 0  # loop tokens the model reads (the first ones); 0 = all the data holds
  model: tuple[tuple[str, Any], ...] = ()  # config.model overrides ((field, value), ...)
  # "compiled": the AOT-compiled step called in the loop; "pmap": the pmapped function called
  # as train.py calls it (JAX's pmap wrapper flattens and checks the arguments on every call).
  call: str = "compiled"


# The loop tokens configs/default.py's model reads (config.max_loop_tokens), read from the
# config so that the "default" variants follow it.
DEFAULT_LOOP_TOKENS = default_config.get_config().max_loop_tokens

# TLP's widths (configs/tlp_original.py's model), on top of the default recipe.
W256 = (("encoder_dims", (64, 128, 256, 256)), ("decoder_dims", (256, 128, 64, 1)))

RECIPE_VARIANTS = {
  # configs/default.py on an NVIDIA GPU since 2026-12-03: model.dtype "auto" = bf16, and
  # attention_impl "auto" = cuDNN's fused attention over the token axis padded to 72.
  # Since 2026-12-03 (later) the model reads 39 of the 40 stored loop tokens
  # (config.max_loop_tokens): 64 tokens in all. "default_t40": the same with all 40. Since
  # 2026-12-03 (later still) its trunk is 128 wide (configs/default.py's model; every variant
  # reads the model widths from the config unless it sets its own).
  "default": RecipeVariant(
    dtype="bfloat16", attention="cudnn_pad8", loop_tokens=DEFAULT_LOOP_TOKENS
  ),
  "default_tenset_tasks": RecipeVariant(
    dtype="bfloat16", attention="cudnn_pad8", loop_tokens=DEFAULT_LOOP_TOKENS, task_copies=80
  ),
  "default_b4096": RecipeVariant(
    dtype="bfloat16", attention="cudnn_pad8", loop_tokens=DEFAULT_LOOP_TOKENS, batch=4096
  ),
  "default_t40": RecipeVariant(dtype="bfloat16", attention="cudnn_pad8"),
  # The default's step called through jax.pmap's wrapper, as train.py calls it.
  "default_pmap_call": RecipeVariant(
    dtype="bfloat16", attention="cudnn_pad8", loop_tokens=DEFAULT_LOOP_TOKENS, call="pmap"
  ),
  # The default with TLP's 256-wide trunk (the default until 2026-12-03, later; accuracy_sweep's
  # "default_w256").
  "default_w256": RecipeVariant(
    dtype="bfloat16", attention="cudnn_pad8", loop_tokens=DEFAULT_LOOP_TOKENS, model=W256
  ),
  "default_w256_b4096": RecipeVariant(
    dtype="bfloat16",
    attention="cudnn_pad8",
    loop_tokens=DEFAULT_LOOP_TOKENS,
    model=W256,
    batch=4096,
  ),
  "default_t40_b4096": RecipeVariant(dtype="bfloat16", attention="cudnn_pad8", batch=4096),
  # The default until 2026-12-02 (TF32, plain einsum attention).
  "landed": RecipeVariant(),
  "landed_tenset_tasks": RecipeVariant(task_copies=80),
  "band": RecipeVariant(loss="band"),
  "band_tenset_tasks": RecipeVariant(loss="band", task_copies=80),
  "bf16": RecipeVariant(dtype="bfloat16"),
  "bf16_band": RecipeVariant(dtype="bfloat16", loss="band"),
  "bf16_cudnn": RecipeVariant(dtype="bfloat16", attention="cudnn"),
  "tf32_b4096": RecipeVariant(batch=4096),
  "bf16_b4096": RecipeVariant(dtype="bfloat16", batch=4096),
  "bf16_band_b4096": RecipeVariant(dtype="bfloat16", batch=4096, loss="band"),
  "bf16_cudnn_b4096": RecipeVariant(dtype="bfloat16", attention="cudnn", batch=4096),
  "bf16_b16384": RecipeVariant(dtype="bfloat16", batch=16384),
  "bf16_band_b16384": RecipeVariant(dtype="bfloat16", batch=16384, loss="band"),
  "bf16_band_b4096_tenset_tasks": RecipeVariant(
    dtype="bfloat16", batch=4096, task_copies=80, loss="band"
  ),
  "bf16_ens5": RecipeVariant(dtype="bfloat16", ensemble=5),
  "landed_pad8": RecipeVariant(attention="einsum_pad8"),
  "landed_pad16": RecipeVariant(attention="einsum_pad16"),
  "bf16_pad8": RecipeVariant(dtype="bfloat16", attention="einsum_pad8"),
  "bf16_pad16": RecipeVariant(dtype="bfloat16", attention="einsum_pad16"),
  "bf16_pad8_b4096": RecipeVariant(dtype="bfloat16", attention="einsum_pad8", batch=4096),
  # cuDNN's fused attention over the padded token axis (it refused 65 tokens unpadded; these
  # variants read all 40 stored loop tokens).
  "bf16_cudnn_pad8": RecipeVariant(dtype="bfloat16", attention="cudnn_pad8"),
  "bf16_cudnn_pad8_b4096": RecipeVariant(dtype="bfloat16", attention="cudnn_pad8", batch=4096),
  "bf16_cudnn_pad8_b16384": RecipeVariant(dtype="bfloat16", attention="cudnn_pad8", batch=16384),
  "bf16_cudnn_pad8_tenset_tasks": RecipeVariant(
    dtype="bfloat16", attention="cudnn_pad8", task_copies=80
  ),
}

RECIPE_ACCURACY_RUNS = {  # name -> overrides of configs/default.py
  "default": {},
  "tf32": {"model.dtype": "float32", "attention_impl": "einsum"},
  "bf16": {"model.dtype": "bfloat16"},
  "tf32_b4096": {"model.dtype": "float32", "batch_size": 4096},
  "bf16_b4096": {"model.dtype": "bfloat16", "batch_size": 4096},
  "bf16_b2048": {"model.dtype": "bfloat16", "batch_size": 2048},
}


def recipe_config(overrides: dict[str, Any]) -> config_lib.TrainConfig:
  """``configs/default.py`` with dotted overrides, as the trainer maps it."""
  cfg = default_config.get_config()
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = cfg
    for p in path:
      node = node[p]
    node[last] = value
  return config_lib.from_config_dict(cfg)


def load_recipe_arrays(data_dir: str, dataset: str):
  """(train, validation, dataset) of a built config with loop tokens, as the trainer selects."""
  ds = loader.load_arrays(data_dir, dataset)
  recipe = recipe_config({})
  cols = train_data.head_columns(list(ds.hardware), list(recipe.hardware))
  tokens = train_data.reads_loop_tokens(recipe.loop_tokens, ds)
  if not tokens:
    raise app.UsageError(f"{data_dir}/{dataset} has no loop tokens: the default recipe reads them")
  return (
    train_data.select_heads(ds.train, cols, tokens),
    train_data.select_heads(ds.validation, cols, tokens),
    ds,
  )


class TiledData:
  """``rows`` training rows resident on one device, tiled from the real training rows.

  Row ``r`` is real row ``r % N``; its task is the real task of copy ``r // N`` with
  ``task_copies`` consecutive copies merged into one synthetic task (so tasks have
  ``task_copies`` x the real tasks' programs, and a by-task batch looks like TenSet's)."""

  def __init__(self, train, rows: int):
    self.train, self.rows = train, rows
    self.devices = jax.local_devices()[:1]
    real = train_data.replicate_to_devices(train.arrays, self.devices)
    n = train.size

    def tile(data):
      idx = jnp.arange(rows, dtype=jnp.int32) % n
      return tuple(x[idx] for x in data)

    self.resident = list(jax.pmap(tile, devices=self.devices)(real))
    jax.block_until_ready(self.resident)
    # Bytes per row: the resident arrays are (1 device, rows, ...).
    self.nbytes = sum(int(np.prod(x.shape[2:])) * x.dtype.itemsize for x in self.resident)
    self._tasks: dict[int, tuple] = {}

  def tasks(self, copies: int):
    """(device task_index, host task_index, largest task) for ``copies`` copies per task."""
    if copies not in self._tasks:
      n, real = self.train.size, self.train.task_index.astype(np.int64)
      r = np.arange(self.rows, dtype=np.int64)
      host = (real[r % n] + (int(real.max()) + 1) * ((r // n) // copies)).astype(np.int32)
      dev = train_data.replicate_to_devices(host, self.devices)
      self._tasks[copies] = (dev, host, max_group_size(host))
    return self._tasks[copies]


def run_recipe_variant(
  data: TiledData,
  v: RecipeVariant,
  min_time: float,
  repeats: int,
  seed: int,
  profile_steps: int = 0,
) -> dict[str, Any]:
  """samples/s of the default recipe's resident step (``train_step_resident`` as the trainer
  builds it, by-task epoch order) for one variant; with ``profile_steps``, also device time per
  op and kernel over that many traced steps."""
  task_dev, task_host, biggest = data.tasks(v.task_copies)
  resident = tuple(data.resident[:-1]) + (task_dev,)
  num_tokens = data.train.loop_tokens.shape[1]
  if v.loop_tokens:  # the model reads the first ones (outermost loops first) and, as in the
    # trainer (config.max_loop_tokens), drops the rest of the resident tokens itself
    num_tokens = min(num_tokens, v.loop_tokens)
  recipe = recipe_config(
    {"model.dtype": v.dtype, "model.ensemble_size": v.ensemble}
    | {f"model.{k}": val for k, val in v.model}
  )
  model_cfg = dataclasses.replace(
    recipe.model,
    seq_len=recipe.model.seq_len + num_tokens,
    feature_dim=recipe.model.feature_dim + data.train.loop_tokens.shape[2],
    num_hardware_heads=1,
  )
  loss = recipe.loss if v.loss == "dense" else band_loss_config(recipe.loss, biggest - 1)
  steps_per_epoch = -(-data.rows // v.batch)  # the trainer pads the last batch
  tx, _ = optimizer.make_optimizer(
    recipe.optim, steps_per_epoch, steps_per_epoch * recipe.num_epochs, v.ensemble
  )
  step = functools.partial(
    step_lib.train_step_resident,
    steps_per_epoch=steps_per_epoch,
    global_batch=v.batch,
    model=model_lib.TLPModel(model_cfg, attention_impl=v.attention),
    tx=tx,
    loss_config=loss,
  )
  t0 = time.perf_counter()
  order, valid = train_data.epoch_order(seed, 0, data.rows, steps_per_epoch, v.batch, task_host)
  out: dict[str, Any] = {"epoch_order_host_s": time.perf_counter() - t0}
  order_dev = train_data.replicate_to_devices((order, valid), data.devices)
  with jax.default_matmul_precision(recipe.matmul_precision):
    p_train = jax.pmap(step, axis_name=train_data.AXIS, devices=data.devices, donate_argnums=(0,))
    state = train_data.replicate_to_devices(
      step_lib.create_train_state(model_cfg, tx, seed), data.devices
    )
    compiled = _compile_with_cost(p_train, (state, resident, *order_dev), out)
    if v.call == "pmap":
      compiled = p_train  # compiles once more on its first call (in the warm-up)
    elif v.call != "compiled":
      raise ValueError(f"unknown call {v.call!r}")
    cur = {"state": state, "pending": []}

    def run(n_calls: int) -> None:
      for _ in range(n_calls):
        cur["state"], m = compiled(cur["state"], resident, *order_dev)
        cur["pending"].append(m["loss"])
        if len(cur["pending"]) >= LOG_EVERY:  # the trainer's metric fetch
          vals = np.asarray(jax.device_get(cur["pending"]))
          cur["pending"] = []
          if not np.all(np.isfinite(vals)):
            raise FloatingPointError("non-finite loss")
      jax.block_until_ready(cur["state"].step)

    out.update(time_loop(run, min_time, repeats))
    if profile_steps > 0:
      with tempfile.TemporaryDirectory() as trace_dir:
        xplane = kernel_profile.trace(lambda: run(profile_steps), trace_dir)
        out["profile"] = kernel_profile.summarize(xplane, calls=profile_steps)
  out.update(
    dataclasses.asdict(v),
    samples_per_s=v.batch / out["step_s"],
    rows=data.rows,
    resident_gib=data.nbytes * data.rows / 2**30,
    max_group_size=biggest,
    loss_pairs_per_step=v.batch * (v.batch if v.loss == "dense" else min(v.batch - 1, biggest - 1)),
    flops_per_sample=train_flops_per_sample(model_cfg),
  )
  if "xla_bytes_per_call" in out:
    out["achieved_gbps"] = out["xla_bytes_per_call"] / out["step_s"] / 1e9
  return out


def run_recipe_accuracy(ds, name: str, seed: int, epochs: int, workdir: str) -> dict[str, Any]:
  """Trains the default recipe (with ``RECIPE_ACCURACY_RUNS[name]``) on the real data with the
  trainer itself; validation loss and top-k at the end."""
  overrides = dict(
    RECIPE_ACCURACY_RUNS[name],
    seed=seed,
    num_epochs=epochs,
    eval_every_epochs=epochs,
    checkpoint_every_steps=0,
    log_every_steps=10**6,
  )
  recipe = recipe_config(overrides)
  t0 = time.perf_counter()
  result = loop.train_and_evaluate(recipe, os.path.join(workdir, f"{name}_seed{seed}"), dataset=ds)
  return {
    "name": name,
    "seed": seed,
    "overrides": RECIPE_ACCURACY_RUNS[name],
    "epochs": epochs,
    "wall_s": time.perf_counter() - t0,
    "validation": {k: float(v) for k, v in result.validation.items()},
  }


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
  """``common.device_info`` plus the device string, library versions, PyTorch and the driver."""
  d = jax.devices()[0]
  info: dict[str, Any] = {
    **common.device_info(),
    "jax_device": str(d),
    "device_kind": d.device_kind,
    "platform": d.platform,
    "jaxlib": getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
  }
  try:
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name(0)
  except ImportError:
    info["torch"] = None
  try:
    smi = subprocess.run(
      [
        "nvidia-smi",
        "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
        "--format=csv,noheader",
      ],
      capture_output=True,
      text=True,
      timeout=20,
      check=False,
    )
    info["nvidia_smi"] = smi.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def format_table(data: dict[str, Any]) -> str:
  """Text table of the throughput variants, with % of the measured ceilings."""
  ceil = data.get("ceilings", {})
  lines = [
    f"{'variant':<28} {'prec':<8} {'batch':>6} {'samples/s':>12} {'step ms':>9} "
    f"{'TFLOP/s':>8} {'%mm':>6} {'%bf16':>6} {'GB/s':>7} {'%bw':>5}"
  ]
  for v in data.get("variants", []):
    if v.get("kind") != "throughput":
      continue
    if "skipped" in v or "error" in v:
      lines.append(
        f"{v['name']:<28} {v['precision']:<8} {v['batch']:>6} "
        f"{v.get('skipped') or 'ERROR ' + v.get('error', '')[:60]}"
      )
      continue
    tflops = v.get("achieved_tflops", float("nan"))
    mm = ceil.get(f"matmul_{v['precision']}_tflops", float("nan"))
    bf = ceil.get("matmul_bf16_tflops", float("nan"))
    gbps = v.get("achieved_gbps", float("nan"))
    bw = ceil.get("copy_gbps", float("nan"))
    lines.append(
      f"{v['name']:<28} {v['precision']:<8} {v['batch']:>6} "
      f"{v['samples_per_s']:>12,.0f} {v['step_s'] * 1e3:>9.3f} {tflops:>8.1f} "
      f"{100 * tflops / mm:>5.1f}% {100 * tflops / bf:>5.1f}% {gbps:>7.0f} "
      f"{100 * gbps / bw:>4.0f}%"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(argv):
  del argv
  if _PREPARE.value:
    if not _DATA_DIR.value:
      raise app.UsageError("--prepare_arrays needs --data_dir")
    prepare_arrays(_DATA_DIR.value, _DATASET.value, _PREPARE.value)
    return

  smoke = _SMOKE.value
  batches = [int(b) for b in _BATCHES.value]
  precisions = list(_PRECISIONS.value)
  for p in precisions:
    if p not in PRECISION_JAX:
      raise app.UsageError(f"unknown precision {p!r}; known {sorted(PRECISION_JAX)}")
  rows = _ROWS.value
  curve_steps = _CURVE_STEPS.value
  min_time, repeats = _MIN_TIME.value, _REPEATS.value
  matmul_n, copy_mb = _MATMUL_N.value, _COPY_MB.value
  if smoke:
    batches = [b for b in batches if b <= 256] or [64, 128]
    rows, curve_steps, min_time, repeats, matmul_n, copy_mb = 2048, 12, 0.05, 1, 256, 8
  if _ARRAYS.value:
    train = load_split(_ARRAYS.value, "train")
    val = load_split(_ARRAYS.value, "validation")
    with open(os.path.join(_ARRAYS.value, "meta.json")) as f:
      hardware = tuple(json.load(f)["hardware"])
  elif _RECIPE_DATA.value:
    rtrain, rval, rds = load_recipe_arrays(_RECIPE_DATA.value, _DATASET.value)
    # The PyTorch original reads TLP's step features only.
    train = dataclasses.replace(rtrain, loop_tokens=None)
    val = dataclasses.replace(rval, loop_tokens=None)
    hardware = tuple(recipe_config({}).hardware)
  elif smoke:
    train, val, hardware = smoke_split(600, 0), smoke_split(200, 1), ("smoke",)
  else:
    raise app.UsageError("give --arrays_dir (see --prepare_arrays), --recipe_data_dir or --smoke")
  if any(sec.startswith("default_") for sec in _SECTIONS.value) and (
    _ARRAYS.value or not _RECIPE_DATA.value
  ):
    raise app.UsageError("the default_* sections need --recipe_data_dir (and no --arrays_dir)")
  if train.scores.shape[1] != 1:
    raise app.UsageError("use a one-hardware dataset config (the reference has one head)")

  budget = Budget(_BUDGET.value)
  info = device_info()
  path = os.path.join(
    _OUT_DIR.value,
    common.slug(info["device_kind"], "device")
    + ("-smoke" if smoke else "")
    + (f"-{_TAG.value}" if _TAG.value else "")
    + ".json",
  )
  report = Report(
    path,
    {
      "device": info,
      "config": {
        "batches": batches,
        "precisions": precisions,
        "synthetic_rows": rows,
        "min_time_s": min_time,
        "repeats": repeats,
        "log_every": LOG_EVERY,
        "scan_k": SCAN_K,
        "train_rows": train.size,
        "validation_rows": val.size,
        "hardware": hardware,
        "seed": _SEED.value,
        "argv": sys.argv[1:],
      },
    },
  )
  logging.info("device %s; writing %s", info["device_kind"], path)
  sections = list(_SECTIONS.value)
  seed = _SEED.value

  if "ceilings" in sections:
    report.set("ceilings", measure_ceilings(matmul_n, copy_mb))
    logging.info("ceilings: %s", report.data["ceilings"])
  ceil = report.data.get("ceilings", {})
  flops = train_flops_per_sample(model_lib.TLPConfig())
  report.set(
    "counts",
    {
      "flops_per_sample": flops,
      "params": param_count(model_lib.TLPConfig()),
      "loss_pairs_per_step": {str(b): b * b for b in batches},
      "note": "matmul FLOPs only; LambdaRank evaluates all B^2 pairs of the batch per head "
      "(group_by_task masks pairs but does not reduce that work)",
    },
  )

  data_cache: dict[int, JaxData] = {}

  def jax_data(heads: int = 1) -> JaxData:
    if heads not in data_cache:  # drawn once, shared by every JAX variant
      split = (
        train
        if heads == 1
        else dataclasses.replace(
          train, scores=np.repeat(train.scores, heads, 1), mask=np.repeat(train.mask, heads, 1)
        )
      )
      data_cache[heads] = make_jax_data(split, rows, seed)
    return data_cache[heads]

  def finish(entry: dict[str, Any]) -> None:
    if "samples_per_s" in entry:
      fl = entry.get("flops_per_sample", flops)["train"]
      entry["achieved_tflops"] = fl * entry["samples_per_s"] / 1e12
      mm = ceil.get(f"matmul_{entry['precision']}_tflops")
      if mm:
        entry["pct_of_matmul_ceiling_same_precision"] = 100 * entry["achieved_tflops"] / mm
      if ceil.get("matmul_bf16_tflops"):
        entry["pct_of_bf16_matmul_ceiling"] = (
          100 * entry["achieved_tflops"] / ceil["matmul_bf16_tflops"]
        )
      # XLA counts a scan's body once, so bytes per step are only known for one-step calls.
      if "xla_bytes_per_call" in entry and entry.get("steps_per_call", 1) == 1:
        per_step = entry["xla_bytes_per_call"]
        entry["achieved_gbps"] = per_step / entry["step_s"] / 1e9
        if ceil.get("copy_gbps"):
          entry["pct_of_copy_bandwidth"] = 100 * entry["achieved_gbps"] / ceil["copy_gbps"]
      entry["loss_pairs_per_s"] = entry["batch"] ** 2 * entry.get("heads", 1) / entry["step_s"]
    report.add(entry)
    logging.info("%s", {k: v for k, v in entry.items() if not isinstance(v, (list, dict))})

  def attempt(
    name: str,
    precision: str,
    batch: int,
    estimate_s: float,
    fn: Callable[[], dict[str, Any]],
    **extra,
  ) -> None:
    entry = {"kind": "throughput", "name": name, "precision": precision, "batch": batch, **extra}
    if not budget.allows(estimate_s):
      entry["skipped"] = f"time budget ({budget.left():.0f} s left, needs ~{estimate_s:.0f})"
      report.add(entry)
      return
    t0 = time.time()
    try:
      entry.update(fn())
    except Exception as e:  # record and go on: one failing variant must not lose the others
      logging.exception("%s %s %d failed", name, precision, batch)
      entry["error"] = f"{type(e).__name__}: {e}"[:2000]
    entry["wall_s"] = time.time() - t0
    finish(entry)

  est_jax, est_torch = (30.0, 15.0) if not smoke else (1.0, 1.0)
  ref = None
  if any(s.startswith("torch") or s == "curves" for s in sections):
    try:
      ref = load_reference()
    except ImportError as e:
      logging.warning("PyTorch reference unavailable: %s", e)
      report.set("torch_unavailable", str(e))

  def jax_runs(bs, precs, name="jax", data=None, **kw):
    for b in bs:
      for p in precs:
        attempt(
          name,
          p,
          b,
          est_jax,
          functools.partial(run_jax, data or jax_data(), b, p, min_time, repeats, seed, **kw),
          steps_per_call=kw.get("scan_k") or 1,
          **{k: v for k, v in kw.items() if k != "scan_k"},
        )

  def torch_runs(bs, precs, name, compile_=False, faithful=True, estimate=None):
    if ref is None:
      return
    for b in bs:
      for p in precs:
        attempt(
          name,
          p,
          b,
          estimate or est_torch,
          functools.partial(
            run_torch,
            ref,
            train,
            b,
            p,
            min(rows, 1 << 20),  # the PyTorch step does not depend on the resident rows
            min_time,
            repeats,
            seed,
            compile_,
            faithful,
          ),
        )

  small, big = batches[:1], batches[1:]
  for section in sections:
    logging.info("section %s (%.0f s left)", section, budget.left())
    if section == "jax":
      jax_runs(small, precisions)
    elif section == "torch_eager":
      torch_runs(small, precisions, "torch_eager_original")
      torch_runs(small, precisions, "torch_eager_nosync", faithful=False)
    elif section == "curves":
      run_curves(
        report,
        budget,
        train,
        val,
        hardware,
        ref if _TORCH_CURVE.value else None,
        batches[0],
        curve_steps,
        list(_CURVE_PRECISIONS.value or precisions),
        [int(o) for o in _CURVE_SEEDS.value],
        seed,
        smoke,
      )
    elif section == "torch_extra":
      for spec in _TORCH_EAGER.value:
        p, b = spec.split(":")
        torch_runs([int(b) if not smoke else batches[0]], [p], "torch_eager_original")
    elif section == "jax_big":
      jax_runs(big, precisions)
    elif section == "scan":
      jax_runs(batches, precisions[:1], name=f"jax_scan{SCAN_K}", scan_k=SCAN_K)
    elif section == "torch_big":
      torch_runs(big, precisions, "torch_eager_original")
    elif section == "torch_compile":
      for spec in _TORCH_COMPILE.value:
        p, b = spec.split(":")
        b = int(b) if not smoke else batches[0]
        torch_runs(
          [b],
          [p],
          "torch_compile",
          compile_=True,
          faithful=False,
          estimate=90.0 if not smoke else 1.0,
        )
    elif section == "extras":
      jax_runs(batches[-1:], precisions[:1], name="jax_group_by_task", group_by_task=True)
      # MTL-TLP shape: two hardware heads (labels duplicated; the work is what matters).
      jax_runs(
        [batches[0], batches[-1]], precisions[:1], name="jax_mtl2_heads", data=jax_data(heads=2)
      )
    elif section == "default_recipe":
      recipe_rows = 4096 if smoke else _RECIPE_ROWS.value
      t0 = time.time()
      free_before = train_data.device_data_budget("auto", jax.local_devices()[:1])
      tiled = TiledData(rtrain, recipe_rows)
      report.set(
        "default_recipe_data",
        {
          "rows": recipe_rows,
          "real_train_rows": rtrain.size,
          "bytes_per_row": tiled.nbytes,
          "resident_gib": tiled.nbytes * recipe_rows / 2**30,
          "tile_s": time.time() - t0,
          "device_data_budget_auto_gib_before_tiling": free_before / 2**30,
          "device_data_budget_auto_gib_after_tiling": train_data.device_data_budget(
            "auto", tiled.devices
          )
          / 2**30,
        },
      )
      for name in _RECIPE_VARIANTS.value or list(RECIPE_VARIANTS):
        v = RECIPE_VARIANTS[name]
        if smoke:
          v = dataclasses.replace(
            v, batch=min(v.batch, 256) // 4, task_copies=min(v.task_copies, 2)
          )
        if str(v.task_copies) not in _RECIPE_TASK_COPIES.value and not smoke:
          continue
        attempt(
          f"recipe_{name}",
          "bf16" if v.dtype == "bfloat16" else "tf32",
          v.batch,
          est_jax,
          functools.partial(
            run_recipe_variant, tiled, v, min_time, repeats, seed, _PROFILE_STEPS.value
          ),
          recipe_variant=name,
        )
      del tiled
    elif section == "default_accuracy":
      runs = []
      workdir = tempfile.mkdtemp(prefix="recipe_runs_")  # checkpoints: not results
      for name in _RECIPE_RUNS.value:
        for sd in _RECIPE_SEEDS.value:
          if not budget.allows(40.0 if not smoke else 0.5):
            runs.append({"name": name, "seed": int(sd), "skipped": "time budget"})
            continue
          try:
            runs.append(
              run_recipe_accuracy(rds, name, int(sd), 1 if smoke else _RECIPE_EPOCHS.value, workdir)
            )
          except Exception as e:
            logging.exception("accuracy run %s failed", name)
            runs.append({"name": name, "seed": int(sd), "error": f"{type(e).__name__}: {e}"})
          report.set("default_accuracy", runs)
          logging.info("%s", runs[-1])
    elif section != "ceilings":
      raise app.UsageError(f"unknown section {section!r}")

  report.set("elapsed_s", time.time() - budget.start)
  table = format_table(report.data)
  report.set("table", table.splitlines())
  print(table)
  if "curves" in report.data:
    print(format_curves(report.data["curves"]))
  print(f"wrote {path}")


def run_curves(
  report: Report,
  budget: Budget,
  train,
  val,
  hardware,
  ref,
  batch: int,
  steps: int,
  precisions: list[str],
  seed_offsets: list[int],
  seed: int,
  smoke: bool,
) -> None:
  """Loss curves on the real arrays: JAX per precision (and seed) and the PyTorch reference.

  ``jax_float32`` (seed offset 0) is the reference the others are compared with; a float32
  curve with another seed shows how far two equally good runs drift apart.
  """
  curves: dict[str, Any] = dict(
    report.data.get("curves") or {}, batch=batch, steps=steps, optimizer="tlp_original"
  )
  base = curves.get("jax_float32", {}).get("loss")
  runs = [(p, 0) for p in sorted(precisions, key=lambda p: p != "float32") if 0 in seed_offsets]
  runs += [("float32", o) for o in seed_offsets if o]
  for p, offset in runs:
    name = f"jax_{p}" + (f"_seed{seed + offset}" if offset else "")
    if not budget.allows(20.0 if not smoke else 0.5):
      curves[name] = {"skipped": "time budget"}
      continue
    try:
      c = jax_curve(train, val, batch, steps, p, seed + offset, hardware)
    except Exception as e:
      logging.exception("curve %s failed", name)
      curves[name] = {"error": f"{type(e).__name__}: {e}"}
      continue
    c.pop("final_params")
    if name == "jax_float32":
      base = c["loss"]
    elif base is not None:
      c["vs_jax_float32"] = curve_summary(c["loss"], base)
    curves[name] = c
    report.set("curves", curves)
  if ref is not None and budget.allows(20.0 if not smoke else 0.5):
    try:
      c = torch_curve(ref, train, batch, steps, seed)
      if base is not None:
        c["vs_jax_float32"] = curve_summary(c["loss"], base)
      curves["torch_float32"] = c
    except Exception as e:
      logging.exception("torch curve failed")
      curves["torch_float32"] = {"error": f"{type(e).__name__}: {e}"}
  report.set("curves", curves)


def format_curves(curves: dict[str, Any]) -> str:
  """Text summary of the loss curves."""
  lines = [
    f"loss curves: batch {curves['batch']}, {curves['steps']} steps (real train arrays)",
    f"{'curve':<16} {'loss[0]':>10} {'last50':>10} {'max win rel':>12} "
    f"{'val_loss':>10} {'val top1':>9} {'val top5':>9}",
  ]
  for name, c in curves.items():
    if not isinstance(c, dict):
      continue
    if "loss" not in c:
      lines.append(f"{name:<16} {c}")
      continue
    vs = c.get("vs_jax_float32", {})
    v = c.get("validation", {})
    top1 = next((x for k, x in v.items() if k.startswith("val_top1/")), float("nan"))
    top5 = next((x for k, x in v.items() if k.startswith("val_top5/")), float("nan"))
    lines.append(
      f"{name:<16} {c['loss'][0]:>10.4f} {np.mean(c['loss'][-50:]):>10.4f} "
      f"{vs.get('max_window_rel_diff', float('nan')):>12.4f} "
      f"{v.get('val_loss', float('nan')):>10.4f} {top1:>9.4f} {top5:>9.4f}"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
