"""Warm-up schedule for the ANM weight."""

from __future__ import annotations

import math

from .errors import ANMError

__all__ = ["warmup_weight", "validate_step", "WARMUP_KINDS"]

WARMUP_KINDS = ("linear", "cosine")


def warmup_weight(step: int, warmup: int, kind: str = "linear") -> float:
    """Weight in [0, 1] that ramps the ANM term in over the first ``warmup`` steps.

    ``linear`` rises as ``step / warmup``; ``cosine`` as ``(1 - cos(pi * step / warmup)) / 2``. Both start
    at exactly 0 at step 0, reach 1 at ``step == warmup`` and stay there. ``warmup=0`` means no warm-up
    (always 1).

    Example:
        >>> from anm import warmup_weight
        >>> warmup_weight(500, warmup=2000)
        0.25
        >>> warmup_weight(5000, warmup=2000), warmup_weight(0, warmup=0)
        (1.0, 1.0)
    """
    step = validate_step(step)
    validate_warmup(warmup, kind)
    if warmup == 0 or step >= warmup:
        return 1.0
    progress = step / warmup
    if kind == "linear":
        return progress
    return 0.5 * (1.0 - math.cos(math.pi * progress))


def validate_step(step: object) -> int:
    """``step`` as an int, or ``ANMError`` unless it is a whole number >= 0 (a tensor of one is fine)."""
    if hasattr(step, "item") and getattr(step, "numel", lambda: 0)() == 1:  # a 0-dim tensor (HF, Lightning)
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int) and not (isinstance(step, float) and step.is_integer()):
        raise ANMError(f"step must be a whole number >= 0, got {step!r}: pass the optimizer step count.")
    if step < 0:
        raise ANMError(f"step must be >= 0, got {step}: pass the optimizer step count, starting at 0.")
    return int(step)


def validate_warmup(warmup: int, kind: str) -> None:
    """Raise ``ANMError`` unless ``warmup`` is a whole number >= 0 and ``kind`` is known."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ANMError(f"warmup must be a whole number of steps >= 0 (0 = no warm-up), got {warmup!r}.")
    if kind not in WARMUP_KINDS:
        raise ANMError(f"unknown warm-up kind {kind!r}: use one of {', '.join(WARMUP_KINDS)}.")
