"""Inference: whole-volume prediction, instance post-processing, evaluation, metrics and
bioimage.io packaging of a fine-tuned model. Imports no training code (tests/test_layers.py)."""
