"""examples/sit/evaluation/running_stats.py: chunked statistics equal compute_stats (np.cov) of all rows."""
from __future__ import annotations

import numpy as np
import pytest
from evaluation.running_stats import RunningStats
from evaluation.statistics import compute_stats


def test_chunked_statistics_equal_np_cov_of_all_rows() -> None:
    # Non-negative, off-centre features like Inception's pool_3: a sum of squares minus a squared sum would
    # cancel badly here; the pairwise merge does not.
    rows = np.random.default_rng(0).gamma(2.0, 0.5, size=(3000, 24)).astype(np.float32) + 5
    running = RunningStats()
    for start in range(0, len(rows), 257):
        running.update(rows[start:start + 257])
    got, want = running.stats(), compute_stats(rows)
    assert got.count == want.count == 3000
    assert np.allclose(got.mu, want.mu, rtol=0, atol=1e-12)
    assert np.allclose(got.sigma, want.sigma, rtol=0, atol=1e-12)


def test_one_chunk_is_compute_stats_and_one_row_has_no_covariance() -> None:
    rows = np.random.default_rng(1).normal(size=(5, 3))
    running = RunningStats()
    running.update(rows)
    assert np.allclose(running.stats().sigma, np.cov(rows, rowvar=False), rtol=0, atol=1e-15)
    single = RunningStats()
    single.update(rows[:1])
    assert np.isnan(single.stats().sigma).all()
    with pytest.raises(ValueError, match="no features"):
        RunningStats().stats()
    with pytest.raises(ValueError, match="dims"):
        running.update(np.zeros((2, 4)))
