"""Top-k evaluation of a trained model on a built dataset, and its reports."""
