"""The reference SiT's sampler flags in sample.py and sample_ddp.py: each reaches the sampler, dopri5 runs, a
combination that would be ignored is one line, and sample_ddp.py's manifest tells runs apart by them."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sample
import sample_ddp
import torch
from modeling import samplers
from modeling.models import SiT
from runtime.cli import UsageError
from runtime.sampling_cli import resolve_sampler

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"
CONFIG = dict(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A pixel-space checkpoint in train.py's format."""
    torch.manual_seed(0)
    model = SiT(**CONFIG)
    path = tmp_path_factory.mktemp("flags") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "model_config": CONFIG, "latent": False,
                "vae": None, "step": 2, "args": {"path_type": "Linear", "prediction": "velocity"}}, path)
    return str(path)


@pytest.fixture
def spy(monkeypatch) -> list[tuple[str, dict]]:
    """Every Sampler.sample_* call: (name, keyword arguments)."""
    calls: list[tuple[str, dict]] = []
    for name in ("sample_ode", "sample_ode_adaptive", "sample_sde"):
        original = getattr(samplers.Sampler, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            assert not args, "the scripts pass the sampler's options by name"
            calls.append((_name, kwargs))
            return _original(self, **kwargs)

        monkeypatch.setattr(samplers.Sampler, name, wrapper)
    return calls


def run_sample(ckpt: str, out: Path, *flags: str) -> None:
    sample.main(sample.parse_args(["--ckpt", ckpt, "--num-samples", "2", "--out", str(out), *flags]))


def run_ddp(ckpt: str, sample_dir: Path, *flags: str, name: str | None = "s") -> str:
    folder = ["--folder-name", name] if name else []
    return sample_ddp.main(sample_ddp.parse_args(["--ckpt", ckpt, "--sample-dir", str(sample_dir), *folder,
                                                  "--num-fid-samples", "2", "--per-proc-batch-size", "2", *flags]))


SDE_FLAGS = ["--mode", "sde", "--sampling-method", "Heun", "--num-steps", "3", "--diffusion-form", "linear",
             "--diffusion-norm", "0.5", "--last-step", "Tweedie", "--last-step-size", "0.1"]
SDE_KWARGS = dict(num_steps=3, method="heun", diffusion_form="linear", diffusion_norm=0.5, last_step="Tweedie",
                  last_step_size=0.1)
DOPRI = ["--mode", "ode", "--sampling-method", "dopri5", "--atol", "1e-3", "--rtol", "1e-2"]


def test_every_sde_flag_reaches_the_sampler(ckpt: str, tmp_path: Path, spy) -> None:
    run_sample(ckpt, tmp_path / "a.png", *SDE_FLAGS)
    run_ddp(ckpt, tmp_path / "d", *SDE_FLAGS)
    assert spy == [("sample_sde", SDE_KWARGS)] * 2


def test_the_reference_defaults(ckpt: str, tmp_path: Path, spy) -> None:
    run_sample(ckpt, tmp_path / "a.png", "--mode", "sde", "--num-steps", "2")
    run_sample(ckpt, tmp_path / "b.png", "--mode", "sde", "--num-steps", "2", "--last-step", "None")
    run_ddp(ckpt, tmp_path / "d", "--num-steps", "2")  # sample_ddp.py: SDE Euler, as the reference
    sde = dict(num_steps=2, diffusion_form="sigma", diffusion_norm=1.0)
    assert spy == [("sample_sde", dict(sde, method="heun", last_step="Mean", last_step_size=0.04)),
                   ("sample_sde", dict(sde, method="heun", last_step=None, last_step_size=0.04)),  # unused
                   ("sample_sde", dict(sde, method="euler", last_step="Mean", last_step_size=0.04))]


def test_dopri5_reaches_torchdiffeq_and_runs(ckpt: str, tmp_path: Path, spy) -> None:
    pytest.importorskip("torchdiffeq")
    run_sample(ckpt, tmp_path / "a.png", *DOPRI)
    run_sample(ckpt, tmp_path / "b.png", "--mode", "ode", "--sampling-method", "dopri5")
    npz = run_ddp(ckpt, tmp_path / "d", *DOPRI)
    assert spy == [("sample_ode_adaptive", dict(method="dopri5", atol=1e-3, rtol=1e-2)),
                   ("sample_ode_adaptive", dict(method="dopri5", atol=1e-6, rtol=1e-3)),
                   ("sample_ode_adaptive", dict(method="dopri5", atol=1e-3, rtol=1e-2))]
    with np.load(npz) as f:
        assert f["arr_0"].shape == (2, 8, 8, 3) and len({f["arr_0"][0].tobytes(), f["arr_0"][1].tobytes()}) == 2
    settings = json.loads((tmp_path / "d" / "s" / "manifest.json").read_text())["settings"]
    # dopri5's steps follow the error of the whole batch: the batch size changes the images, so it is recorded.
    assert (settings["method"], settings["num_steps"], settings["sampling_atol"], settings["sampling_rtol"],
            settings["adaptive_batch_size"]) == ("dopri5", None, 1e-3, 1e-2, 2)


def test_old_flags_still_work(ckpt: str, tmp_path: Path, spy) -> None:
    run_sample(ckpt, tmp_path / "a.png", "--mode", "ode", "--method", "euler", "--num-steps", "2")
    run_sample(ckpt, tmp_path / "b.png", "--num-steps", "2")
    run_sample(ckpt, tmp_path / "c.png", "--method", "euler", "--sampling-method", "Euler", "--num-steps", "2")
    assert spy == [("sample_ode", dict(num_steps=2, method="euler")), ("sample_ode", dict(num_steps=2, method="heun")),
                   ("sample_ode", dict(num_steps=2, method="euler"))]


@pytest.mark.parametrize("flags,message", [
    (["--atol", "1e-4"], "--atol only applies to the adaptive ODE solvers"),
    (["--mode", "sde", "--rtol", "1e-4"], "--rtol only applies to the adaptive ODE solvers"),
    (["--sampling-method", "dopri5", "--num-steps", "10"], "--num-steps: dopri5 chooses its own steps"),
    (["--diffusion-form", "SBDM"], "--diffusion-form only applies to --mode sde"),
    (["--last-step", "Euler"], "--last-step only applies to --mode sde"),
    (["--mode", "sde", "--sampling-method", "dopri5"], "--sampling-method dopri5 is an adaptive ODE solver"),
    (["--sampling-method", "rk4"], "--sampling-method rk4: --mode ode takes one of"),
    (["--method", "euler", "--sampling-method", "heun"], "disagree: give one of them"),
    (["--mode", "sde", "--last-step", "None", "--last-step-size", "0.1"], "--last-step-size is ignored"),
    (["--mode", "sde", "--last-step-size", "0"], "--last-step-size must be in (0, 1)"),
    (["--mode", "sde", "--diffusion-norm", "nan"], "--diffusion-norm must be >= 0 and finite"),
    (["--sampling-method", "dopri5", "--atol", "0"], "--atol must be > 0 and finite"),
    (["--mode", "sde", "--num-steps", "1"], "--num-steps must be >= 2 for --mode sde"),
])
@pytest.mark.parametrize("script", [sample, sample_ddp])
def test_combinations_that_would_be_ignored_are_refused(script, flags: list[str], message: str) -> None:
    mode = [] if "--mode" in flags else ["--mode", "ode"]  # the scripts' default modes differ
    args = script.parse_args(["--ckpt", "x.pt", *mode, *flags])
    with pytest.raises(UsageError) as error:
        resolve_sampler(args, dict(ode=125, sde=250))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_singular_sde_is_refused_before_any_file(ckpt: str, tmp_path: Path) -> None:
    flags = ["--mode", "sde", "--sampling-method", "Heun", "--diffusion-form", "constant", "--last-step", "None"]
    with pytest.raises(UsageError, match="score"):
        run_sample(ckpt, tmp_path / "a.png", *flags)
    with pytest.raises(UsageError, match="score"):
        run_ddp(ckpt, tmp_path / "d", *flags)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("script,flags", [("sample.py", ["--atol", "1e-4"]),
                                          ("sample_ddp.py", ["--mode", "ode", "--diffusion-norm", "2"])])
def test_refusals_are_one_line_from_the_command_line(ckpt: str, tmp_path: Path, script: str, flags) -> None:
    proc = subprocess.run([sys.executable, str(SIT_DIR / script), "--ckpt", ckpt, *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_manifest_refuses_another_sampler_option_and_reads_old_manifests(ckpt: str, tmp_path: Path) -> None:
    base = ["--mode", "sde", "--num-steps", "3"]
    run_ddp(ckpt, tmp_path, *base)
    with pytest.raises(UsageError, match=r"diffusion_norm 1.0 there, 0.5 now"):
        run_ddp(ckpt, tmp_path, *base, "--diffusion-norm", "0.5")
    with pytest.raises(UsageError, match=r"last_step 'Mean' there, 'Euler' now"):
        run_ddp(ckpt, tmp_path, *base, "--last-step", "Euler")
    # A manifest written before these settings existed: the same command still resumes it.
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    later = sample_ddp.later_setting_defaults(manifest["settings"])
    manifest["settings"] = {k: v for k, v in manifest["settings"].items() if k not in later}
    path.write_text(json.dumps(manifest))
    run_ddp(ckpt, tmp_path, *base)
    with pytest.raises(UsageError, match=r"diffusion_form 'sigma' there, 'linear' now"):
        run_ddp(ckpt, tmp_path, *base, "--diffusion-form", "linear")


def test_default_folder_names_are_those_of_before(ckpt: str, tmp_path: Path) -> None:
    """The settings added later enter the digest only when they differ from what the scripts did before."""
    args = sample_ddp.parse_args(["--ckpt", ckpt, "--num-steps", "3"])
    sampler = sample_ddp.check_args(args)
    settings = sample_ddp.run_settings(args, dict(official=False, latent=False, vae=None,
                                                  transport=dict(path_type="Linear", prediction="velocity")),
                                       1.0, 3, torch.device("cpu"), "0" * 64, sampler, None)
    later = sample_ddp.later_setting_defaults(settings)
    before = {k: v for k, v in settings.items() if k not in later}
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:8]
    assert sample_ddp.default_folder_name(args, None, settings).endswith(digest)
    changed = dict(settings, diffusion_norm=0.5)
    assert not sample_ddp.default_folder_name(args, None, changed).endswith(digest)


def test_dopri5_without_torchdiffeq_is_one_line(ckpt: str, tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_torchdiffeq(name, *args, **kwargs):
        if name.startswith("torchdiffeq"):
            raise ImportError("No module named 'torchdiffeq'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchdiffeq)
    with pytest.raises(UsageError, match="pip install torchdiffeq"):
        run_sample(ckpt, tmp_path / "a.png", "--sampling-method", "dopri5")
    assert not (tmp_path / "a.png").exists()
