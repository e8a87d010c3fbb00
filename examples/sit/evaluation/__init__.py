"""What the scripts measure: FID-style metrics, the sinusoid metric, held-out FM loss and norms, the demo's report."""
