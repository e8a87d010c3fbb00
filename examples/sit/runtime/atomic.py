"""Durable, atomic file writes: a crash, kill -9 or full disk never leaves a half-written file behind.

Every file the example writes (checkpoints, latents, PNGs, npz, JSON) goes through :func:`atomic_write`:
the bytes go to a hidden temp file in the same folder, are flushed and fsynced, and the temp file is
renamed over the target (atomic on POSIX within one file system), then the folder is fsynced so the
rename itself survives a power loss. Temp files are named ``.<name>.tmp-<pid>``: :func:`remove_stale_temps`
deletes those of processes that no longer run.

Example:
    >>> import os, tempfile
    >>> from atomic import atomic_write
    >>> folder = tempfile.mkdtemp()
    >>> with atomic_write(os.path.join(folder, "a.txt")) as f:
    ...     _ = f.write(b"hello")
    >>> sorted(os.listdir(folder))
    ['a.txt']
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
from collections.abc import Iterator
from typing import BinaryIO

from runtime.cli import UsageError

__all__ = ["atomic_write", "remove_stale_temps", "check_writable", "temp_path", "pid_alive", "fsync_folder"]

_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temp_path(path: str) -> str:
    """The temp file :func:`atomic_write` uses for ``path`` in this process."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str, sync_folder: bool = True) -> Iterator[BinaryIO]:
    """Open a binary temp file; on a clean exit it becomes ``path`` (fsynced), on an error it is removed.

    A full disk raises :class:`cli.UsageError` naming the path instead of a library's cryptic message.
    ``sync_folder=False`` leaves the folder's fsync (which makes the rename survive a power loss) to the
    caller, who then calls :func:`fsync_folder` once for many files: the file itself is still complete under
    its name, or absent.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if sync_folder:
            fsync_folder(os.path.dirname(os.path.abspath(path)))
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if _is_disk_full(error):
            raise UsageError(f"no space left on device while writing {path}: free space and rerun "
                             "(nothing was overwritten).") from error
        raise


def remove_stale_temps(folder: str) -> list[str]:
    """Delete temp files in ``folder`` left by processes that are gone (kill -9 mid-write); returns them."""
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), ".*.tmp-*")):
        match = _TEMP.match(os.path.basename(tmp))
        if match and not pid_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            removed.append(tmp)
    return removed


def check_writable(folder: str) -> None:
    """Raise :class:`cli.UsageError` now, not hours later, if files cannot be created in ``folder``."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        fix = "free space" if _is_disk_full(error) else "fix its permissions"
        raise UsageError(f"cannot write to {folder} ({os.strerror(error.errno or 0).lower()}): "
                         f"{fix}, or choose another --results-dir / --out.") from error
    finally:
        with contextlib.suppress(OSError):  # a probe created on a full disk must not stay behind
            os.remove(probe)


def _is_disk_full(error: BaseException) -> bool:
    # torch.save reports a full disk from its zip writer as a RuntimeError, without an errno.
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "No space" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def fsync_folder(folder: str) -> None:
    """Make the renames in ``folder`` durable (a no-op where a folder cannot be opened)."""
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (a temp file of a live process is still being written)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
