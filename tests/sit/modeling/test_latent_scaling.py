"""modeling/latent_scaling.py and the VAE round trip of modeling/vae.py with VAEs whose factors are not SD's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from modeling.latent_scaling import (  # noqa: E402
    SD_SCALING,
    LatentScaling,
    check_same,
    from_record,
    of_checkpoint,
    of_vae,
)
from modeling.vae import decode_to_uint8, encode_images, load_vae  # noqa: E402
from runtime.cli import UsageError  # noqa: E402
from vaes import save_tiny_vae  # noqa: E402


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vaes")
    return dict(
        odd=save_tiny_vae(root / "odd", scaling_factor=0.887, shift_factor=0.1),
        wide=save_tiny_vae(root / "wide", latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        sd=save_tiny_vae(root / "sd"),
    )


@pytest.mark.parametrize("name,expected", [("odd", LatentScaling(0.887, 0.1, 4)),
                                           ("wide", LatentScaling(1.5305, 0.0609, 16)),
                                           ("sd", SD_SCALING)])
def test_factors_come_from_the_vae_config(vaes, name: str, expected: LatentScaling) -> None:
    assert of_vae(load_vae(str(vaes[name]))) == expected


@pytest.mark.parametrize("name", ["odd", "wide"])
def test_round_trip_equals_the_vae_with_its_own_factors(vaes, name: str) -> None:
    """encode -> decode through our code = vae.decode(vae.encode(x)): the factors cancel exactly as diffusers'."""
    vae = load_vae(str(vaes[name]))
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        want = to_uint8(vae.decode(mean).sample)
        z = encode_images(vae, x, sample=False)
    scaling = of_vae(vae)
    torch.testing.assert_close(z, (mean - scaling.shift_factor) * scaling.scaling_factor)
    assert z.shape[1] == scaling.latent_channels
    got = decode_to_uint8(z, vae)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float rounding of z / s + shift only
    wrong = decode_to_uint8(z, vae, scaling=SD_SCALING)  # what the scripts did before: z / 0.18215
    assert np.abs(wrong.astype(int) - want.astype(int)).mean() > 2 * np.abs(got.astype(int) - want.astype(int)).mean()


def test_posterior_samples_use_the_generator_and_the_factors(vaes) -> None:
    vae = load_vae(str(vaes["odd"]))
    x = torch.zeros(2, 3, 8, 8)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    z = encode_images(vae, x, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, (raw - 0.1) * 0.887)


def test_records_round_trip_and_old_files_assume_sd() -> None:
    scaling = LatentScaling(0.13025, None, 4)
    assert from_record(scaling.record(), 4) == (scaling, False)
    assert from_record(None, 4) == (SD_SCALING, True)
    assert from_record({"scaling_factor": 0.887}, 4) == (LatentScaling(0.887, None, 4), True)  # old meta.json
    assert of_checkpoint({"latent": False}, 3) == (None, False)
    assert of_checkpoint({"latent": True, "vae": "x"}, 4) == (SD_SCALING, True)  # from before the record
    saved = {"latent": True, "latent_scaling": LatentScaling(1.5305, 0.0609, 16).record()}
    assert of_checkpoint(saved, 16) == (LatentScaling(1.5305, 0.0609, 16), False)


@pytest.mark.parametrize("other,word", [(LatentScaling(0.18215, None, 16), "channels"),
                                        (LatentScaling(0.13025, None, 4), "scaling"),
                                        (LatentScaling(0.18215, 0.1, 4), "shift")])
def test_disagreeing_factors_are_one_line(other: LatentScaling, word: str) -> None:
    check_same(SD_SCALING, LatentScaling(0.18215, 0.0, 4), "a", "b", "fix")  # no shift = a shift of 0
    with pytest.raises(UsageError, match=word) as error:
        check_same(SD_SCALING, other, "checkpoint c.pt", "--vae v", "pass the right one")
    assert "\n" not in str(error.value) and "pass the right one" in str(error.value)


def test_per_channel_normalisation_is_refused(tmp_path: Path) -> None:
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    with pytest.raises(UsageError, match="latents_mean"):
        of_vae(vae)


def test_resuming_a_checkpoint_from_before_the_record() -> None:
    from modeling.latent_scaling import check_resume

    latents = {"latent": True, "args": {"data": "latents"}, "model_config": {"in_channels": 4}}
    check_resume(latents, "old.pt", LatentScaling(0.887, None, 4))  # meta.json's factor, no shift: as then
    with pytest.raises(UsageError, match="shift None vs 0.1"):
        check_resume(latents, "old.pt", LatentScaling(0.887, 0.1, 4))
    images = {"latent": True, "args": {"data": "imagenet"}}
    check_resume(images, "old.pt", SD_SCALING)
    with pytest.raises(UsageError, match=r"old.pt \(from before the record: scaling 0.18215.*scaling 0.18215 vs "
                                         r"0.13025"):
        check_resume(images, "old.pt", LatentScaling(0.13025, None, 4))
