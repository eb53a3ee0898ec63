"""Training: augmentations, losses, the trainer."""
