"""TLP on GPU (cuda) records: TenSet's 40 x 20 feature crop, otherwise the default recipe."""

from configs import default


def get_config():
  """Returns the GPU (cuda, crop 40 x 20) training configuration."""
  config = default.get_config()
  config.dataset = "t4"
  config.model.seq_len = 40
  config.model.feature_dim = 20
  return config
