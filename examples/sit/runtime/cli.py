"""How every script of the example ends: an expected error is one line on stderr and exit code 2.

Each script's last lines are ``if __name__ == "__main__": run(main, parse_args)``. ``main`` raises
:class:`UsageError` (or the library's ``anm.ANMError``) for anything the user can fix — a bad flag, a
missing or corrupt file, a full disk — and :func:`run` prints ``<script>: error: <message>`` without a
traceback. Any other exception is a bug and keeps its traceback.

Under ``torchrun`` every rank usually meets the same error. Only global rank 0 prints the line; every rank
writes its message to the error file torchrun gives it (``TORCHELASTIC_ERROR_FILE``), so torchrun's closing
report shows the message as the failure's "traceback" instead of a link to its documentation, and an error
met by another rank alone is not lost. That report itself (a ``ChildFailedError`` traceback of torchrun's
own frames) is printed by torchrun whenever a worker exits non-zero; no worker can prevent it.

Example:
    >>> from cli import UsageError
    >>> str(UsageError("--max-steps must be > 0, got 0"))
    '--max-steps must be > 0, got 0'
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import anm

__all__ = ["UsageError", "run", "EXIT_USAGE", "HelpFormatter"]

EXIT_USAGE = 2  # what argparse uses for a bad command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default, and the description's usage examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:  # the help text says what happens without the flag
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """An error the user can fix; its message names the problem and the fix."""


def run(main: Callable[[Any], Any], parse_args: Callable[[], Any]) -> None:
    """Parse the command line, call ``main(args)``; expected errors become one line and a non-zero exit."""
    prog = os.path.basename(sys.argv[0])
    for stream in (sys.stdout, sys.stderr):
        # A path that is not UTF-8 (a byte-named folder) must not crash a print after hours of work.
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        main(parse_args())
    except (UsageError, anm.ANMError) as error:
        _fail(prog, str(error))
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        where = f" ({error.filename})" if error.filename else ""
        _fail(prog, f"{os.strerror(error.errno).lower()}{where}: free space or choose another folder.")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


RANK_GRACE_S = 1.0  # a quiet rank's head start for rank 0's line: torchrun kills the others at the first exit


def _fail(prog: str, message: str) -> None:
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun for each worker
    if error_file:
        record_for_torchrun(error_file, message)
    if not error_file or os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {message}", file=sys.stderr)
    else:
        time.sleep(RANK_GRACE_S)
    sys.exit(EXIT_USAGE)


def record_for_torchrun(path: str, message: str) -> None:
    """Write message where torchrun's failure report reads it: the JSON of torch.distributed.elastic's
    ErrorHandler.record_exception without its "py_callstack", so that the report shows the message itself."""
    with contextlib.suppress(OSError):  # the report falls back to its own text; the exit code stands
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
