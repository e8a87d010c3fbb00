"""modeling/vae.py: loading a VAE without accelerate installed prints nothing (diffusers printed a multi-line
"install accelerate" notice on every load, on every rank)."""
from __future__ import annotations

import logging
from pathlib import Path

import diffusers.models.modeling_utils as modeling_utils
import diffusers.utils
from diffusers.models import AutoencoderKL
from modeling.vae import load_vae


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_no_accelerate_notice_without_accelerate(tmp_path: Path, monkeypatch) -> None:
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4).save_pretrained(tmp_path / "vae")
    for module in (diffusers.utils, modeling_utils):  # as if accelerate were not installed
        monkeypatch.setattr(module, "is_accelerate_available", lambda: False)
    records = Records()
    diffusers_logger = logging.getLogger("diffusers")  # diffusers' own handler prints what reaches it
    diffusers_logger.addHandler(records)
    try:
        vae = load_vae(str(tmp_path / "vae"))
    finally:
        diffusers_logger.removeHandler(records)
    assert not [m for m in records.messages if "accelerate" in m], records.messages
    assert vae.config.latent_channels == 4 and not vae.training
