"""Helpers for tests that start several processes."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous (port 0 hangs torchrun's)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
