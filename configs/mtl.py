"""MTL-TLP: one shared trunk, one decoder head per hardware, target hardware first.

The target here is ``xeon-emr-16c`` (tenset-mini's "new hardware with little data"), helped by
``epyc-9004``'s labels. For a transfer experiment with only N target labels, set
``--config.few_shot.num_labels=N`` (or ``few_shot.fraction``); MTL-TLP's ``--data_cnt`` is
``num_labels = data_cnt * 1000 * 0.9``. The loss is the sum of the heads' losses, as in
``mtl_tlp_train.py``.
"""

from configs import default


def get_config():
  """Returns the multi-task (per-hardware heads) training configuration."""
  config = default.get_config()
  config.dataset = "all"  # programs joined across hardware: one row, one label per hardware
  config.hardware = ("xeon-emr-16c", "epyc-9004")
  config.few_shot.num_labels = -1
  config.few_shot.fraction = 1.0
  return config
