"""Aetheris training pipeline: data, tokenizer training, the training loop, checkpoints, plots."""
