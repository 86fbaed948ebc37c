"""A free TCP port on this machine for a rendezvous (no torch import: the local supervisor asks
for one before its ranks start, on the path of every start-up)."""

from __future__ import annotations

import socket


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
