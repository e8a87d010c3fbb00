"""How a VAE's latents are scaled for the model, as diffusers does it: the record that goes with every latent.

diffusers convention (``AutoencoderKL.config``): the model sees ``z = (latent - shift_factor) * scaling_factor``
and the VAE decodes ``z / scaling_factor + shift_factor``; ``shift_factor`` may be None or absent (no shift).
SD 1.x/2.x VAEs use 0.18215 and no shift, SDXL 0.13025, SD3 (16 channels) 1.5305 with shift 0.0609.

A :class:`LatentScaling` is recorded in train.py's checkpoints and extract_latents.py's meta.json, so that the
latents a model was trained on are decoded with the same factors, and a VAE that disagrees is refused. Files
written before the record existed are read as the scripts wrote them then (:func:`from_record` says when it
assumed): no shift, SD's 0.18215 for --data imagenet and official checkpoints, meta.json's scaling_factor
for --data latents (:func:`before_the_record`).

    >>> scaling = LatentScaling(0.887, 0.1, 4)
    >>> latent = torch.ones(1, 4, 2, 2)
    >>> torch.allclose(scaling.to_vae(scaling.from_vae(latent)), latent)
    True
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from data.latents import LATENT_SCALE
from runtime.cli import UsageError

__all__ = ["LatentScaling", "SD_SCALING", "of_vae", "from_record", "differences", "check_same", "of_checkpoint",
           "before_the_record", "trained_on", "check_resume"]


@dataclass(frozen=True)
class LatentScaling:
    """The scaling and shift factors of a VAE's latents and their channel count."""

    scaling_factor: float
    shift_factor: float | None
    latent_channels: int

    def from_vae(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE latent (a posterior sample or mean) -> what the model sees."""
        shifted = latent if self.shift_factor is None else latent - self.shift_factor
        return shifted * self.scaling_factor

    def to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """What the model sees -> the VAE decoder's input."""
        latent = z / self.scaling_factor
        return latent if self.shift_factor is None else latent + self.shift_factor

    def record(self) -> dict[str, Any]:
        """JSON- and weights_only-safe dict (checkpoints, meta.json, manifests)."""
        return dict(scaling_factor=self.scaling_factor, shift_factor=self.shift_factor,
                    latent_channels=self.latent_channels)

    def describe(self) -> str:
        """'scaling 0.18215, no shift, 4 channels'."""
        shift = "no shift" if self.shift_factor is None else f"shift {self.shift_factor:g}"
        return f"scaling {self.scaling_factor:g}, {shift}, {self.latent_channels} channels"


SD_SCALING = LatentScaling(LATENT_SCALE, None, 4)  # SD-VAE latents: DiT, SiT and the official checkpoints


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def of_vae(vae) -> LatentScaling:
    """The factors a diffusers VAE's config declares (a config without scaling_factor: SD's 0.18215). A config
    with per-channel latents_mean / latents_std (a normalisation some pipelines apply instead) is refused
    rather than half-applied."""
    config = vae.config
    for key in ("latents_mean", "latents_std"):
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if value is not None:
            raise UsageError(f"this VAE's config sets {key} (a per-channel latent normalisation); the SiT scripts "
                             "apply scaling_factor / shift_factor only: use a VAE without it")
    scaling = config.get("scaling_factor") if isinstance(config, Mapping) else getattr(config, "scaling_factor", None)
    shift = config.get("shift_factor") if isinstance(config, Mapping) else getattr(config, "shift_factor", None)
    channels = config.get("latent_channels") if isinstance(config, Mapping) else config.latent_channels
    return LatentScaling(LATENT_SCALE if scaling is None else float(scaling), _optional_float(shift), int(channels))


def from_record(record: Mapping | None, channels: int) -> tuple[LatentScaling, bool]:
    """(factors, assumed) from a checkpoint's or meta.json's record. A missing record, or a meta.json from
    before the shift was recorded, gives SD's 0.18215 / no shift with assumed=True; channels fills a
    record without its channel count."""
    record = record or {}
    assumed = "scaling_factor" not in record or "shift_factor" not in record
    scaling = record.get("scaling_factor")
    return LatentScaling(LATENT_SCALE if scaling is None else float(scaling),
                         _optional_float(record.get("shift_factor")),
                         int(record.get("latent_channels") or channels)), assumed


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return (a or 0.0) == (b or 0.0)  # None and 0.0 shift the same
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def differences(expected: LatentScaling, actual: LatentScaling) -> list[str]:
    """'scaling 0.18215 vs 0.13025'-style entries for every factor that differs."""
    out = []
    if expected.latent_channels != actual.latent_channels:
        out.append(f"{expected.latent_channels} vs {actual.latent_channels} latent channels")
    if not _close(expected.scaling_factor, actual.scaling_factor):
        out.append(f"scaling {expected.scaling_factor:g} vs {actual.scaling_factor:g}")
    if not _close(expected.shift_factor, actual.shift_factor):
        out.append(f"shift {expected.shift_factor} vs {actual.shift_factor}")
    return out


def check_same(expected: LatentScaling, actual: LatentScaling, expected_what: str, actual_what: str,
               fix: str) -> None:
    """UsageError in one line when the latents of expected_what and the VAE (or data) of actual_what differ."""
    found = differences(expected, actual)
    if found:
        raise UsageError(f"{expected_what} and {actual_what} disagree ({'; '.join(found)}): {fix}")


def of_checkpoint(state: Mapping, channels: int) -> tuple[LatentScaling | None, bool]:
    """(factors, assumed) of a train.py checkpoint's latents; (None, False) for a pixel-space one. A latent
    checkpoint from before the record is assumed to hold SD-VAE latents (assumed=True)."""
    if not state.get("latent"):
        return None, False
    return from_record(state.get("latent_scaling"), channels)


def before_the_record(trained_on: str | None, reference: LatentScaling, channels: int) -> LatentScaling:
    """The factors train.py applied before checkpoints recorded them: --data latents scaled by meta.json's
    scaling_factor (the extracting VAE's config value: reference's, for the same VAE or latents) and never
    shifted; --data imagenet and the official checkpoints by SD's 0.18215, whatever the VAE."""
    if trained_on == "latents":
        return LatentScaling(reference.scaling_factor, None, channels)
    return LatentScaling(LATENT_SCALE, None, channels)


def trained_on(state: Mapping) -> str | None:
    """The --data of a train.py checkpoint (None if it does not say)."""
    run_args = state.get("args") or {}
    return (run_args if isinstance(run_args, Mapping) else vars(run_args)).get("data")


def check_resume(checkpoint: Mapping, path: str, scaling: LatentScaling | None) -> None:
    """A resumed run must see latents with the factors it was trained on (another VAE, or latents of one)."""
    saved, assumed = of_checkpoint(checkpoint, scaling.latent_channels if scaling else 0)
    if saved is None or scaling is None:
        return
    what = f"checkpoint {path}"
    fix = "resume with the --vae (or latents) it was trained on, or start a new --exp-name"
    if assumed:
        data = trained_on(checkpoint)
        saved = before_the_record(data, scaling, saved.latent_channels)
        what += f" (from before the record: {saved.describe()}, as train.py applied then)"
        if data != "latents" and saved.latent_channels == scaling.latent_channels:
            # train.py then scaled every VAE's latents by 0.18215: a VAE declaring another factor was trained
            # with 0.18215 all the same, so resuming with that very VAE cannot match, and no flag makes it.
            fix = ("the run predates the record and was trained with scaling 0.18215 and no shift whatever its "
                   "VAE declares, which no resume reproduces with this VAE: start a new --exp-name (only a VAE "
                   "whose config gives 0.18215, no shift, resumes it, if it is the one the run was trained with)")
    check_same(saved, scaling, what, "this run's data", fix)
