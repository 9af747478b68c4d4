"""Segmentation heads, few-label fine-tuning, inference, metrics and benchmarks."""
