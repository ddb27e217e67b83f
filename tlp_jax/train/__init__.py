"""The trainer (JAX): config mapping, model, losses, optimizer, batching, steps, checkpoints,
the training loop and export to the NumPy format."""
