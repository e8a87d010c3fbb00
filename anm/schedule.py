"""Warm-up schedule for the ANM weight."""

from __future__ import annotations

import math
import operator

import torch

from .errors import ANMError

__all__ = ["warmup_weight", "validate_step", "WARMUP_KINDS"]

WARMUP_KINDS = ("linear", "cosine")


def warmup_weight(step: int, warmup: int, kind: str = "linear") -> float:
    """Weight in [0, 1] that ramps the ANM term in over the first ``warmup`` optimizer steps.

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
    """``step`` as an int, or ``ANMError`` unless it is a whole number >= 0.

    Python and NumPy integers, whole floats and one-element integer tensors (as trainers keep their step
    counters) are accepted.
    """
    if isinstance(step, bool):
        raise ANMError(f"step must be a whole number >= 0, got {step!r}: pass the optimizer step count.")
    if isinstance(step, (int, torch.SymInt)):
        # Checked first: a step that torch.compile made dynamic (an int that changed between calls) is a
        # SymInt, which traced code sees as an int and on which the tensor test below would break the graph.
        value = step
    else:
        if hasattr(step, "numel") and callable(step.numel) and step.numel() == 1:  # a tensor
            try:
                step = step.item()
            except (RuntimeError, NotImplementedError):  # a meta tensor has no value
                raise ANMError(f"step must be a number, got a tensor without a value ({step!r}).") from None
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        try:
            value = operator.index(step)
        except TypeError:
            raise ANMError(
                f"step must be a whole number >= 0, got {step!r}: pass the optimizer step count."
            ) from None
    if value < 0:  # on a dynamic step, a guard that every later step passes: no recompile
        raise ANMError(f"step must be >= 0, got {value}: pass the optimizer step count, starting at 0.")
    return value


def validate_warmup(warmup: int, kind: str) -> None:
    """Raise ``ANMError`` unless ``warmup`` is a whole number >= 0 and ``kind`` is known."""
    if isinstance(warmup, float) and warmup.is_integer():
        warmup = int(warmup)
    try:
        whole = not isinstance(warmup, bool) and operator.index(warmup) >= 0
    except TypeError:
        whole = False
    if not whole:
        raise ANMError(f"warmup must be a whole number of steps >= 0 (0 = no warm-up), got {warmup!r}.")
    if kind not in WARMUP_KINDS:
        raise ANMError(f"unknown warm-up kind {kind!r}: use one of {', '.join(WARMUP_KINDS)}.")
