"""Classifier-free guidance acts on every channel of a model whose latents are not SD-VAE's 4, and on the
reference SiT's channels 0-2 for 4-channel latents (parity) or when asked (--cfg-channels reference)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import sample_ddp
import torch
from modeling.generation import describe_cfg_channels, resolve_cfg_channels
from modeling.latent_scaling import LatentScaling
from modeling.models import SiT, default_cfg_channels
from runtime.cli import UsageError
from vaes import save_tiny_vae


def guided_and_plain(channels: int, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(guided output, conditional, unconditional) of a random SiT with `channels` input channels."""
    torch.manual_seed(seed)
    model = SiT(input_size=4, patch_size=2, in_channels=channels, hidden_size=32, depth=1, num_heads=2,
                num_classes=5).eval()
    for p in model.parameters():  # adaLN-Zero starts at zero output: randomise so that guidance shows
        torch.nn.init.normal_(p, std=0.2)
    z, t, y = torch.randn(2, channels, 4, 4), torch.full((4,), 0.5), torch.tensor([1, 3, 5, 5])
    with torch.no_grad():
        cond, uncond = model(torch.cat([z, z]), t, y).chunk(2)
        out = model.forward_with_cfg(torch.cat([z, z]), t, y, cfg_scale=3.0, **kwargs)[:2]
    return out, cond, uncond


def test_a_16_channel_model_is_guided_on_every_channel_by_default() -> None:
    out, cond, uncond = guided_and_plain(16)
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
    assert (out[:, 3:] - cond[:, 3:]).abs().min() > 0  # channels 3-15 moved away from the conditional output


def test_the_reference_convention_on_request_guides_channels_0_to_2_only() -> None:
    out, cond, uncond = guided_and_plain(16, cfg_channels=resolve_cfg_channels("reference", 16))
    torch.testing.assert_close(out[:, :3], (uncond + 3.0 * (cond - uncond))[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 3:], cond[:, 3:], atol=0, rtol=0)


def test_four_channel_latents_keep_the_reference_default() -> None:
    out, cond, uncond = guided_and_plain(4)
    torch.testing.assert_close(out[:, 3], cond[:, 3], atol=0, rtol=0)  # as willisma/SiT: channel 3 unguided
    assert default_cfg_channels(4) == 3 and default_cfg_channels(16) == 16 and default_cfg_channels(1) == 1
    assert [resolve_cfg_channels(rule, 4) for rule in (None, "auto", "reference", "all", 2)] == [3, 3, 3, 4, 2]
    assert "reference SiT's convention" in describe_cfg_channels(3, 4)
    assert describe_cfg_channels(3, 16) == "channels 0-2 of 16"


@pytest.fixture(scope="module")
def latent16(tmp_path_factory) -> str:
    """A checkpoint of a SiT on the latents of a tiny 16-channel VAE (8x8 images -> 4x4 latents)."""
    root = tmp_path_factory.mktemp("latent16")
    vae = save_tiny_vae(root / "vae", latent_channels=16)
    config = dict(input_size=4, patch_size=2, in_channels=16, hidden_size=32, depth=1, num_heads=2, num_classes=5,
                  class_dropout_prob=0.1)
    state = SiT(**config).state_dict()
    torch.save({"model": state, "ema": state, "model_config": config, "latent": True, "vae": str(vae), "step": 0,
                "latent_scaling": LatentScaling(0.18215, None, 16).record()}, root / "latent16.pt")
    return str(root / "latent16.pt")


def sample16(ckpt: str, out: Path, *extra: str) -> dict:
    args = sample_ddp.parse_args(["--ckpt", ckpt, "--sample-dir", str(out), "--folder-name", "s", "--mode", "ode",
                                  "--method", "euler", "--num-steps", "1", "--num-fid-samples", "2",
                                  "--cfg-scale", "2.0", *extra])
    sample_ddp.main(args)
    return json.loads((out / "s" / "manifest.json").read_text())["settings"]


def test_sample_ddp_guides_all_16_channels_and_says_so(latent16: str, tmp_path: Path, capsys) -> None:
    assert sample16(latent16, tmp_path / "auto")["cfg_channels"] == 16
    assert "cfg 2.0 on all 16 channels" in capsys.readouterr().out
    assert sample16(latent16, tmp_path / "ref", "--cfg-channels", "reference")["cfg_channels"] == 3
    assert "cfg 2.0 on channels 0-2 of 16" in capsys.readouterr().out
    with pytest.raises(UsageError, match="--cfg-channels 17: the model has 16 channels"):
        sample16(latent16, tmp_path / "bad", "--cfg-channels", "17")
    with pytest.raises(SystemExit):
        sample_ddp.parse_args(["--ckpt", latent16, "--cfg-channels", "most"])
