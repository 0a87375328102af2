"""What the kernel knows about a TCP connection: bytes acknowledged, unsent backlog, RTT.

Linux `TCP_INFO` gives the delivery numbers the rate controller needs without any help from
the client; `TCP_NOTSENT_LOWAT` keeps the kernel from holding more than a little unsent data,
so the backlog stays in our buffer, where it is measured and where frames can be skipped.
On other transports (unix sockets) `read()` returns None and the controller relies on the
client's stream reports and our own buffer alone.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

TCP_INFO = getattr(socket, "TCP_INFO", 11)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
_INFO_BYTES = 232  # struct tcp_info up to tcpi_snd_wnd (Linux 5.x/6.x)
NOTSENT_LOWAT = 128 << 10


@dataclass(frozen=True)
class TcpInfo:
    rtt_us: int  # smoothed round-trip time
    min_rtt_us: int  # the lowest seen: the path without queues
    bytes_acked: int  # total, since the connection started
    notsent_bytes: int  # in the kernel, not yet sent
    unacked_segments: int
    delivery_rate: int  # bytes/s of the most recent delivery sample
    app_limited: bool  # that sample was limited by us, not by the network


# The fields read, in one unpack: tcpi_unacked at 24, tcpi_rtt at 68, tcpi_bytes_acked at 120,
# tcpi_notsent_bytes and tcpi_min_rtt at 144, tcpi_delivery_rate at 160 (linux/tcp.h).
_FIELDS = struct.Struct("<24xI40xI48xQ16xII8xQ")


def is_tcp(sock: socket.socket | None) -> bool:
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)


def limit_unsent(sock: socket.socket | None) -> bool:
    """Bound the kernel's unsent backlog (TCP_NOTSENT_LOWAT). False where unsupported."""
    if not is_tcp(sock):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        return True
    except OSError:
        return False


def read(sock: socket.socket | None, tcp: bool | None = None) -> TcpInfo | None:
    """TCP_INFO of `sock`; None for other sockets or an old kernel. `tcp`: is_tcp(sock), if
    the caller knows it already (the stream's tick asks 20 times a second)."""
    if not (is_tcp(sock) if tcp is None else tcp):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _INFO_BYTES)
    except OSError:
        return None
    if len(raw) < _FIELDS.size:  # an old kernel without delivery_rate
        return None
    unacked, rtt, bytes_acked, notsent, min_rtt, delivery_rate = _FIELDS.unpack_from(raw)
    return TcpInfo(rtt, min_rtt, bytes_acked, notsent, unacked, delivery_rate, bool(raw[7] & 1))
