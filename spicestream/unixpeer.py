"""The process at the other end of a unix socket, from the kernel (SO_PEERCRED): a client that
connected to us (server/connection.py names it in logs), an X server we connected to
(sources/xpages.py watches its page faults)."""

from __future__ import annotations

import socket
import struct

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_pid(sock) -> int | None:
    """The peer's pid as the kernel gives it (0: it is in another pid namespace); None where
    there are no credentials to read."""
    try:
        pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except (OSError, AttributeError):
        return None
    return pid
