"""The default recipe on loop-nest tokens, refusing a dataset without them.

``configs/default.py`` already reads the loop-nest tokens of a dataset that has them
(``loop_tokens="auto"``); this config makes them a requirement, so a run pointed at a TLP-only
build fails at once instead of training the weaker step-only model. Either kind counts: the
replayed loop tokens of a default build (no TVM: ``python -m data_pipelines.build`` with the
tasks' skeletons; each program is then 25 step tokens of 22 values plus 40 loop tokens of 21,
assembled per batch as one ``(65, 43)`` input), or the older TVM store version, which needs TVM
(docs/ACCURACY.md says why)::

  pip install -e '.[tvm]'
  python -m data_pipelines.build --tenset_dir TENSET --data_dir ~/tlp_data_loop --loop_stores 10
  python train.py --config configs/loopnest.py --config.data_dir ~/tlp_data_loop --workdir /tmp/l

With the store version each program is 25 step tokens (22 values, TLP's llvm crop) plus 10 store
tokens (164 values), as one ``(35, 186)`` input whose two token kinds use disjoint columns
(``features.append_loop_features``). The model is TLP's; ``tlp_jax.train.data.model_config_for``
sizes its input from the dataset.
"""

from configs import default

LOOP_STORES = 10  # the build's --loop_stores used in this project's runs
LOOP_DIM = 164    # Ansor's per-store feature width in TVM 0.19


def get_config():
  """Returns the default configuration, requiring TLP + loop-nest features."""
  config = default.get_config()
  config.loop_tokens = "required"
  return config
