"""tlp_jax.train.config: the ConfigDict -> TrainConfig mapping of every config in configs/."""

import importlib

import pytest
from absl import flags
from ml_collections import config_flags

from configs import default
from tlp_jax.train import config as config_lib
from tlp_jax.train import model as model_lib

CONFIGS = ("default", "demo", "gpu", "loopnest", "mtl", "test", "tlp_original")


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_build(name):
  cfg = config_lib.from_config_dict(_config(name))
  assert cfg.model.num_hardware_heads == 1  # set from the dataset by data.model_config_for
  assert cfg.batch_size % 8 == 0


def test_every_field_of_default_is_mapped_and_nested_like_the_config_dict():
  config = default.get_config()
  cfg = config_lib.from_config_dict(config)
  mapped = cfg.to_dict()
  want = config.to_dict()
  # Everything the config holds reaches the typed config with its value (tuples as tuples).
  del mapped["model"]["num_hardware_heads"]
  for k in ("sigma", "eps", "k"):
    del mapped["loss"][k]
  assert mapped == want
  assert (cfg.loss.name, cfg.loss.group_by_task, cfg.batch_order) == (
    "pairwise_log",
    True,
    "by_task",
  )
  assert (cfg.optim.optimizer, cfg.optim.schedule) == ("adamw", "warmup_cosine")
  assert cfg.deterministic_gpu_ops is True


def test_default_uses_the_aligned_attention_in_bf16_where_it_can():
  cfg = config_lib.from_config_dict(_config("default"))
  # "auto": cuDNN's fused kernel on NVIDIA GPUs in bf16 (tokens padded to a multiple of 8),
  # the padded einsum here.
  assert cfg.attention_impl == "auto"
  assert cfg.model.dtype == "auto"
  assert model_lib.resolve_attention(cfg.attention_impl, "float32", cuda=False) == "einsum_pad8"
  config = _config("default")
  config.attention_impl = "flash"
  with pytest.raises(config_lib.ConfigError, match="attention_impl"):
    config_lib.from_config_dict(config)


def test_tlp_original_is_the_original_recipe():
  cfg = config_lib.from_config_dict(_config("tlp_original"))
  assert cfg.model == model_lib.TLPConfig()  # float32, as PyTorch
  optim = cfg.optim
  assert (optim.optimizer, optim.schedule) == ("adam", "step")
  assert (optim.learning_rate, optim.weight_decay, optim.grad_clip_norm) == (7e-4, 1e-6, 0.5)
  assert (optim.step_decay_every_epochs, optim.step_decay_rate) == (50 // 3, 1.0)
  assert (cfg.batch_size, cfg.num_epochs, cfg.batch_order) == (1024, 50, "random")
  assert (cfg.loss.name, cfg.loss.group_by_task, cfg.loss.k) == ("lambdarank", False, None)
  assert (cfg.loop_tokens, cfg.matmul_precision) == ("off", "highest")
  gpu = config_lib.from_config_dict(_config("gpu")).model
  assert (gpu.seq_len, gpu.feature_dim) == (40, 20)


@pytest.mark.parametrize(
  "section, field",
  [
    ("", "learning_rate"),
    ("optim", "learnig_rate"),
    ("model", "padding_mask"),
    ("loss", "temperature"),
  ],
)
def test_a_misspelled_or_removed_field_is_an_error_naming_it(section, field):
  config = default.get_config()
  with config.unlocked():
    (config[section] if section else config)[field] = 1.0
  where = f"config.{section}" if section else "config"
  with pytest.raises(ValueError, match=rf"unknown field\(s\) \['{where}.{field}'\].*known fields"):
    config_lib.from_config_dict(config)


def test_a_missing_field_is_an_error():
  config = default.get_config().to_dict()
  del config["optim"]["warmup_epochs"]
  with pytest.raises(ValueError, match=r"missing field\(s\) \['config.optim.warmup_epochs'\]"):
    config_lib.from_config_dict(config)


@pytest.mark.parametrize(
  "field, value",
  [
    ("matmul_precision", "fp8"),
    ("batch_order", "by_net"),
    ("loop_tokens", "maybe"),
    ("data_placement", "disk"),
    ("eval_every_epochs", 0),
    ("steps_per_execution", 0),
  ],
)
def test_bad_values_are_errors_naming_the_field(field, value):
  config = default.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=f"config.{field}"):
    config_lib.from_config_dict(config)


