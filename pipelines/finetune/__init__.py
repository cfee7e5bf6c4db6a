"""Sparse fine-tuning helpers: losses, mask enforcement and the training loop behind the finetune stage."""
