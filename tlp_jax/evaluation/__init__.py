"""Top-k evaluation of a trained model on a built dataset, and its reports.

Modules: ``data`` (the evaluated split, NumPy), ``topk`` (score a predict function, NumPy),
``report`` (Markdown / PNG / JSON), ``run`` (load data and model, ``evaluate_model``: what
``eval.py`` runs).
"""
