"""Warnings that point at the user's line, not at anm's internals."""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# A warning raised inside a forward hook has torch.nn's call machinery between anm and the user's line.
_TORCH_NN_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "nn")


def warn(message: str) -> None:
    """``warnings.warn(message)`` attributed to the first caller outside ``anm`` and ``torch.nn``.

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
    while frame is not None and _internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level + 1)


def _internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return os.path.dirname(path) == _PACKAGE_DIR or path.startswith(_TORCH_NN_DIR + os.sep)
