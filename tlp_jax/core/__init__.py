"""NumPy-only core: TenSet layout, records and labels, network info, features, metrics, export
format and predictor. Never imports JAX, TVM or TensorFlow (tests/test_layering.py)."""
