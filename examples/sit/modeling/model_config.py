"""The SiT configuration of train.py's flags: the named size (SiT-<size>/<patch>) with --depth / --hidden-size /
--num-heads overrides, checked against the data's shape.

    >>> parse_model_name("SiT-XL/2")
    ('XL', 2)
"""
from __future__ import annotations

import argparse
import re

from runtime.cli import UsageError

from modeling.models import SIT_SIZES

__all__ = ["parse_model_name", "model_config"]


def parse_model_name(name: str) -> tuple[str, int]:
    """'SiT-XL/2' -> ('XL', 2)."""
    match = re.fullmatch(r"SiT-(\w+)/(\d+)", name)
    if match is None or match.group(1) not in SIT_SIZES or int(match.group(2)) <= 0:
        raise UsageError(f"unknown model {name!r}: use SiT-<{'|'.join(SIT_SIZES)}>/<patch size>, e.g. SiT-XL/2")
    return match.group(1), int(match.group(2))


def model_config(args: argparse.Namespace, in_channels: int, input_size: int, num_classes: int) -> dict:
    """Keyword arguments for SiT(...): the named size, with --depth/--hidden-size/--num-heads overrides."""
    size, patch_size = parse_model_name(args.model)
    depth, hidden_size, num_heads = SIT_SIZES[size]
    config = dict(
        input_size=input_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=args.hidden_size or hidden_size,
        depth=args.depth or depth,
        num_heads=args.num_heads or num_heads,
        num_classes=num_classes,
        class_dropout_prob=args.class_dropout_prob,
        learn_sigma=False,  # velocity only; official learn_sigma checkpoints are sliced on load
    )
    if input_size % patch_size:
        raise UsageError(f"{args.model}: the {input_size}x{input_size} input does not split into {patch_size}x"
                         f"{patch_size} patches; choose a patch size dividing {input_size}")
    if config["hidden_size"] % config["num_heads"]:
        raise UsageError(f"hidden size {config['hidden_size']} is not divisible by {config['num_heads']} heads: "
                         "change --hidden-size or --num-heads")
    if config["hidden_size"] % 4:
        raise UsageError(f"hidden size {config['hidden_size']} is not a multiple of 4, which the 2-D sin-cos "
                         "position embedding needs: change --hidden-size")
    return config
