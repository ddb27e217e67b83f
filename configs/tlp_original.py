"""The original TLP recipe exactly (``tlp_train.py`` defaults), no new options.

* Adam (PyTorch ``optim.Adam``: betas 0.9/0.999, eps 1e-8) with *coupled* L2 weight decay 1e-6
  (added to the clipped gradient before the Adam moments), lr 7e-4;
* ``StepLR(step_size=n_epoch // 3, gamma=1)`` -- the original's ``--optimizer default`` -- i.e. a
  constant learning rate (its ``decrease_per_17_0.5`` option is ``step_decay_rate = 0.5``);
* gradients clipped to global norm 0.5;
* LambdaRank over the whole batch (no task grouping), batch 1024, 50 epochs, shuffled every
  epoch, the last partial batch kept (here: padded with masked rows, which the loss ignores);
* TLP's attention model with its defaults (no input normalisation, one network),
  reading TLP's step tokens only (``loop_tokens="off"``, also on a dataset built with
  loop-nest tokens).
"""

from configs import default


def get_config():
  """Returns the original TLP training configuration."""
  config = default.get_config()
  config.model = default.get_model_config()
  config.loop_tokens = "off"
  config.loss.name = "lambdarank"
  config.loss.group_by_task = False
  config.batch_order = "random"
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 7e-4
  config.optim.weight_decay = 1e-6
  config.optim.grad_clip_norm = 0.5
  config.optim.schedule = "step"
  config.num_epochs = 50
  config.optim.step_decay_every_epochs = config.num_epochs // 3
  config.optim.step_decay_rate = 1.0
  config.optim.warmup_epochs = 0.0
  config.batch_size = 1024
  # PyTorch computes float32 matmuls in float32 (TF32 is off by default); so does this config.
  config.matmul_precision = "highest"
  config.eval_batch_size = 1024
  return config
