"""The ablation study behind ablate.py: budgets and arms, lock-step training, records, report, plots."""
