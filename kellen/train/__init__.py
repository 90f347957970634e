"""Training: optimizers, LR schedules, puzzle-embedding sign-SGD and EMA."""
