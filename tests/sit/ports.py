"""A free TCP port on the loopback interface, for the torchrun and process-group launches of the tests."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; a launch right after may still race another).

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
