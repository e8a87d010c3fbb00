"""train.py --deterministic (runtime/determinism.py): every setting switched on before the first kernel, put back
by restore_kernels, and on the CPU (deterministic already) the same run with and without it."""
import doctest
import json
import os
from pathlib import Path

import pytest
import torch
import train
from runtime import determinism


@pytest.fixture
def restored():
    """The process-wide settings as they were before the test, whatever it switched on."""
    before = determinism.deterministic_kernels()
    determinism.restore_kernels(before)
    yield before
    determinism.restore_kernels(before)


def test_every_setting_is_switched_on_and_put_back(restored, monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = determinism.deterministic_kernels()
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == determinism.CUBLAS_WORKSPACE
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    inductor = determinism._inductor_config()
    assert inductor is None or inductor.deterministic
    determinism.restore_kernels(before)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before["cudnn"]


def test_a_users_cublas_setting_is_kept(restored, monkeypatch) -> None:
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the other setting cuBLAS documents
    determinism.deterministic_kernels()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_docstring_example(restored) -> None:
    assert doctest.testmod(determinism).failed == 0


def tiny(results: Path, *extra: str) -> list[str]:
    return ["--data", "sinusoid", "--image-size", "8", "--data-size", "16", "--model", "SiT-N/2",
            "--global-batch-size", "8", "--num-workers", "0", "--results-dir", str(results), "--max-steps", "3",
            "--eval-every", "0", "--sample-every", "0", "--no-progress", "--anm", "--anm-warmup", "1", *extra]


def test_train_with_deterministic_sets_it_up_front_and_trains_the_same_run_on_the_cpu(restored, tmp_path,
                                                                                         monkeypatch) -> None:
    on_when_built = []  # whether the settings were on when train.py built (and would compile) its model
    build_models = train.build_models

    def spy(*args, **kwargs):
        on_when_built.append(torch.are_deterministic_algorithms_enabled())
        return build_models(*args, **kwargs)

    monkeypatch.setattr(train, "build_models", spy)
    plain = train.main(train.parse_args(tiny(tmp_path / "plain")))
    fixed = train.main(train.parse_args(tiny(tmp_path / "fixed", "--deterministic")))
    assert on_when_built == [False, True]
    a = torch.load(plain["checkpoint"], weights_only=False)
    b = torch.load(fixed["checkpoint"], weights_only=False)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    args = json.loads((Path(fixed["experiment_dir"]) / "args.json").read_text())
    assert args["deterministic"] is True
