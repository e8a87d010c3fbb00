"""Warnings that point at the user's line, not at anm's internals."""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn(message: str) -> None:
    """``warnings.warn(message)`` attributed to the first caller outside the ``anm`` package.

    Example:
        >>> import warnings
        >>> from anm.warn import warn
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("ANM: hello")
        >>> str(caught[0].message)
        'ANM: hello'
    """
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level + 1)
