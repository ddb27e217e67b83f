"""The default recipe on the "loop" feature version: TLP step tokens plus loop-nest tokens.

Needs a dataset built with loop-nest store features (Ansor's per-store vectors, computed with
TVM; docs/ACCURACY.md says why)::

  pip install -e '.[tvm]'
  python -m data_pipelines.build --tenset_dir TENSET --data_dir ~/tlp_data_loop --loop_stores 10
  python train.py --config configs/loopnest.py --config.data_dir ~/tlp_data_loop --workdir /tmp/l

Each program is then 25 step tokens (22 values, TLP's llvm crop) plus 10 store tokens (164
values), as one ``(35, 186)`` input whose two token kinds use disjoint columns
(``features.append_loop_features``). The model is TLP's, with its input sized to match; train_lib
refuses a model that would crop the store tokens away.
"""

from configs import default

LOOP_STORES = 10  # the build's --loop_stores
LOOP_DIM = 164    # Ansor's per-store feature width in TVM 0.19


def get_config():
  """Returns the default configuration sized for TLP + loop-nest features."""
  config = default.get_config()
  steps, width = config.model.seq_len, config.model.feature_dim
  config.model.seq_len = steps + LOOP_STORES
  config.model.feature_dim = width + LOOP_DIM
  return config
