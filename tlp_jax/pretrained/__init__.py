"""Starter weights shipped with the package: ``<name>.npz`` exports, read through
``tlp_jax.core.pretrained`` (``available()``, ``load(name)``). The model card is in docs/TVM.md."""
