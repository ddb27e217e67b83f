"""The README demo: the default recipe, shortened to run in a few minutes on a 2-core CPU.

Same model, loss and optimizer as ``configs/default.py``; fewer epochs, a smaller batch (the
embedded sample holds ~1.8k training programs) and one network instead of the default's ensemble
of five, which costs 5x on two CPU cores (~2.5 min of training instead of ~30 s).
``demo.py`` fills in ``data_dir``.
"""

from configs import default


def get_config():
  """Returns the demo configuration (epyc-9004 head, 12 epochs of batch 256)."""
  config = default.get_config()
  config.hardware = ("epyc-9004",)
  config.dataset = "epyc-9004"
  config.batch_size = 256
  config.eval_batch_size = 1024
  config.num_epochs = 12
  config.model.ensemble_size = 1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 0
  return config
