"""The paper's ANM setting and how its alpha carries over to a model of another width.

With ``reduce="l2"`` a block's natural update norm grows like sqrt(D), so the paper's alpha = 70, chosen
for SiT-XL/2 (D = 1152), asks for a per-feature RMS of 70 / sqrt(1152) = 2.06 there but of 8.75 at D = 64.
:func:`matched_alpha` keeps the per-feature RMS instead: alpha * sqrt(D / 1152).

    >>> round(matched_alpha(PAPER_ALPHA, 64), 2)
    16.5
"""
from __future__ import annotations

import math

__all__ = ["PAPER_HIDDEN", "PAPER_ALPHA", "PAPER_LAMBDA", "matched_alpha"]

PAPER_HIDDEN = 1152  # SiT-XL/2, the width at which the paper chose alpha
PAPER_ALPHA = 70.0
PAPER_LAMBDA = 10.0


def matched_alpha(alpha: float, hidden: int, ref_hidden: int = PAPER_HIDDEN) -> float:
    """The l2 alpha at width ``hidden`` that asks for the same per-feature RMS as ``alpha`` at ``ref_hidden``.

    Example: matched_alpha(70, 1152) == 70.0; matched_alpha(70, 64) ~= 16.5 (an RMS of 2.06 either way).
    """
    return alpha * math.sqrt(hidden / ref_hidden)
