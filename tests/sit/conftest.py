import sys
from pathlib import Path

# examples/sit holds flat DiT-style scripts that import their siblings by plain name.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "sit"))

import pytest  # noqa: E402


@pytest.fixture
def stub_network(monkeypatch):
    """The stub feature network (counting its calls) in place of Inception for the FID during and after training."""
    from evaluation import sample_metrics
    from fid_helpers import CountingStub

    network = CountingStub()
    monkeypatch.setattr(sample_metrics, "default_extractor", lambda device: network)
    return network


@pytest.fixture(scope="session")
def fid_ref(tmp_path_factory) -> str:
    """An 8x8 reference batch of 40 sinusoids (fid_helpers.make_reference)."""
    from fid_helpers import make_reference

    return make_reference(tmp_path_factory.mktemp("fid_ref"))


@pytest.fixture(scope="session")
def fid_runs(tmp_path_factory, fid_ref) -> dict:
    """{"plain": run folder, "fid": run folder}: 4 steps without and with --fid-every 2 (fid_helpers.train_pair)."""
    from fid_helpers import train_pair

    return train_pair(tmp_path_factory.mktemp("fid_runs"), fid_ref)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A train.py checkpoint of a tiny pixel-space SiT on 8x8 sinusoids (2 steps, EMA decay 0.5), one per test
    module (a module may define its own ``ckpt``)."""
    import train

    results = tmp_path_factory.mktemp("train")
    out = train.main(train.parse_args([
        "--data", "sinusoid", "--image-size", "8", "--data-size", "16", "--model", "SiT-N/2",
        "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--max-steps", "2",
        "--eval-every", "0", "--sample-every", "0", "--no-progress", "--ema-decay", "0.5"]))
    return out["checkpoint"]