@pytest.mark.parametrize("value", [2.5, True, "4"])
def test_steps_per_execution_must_be_an_integer(value):
  """A plain mapping is not type-checked as a ConfigDict is: the typed config checks it."""
  config = default.get_config().to_dict()
  config["steps_per_execution"] = value
  with pytest.raises(ValueError, match="config.steps_per_execution must be an integer >= 1"):
    config_lib.from_config_dict(config)


@pytest.mark.parametrize(
  "section, field, value, match",
  [
    ("optim", "optimizer", "sgdx", "unknown optimizer 'sgdx'"),
    ("optim", "schedule", "constant", "unknown schedule"),
    ("loss", "name", "listwise_log", "unknown loss"),
    ("model", "pool", "sum", "unknown field"),
    ("stream", "num_workers", -1, "config.stream.num_workers must be an integer >= 0"),
    ("stream", "workers", 2, "unknown field"),
  ],
)
def test_removed_and_unknown_options_are_errors(section, field, value, match):
  config = default.get_config()
  with config.unlocked():
    config[section][field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.from_config_dict(config)


def test_command_line_overrides_reach_the_typed_config(monkeypatch):
  argv = [
    "prog",
    f"--config={default.__file__}",
    "--config.model.ensemble_size=1",
    "--config.optim.learning_rate=0.001",
    "--config.loss.name=mse",
  ]
  monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
  fv(argv)
  cfg = config_lib.from_config_dict(fv.config)
  assert (cfg.model.ensemble_size, cfg.optim.learning_rate, cfg.loss.name) == (1, 1e-3, "mse")


@pytest.mark.parametrize(
  "value, want", [("auto", "auto"), ("4294967296", 4294967296), ("1024", 1024)]
)
def test_device_data_max_bytes_from_the_command_line(monkeypatch, value, want):
  """The field's default is "auto" (a string field): a byte count on the command line arrives
  as digits and must reach the trainer as the number."""
  argv = ["prog", f"--config={default.__file__}", f"--config.device_data_max_bytes={value}"]
  monkeypatch.setattr("sys.argv", argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
  fv(argv)
  assert config_lib.from_config_dict(fv.config).device_data_max_bytes == want


@pytest.mark.parametrize("value", ["lots", "-5", ""])
def test_a_bad_device_data_max_bytes_is_a_config_error(value):
  config = default.get_config()
  config.device_data_max_bytes = value
  with pytest.raises(config_lib.ConfigError, match="device_data_max_bytes"):
    config_lib.from_config_dict(config)


@pytest.mark.parametrize("dataset", ["epyc-9004", "xeon-emr-16c"])
def test_heads_default_to_the_datasets_hardware(dataset):
  """``--config.dataset xeon-emr-16c`` alone trains a xeon-emr-16c model."""
  from tlp_jax.train import data

  config = default.get_config()
  config.dataset = dataset
  cfg = config_lib.from_config_dict(config)
  assert cfg.hardware == ()
  assert data.head_columns([dataset], list(cfg.hardware)) == [0]
  # A joined dataset: every hardware, in its order.
  assert data.head_columns(["epyc-9004", "xeon-emr-16c"], list(cfg.hardware)) == [0, 1]


def test_config_changes_name_dotted_fields_and_skip_runtime_ones():
  old = config_lib.from_config_dict(default.get_config()).to_dict()
  config = default.get_config()
  config.optim.learning_rate = 0.5
  config.data_dir = "/elsewhere"  # where the data is: a runtime field
  config.eval_top_k = (1, 5)  # a tuple against the recorded JSON list: equal
  new = config_lib.from_config_dict(config).to_dict()
  assert config_lib.config_changes(old, new) == {"optim.learning_rate": (7e-4, 0.5)}
  assert set(config_lib.OVERRIDABLE_FIELDS) <= set(config_lib.flatten(new))
  assert set(config_lib.RUNTIME_FIELDS) <= set(config_lib.flatten(new))
