"""A spicestream server in a process of its own, for attacks whose cost is the server's memory:
its RSS is read from /proc and printed by the tests. Also raw link steps for attackers."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import threading
import time

from spicestream.protocol.constants import CommonCap
from spicestream.protocol.link import LINK_HEADER, ClientLink

SCRIPT = r"""
import json, logging, sys, threading, time
import numpy as np
import spicestream
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
kwargs = json.loads(sys.argv[1])
server = spicestream.Server(port=0, **kwargs).start()
keys = []
server.on_key = lambda code, down: print("key", code, down, file=sys.stderr, flush=True)
print(server.port, flush=True)
frame = np.zeros((server.display.height, server.display.width, 4), np.uint8)
k = 0
while sys.stdin.readline():  # one line: one update (a changing display for watching clients)
    k += 1
    frame[..., 1] = k % 256
    server.display.update(frame)
"""


class ServerProcess:
    def __init__(self, fd_limit: int | None = None, **server_kwargs):
        self.kwargs = {"width": 64, "height": 64, **server_kwargs}
        self.fd_limit = fd_limit
        self.log: list[str] = []

    def _limits(self) -> None:
        if self.fd_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (self.fd_limit, self.fd_limit))

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(self.kwargs)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=self._limits)
        self.port = int(self.proc.stdout.readline())
        self._reader = threading.Thread(target=lambda: [self.log.append(l.rstrip()) for l in self.proc.stderr],
                                        daemon=True)
        self._reader.start()
        return self

    def update(self) -> None:
        self.proc.stdin.write("x\n")
        self.proc.stdin.flush()

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def lines(self, text: str) -> list[str]:
        return [line for line in list(self.log) if text in line]

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(5)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def connect_from(source: str, port: int, timeout: float = 10) -> socket.socket:
    """A TCP connection to the server from loopback address `source` (any 127.x.y.z is ours)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def link_and_send_ticket(port: int, channel_type: int, password: str | None, connection_id: int = 0,
                         mini_header: bool = True, source: str = "127.0.0.1") -> socket.socket:
    """Link hello, read the reply, send auth + ticket; returns the socket (result not read)."""
    sock = connect_from(source, port)
    common = (CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER) if mini_header else \
        (CommonCap.PROTOCOL_AUTH_SELECTION,)
    sock.sendall(ClientLink(connection_id, channel_type, 0, common_caps=common).hello)
    header = recv_exactly(sock, LINK_HEADER.size)
    size = LINK_HEADER.unpack(header)[3]
    _, pub, _, _ = ClientLink.parse_reply(header, recv_exactly(sock, size))
    sock.sendall(ClientLink.ticket(pub, password))
    return sock


def push(sock: socket.socket, total: int, seconds: float) -> int:
    """Send up to `total` junk bytes for at most `seconds`; returns how many the kernel took."""
    chunk = b"\xa5" * (1 << 20)
    sent, deadline = 0, time.monotonic() + seconds
    sock.settimeout(0.2)
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except (TimeoutError, socket.timeout):
            continue
        except OSError:
            break
    return sent


def linked(port: int, channel_type: int, password: str | None = None, connection_id: int = 0,
           mini_header: bool = True, source: str = "127.0.0.1") -> socket.socket:
    """A socket whose channel is linked (the link result read and checked)."""
    sock = link_and_send_ticket(port, channel_type, password, connection_id, mini_header, source)
    result = int.from_bytes(recv_exactly(sock, 4), "little")
    if result != 0:
        raise ConnectionError(f"link refused: {result}")
    return sock


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True if the server closed (or reset) this connection within `wait` seconds (0: now)."""
    readable, _, _ = select.select([sock], [], [], max(0.0, wait))
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # reset
        return True


def count_closed(socks: list[socket.socket], expect: int, timeout: float = 10.0) -> int:
    """How many of `socks` the server closed, polling until `expect` are (or the timeout),
    then a little longer to see that no more follow."""
    def closed_now() -> int:
        return sum(closed_by_server(s, 0) for s in socks)

    deadline = time.monotonic() + timeout
    count = closed_now()
    while count < expect and time.monotonic() < deadline:
        time.sleep(0.05)
        count = closed_now()
    time.sleep(0.2)
    return closed_now()
