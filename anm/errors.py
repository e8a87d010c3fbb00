"""The one exception type anm raises."""

from __future__ import annotations

__all__ = ["ANMError"]


class ANMError(ValueError, RuntimeError):
    """Bad input or a training setup anm cannot serve; the message always names the fix.

    It subclasses both ``ValueError`` (invalid arguments) and ``RuntimeError`` (a broken setup found
    while training, such as non-finite norms), so existing ``except`` clauses keep working.

    Example:
        >>> import anm
        >>> try:
        ...     anm.anm_loss([], alpha=-1.0)
        ... except anm.ANMError as error:
        ...     print(str(error).split(":")[0])
        alpha must be a finite number > 0
    """
