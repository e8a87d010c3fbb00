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
