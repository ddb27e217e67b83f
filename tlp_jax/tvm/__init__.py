"""Everything that needs TVM: skeleton extraction, the tuner cost model, collection and the
XGBoost baseline. Imported only by code that needs TVM (tests/test_layering.py)."""
