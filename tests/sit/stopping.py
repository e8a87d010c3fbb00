"""Signalling running scripts in the stop-signal tests: wait for a condition, signal, collect the outputs."""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence


def signal_when(procs: Sequence[subprocess.Popen], ready: Callable[[], bool], sig: signal.Signals, what: str,
                targets: Sequence[subprocess.Popen] | None = None, timeout: float = 240.0) -> list[tuple[str, str]]:
    """Wait until ready() holds (polled, never a fixed sleep) while every process runs, send sig to targets
    (default: all of procs), and return each process's (stdout, stderr) once it has ended. Whatever is still
    running on the way out is killed."""
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            ended = [p.returncode for p in procs if p.poll() is not None]
            if ended:
                raise AssertionError(f"ended (rc {ended}) before {what}: {[p.communicate() for p in procs]}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)
        for p in procs if targets is None else targets:
            p.send_signal(sig)
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
