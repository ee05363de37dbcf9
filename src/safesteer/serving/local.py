"""Talking to a local ``safesteer serve`` from scripts: a free port and a health probe."""

from __future__ import annotations

import http.client
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_healthy(port: int, key: str) -> bool:
    """True when the server on 127.0.0.1:``port`` answers ``GET /health`` with 200."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {key}"})
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False
