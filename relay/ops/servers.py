"""Stopping the socketserver-based servers the relay runs (pynetdicom's, the metrics
endpoint's) without waiting out their loop's poll."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading


def shutdown_now(server: socketserver.TCPServer) -> None:
    """`server.shutdown()`, without the wait for socketserver's loop to look again: it polls
    its socket every 0.5 s, and each stop of a relay waited it out. Shutting the listening
    socket down wakes the loop at once (Linux); where it cannot, the poll still ends it."""
    stopper = threading.Thread(target=server.shutdown, name="server-shutdown", daemon=True)
    stopper.start()
    with contextlib.suppress(OSError):  # closed already (pynetdicom's shutdown closes it)
        server.socket.shutdown(socket.SHUT_RDWR)
    stopper.join()
