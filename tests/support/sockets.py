"""Tiny socket servers for tests of the HTTP layer itself (a registry can't misbehave on
cue at this level): accept on a loopback port in a daemon thread and hand each connection
to a function."""

from __future__ import annotations

import socket
import threading
from typing import Callable


def serve_connections(sock: socket.socket, handle: Callable[[socket.socket], None],
                      running: Callable[[], bool] = lambda: True) -> None:
    """Accept on ``sock`` in a daemon thread until it is closed (or ``running()`` says
    no), calling ``handle(conn)`` for each connection in turn."""

    def loop() -> None:
        while running():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            handle(conn)

    threading.Thread(target=loop, daemon=True).start()


def read_head(conn: socket.socket) -> bytes:
    """The bytes of one request up to the end of its headers (less if the peer stops)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data
