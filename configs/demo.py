"""The README demo: the default recipe, shortened to run in a few minutes on a 2-core CPU.

Same model, loss and optimizer as ``configs/default.py``; fewer epochs, a smaller batch (the
embedded sample holds ~1.8k training programs). It reads the sample's loop tokens, as the
default does. ``demo.py`` fills in ``data_dir``.
"""

from configs import default


def get_config():
  """Returns the demo configuration (epyc-9004 head, 12 epochs of batch 256)."""
  config = default.get_config()
  config.dataset = "epyc-9004"
  config.batch_size = 256
  config.eval_batch_size = 1024
  config.num_epochs = 12
  config.log_every_steps = 20
  config.steps_per_execution = 10  # divides log_every_steps (see configs/default.py)
  config.checkpoint_every_steps = 0
  return config
