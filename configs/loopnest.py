"""The default recipe, refusing a dataset without loop tokens.

``configs/default.py`` already reads the replayed loop tokens of a dataset that has them
(``loop_tokens="auto"``); this config makes them a requirement, so a run pointed at a TLP-only
build fails at once, naming the command that extracts the tasks' skeletons, instead of training
the weaker step-only model. Each program is then 25 step tokens of 22 values plus the loop tokens
(``tlp_jax.core.loop_tokens``), assembled per batch into one input whose two token kinds use
disjoint columns; ``tlp_jax.train.data.model_config_for`` sizes the model's input from the
dataset. No TVM is needed once the skeletons exist::

  pip install -e '.[tvm]'   # once per TenSet dir, for the skeletons only
  python -m tlp_jax.tvm.skeleton_extract --tenset_dir TENSET
  python -m data_pipelines.build --tenset_dir TENSET --data_dir ~/tlp_data --loop_tokens on
  python train.py --config configs/loopnest.py --config.data_dir ~/tlp_data --workdir /tmp/l
"""

from configs import default


def get_config():
  """Returns the default configuration, requiring the dataset's loop tokens."""
  config = default.get_config()
  config.loop_tokens = "required"
  return config
