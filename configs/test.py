"""Tiny, seconds-fast config for tests and smoke runs on CPU (``data_dir``: a built dataset)."""

from configs import default


def get_config():
  """Returns a tiny configuration: small model, small batch, three short epochs."""
  config = default.get_config()
  config.hardware = ()
  config.model.encoder_dims = (16, 16, 32, 32)
  config.model.attention_heads = 4
  config.model.res_blocks = 1
  config.model.decoder_dims = (32, 16, 1)
  config.model.ensemble_size = 1  # one tiny network; the ensemble tests set their own size
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 3
  config.optim.warmup_epochs = 0.5
  config.optim.learning_rate = 1e-3
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  # Divides both: runs that keep their data on the device take multi-step calls (the resume
  # tests included).
  config.steps_per_execution = 5
  config.data_placement = "device"
  return config
