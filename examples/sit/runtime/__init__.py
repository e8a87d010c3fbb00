"""Run machinery shared by the scripts: one-line errors, atomic writes, distributed setup, checkpoints, logs, checks."""
