"""tlp-jax: a JAX/Flax reimplementation of the TLP tensor-program cost model.

Importing this package is cheap on purpose: it pulls in neither JAX nor TensorFlow,
so the pure-NumPy predictor (``tlp_jax.core.predictor``) and the featurizer
(``tlp_jax.core.features``) can be used inside a tuner process that has only NumPy.
Import submodules explicitly, e.g. ``from tlp_jax.train import loop``.
"""

__version__ = "0.1.0"
