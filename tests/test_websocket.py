"""SPICE inside WebSocket frames on the SPICE port, at the byte level (no browser)."""

import base64
import os
import socket
import time

from websockets.frames import Frame, Opcode

import spicestream

import xclient
from spicestream.protocol.constants import ChannelType, LinkError
from spicestream.protocol.link import LINK_HEADER, ClientLink


PORTAL = "https://portal.example"  # a page that hosts spice-html5 itself, allowed by the operator


def upgrade_request(port: int, origin: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    origin_line = f"Origin: {origin}\r\n" if origin else ""
    return (f"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: binary\r\n{origin_line}\r\n").encode()


def client_frame(payload: bytes, opcode=Opcode.BINARY) -> bytes:
    return Frame(opcode, payload).serialize(mask=True, extensions=[])


def read_until(sock, predicate, timeout=5.0) -> bytes:
    """What the server sent until `predicate(data)`, its end, or `timeout`. A server that
    closes while our bytes sit unread in its socket resets the connection: that is its end too
    (the kernel then drops what we had not read yet; seen once in 10 runs of the 16 MiB
    frame test beside a busy core)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while not predicate(data) and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def test_link_in_the_same_packet_as_the_handshake_is_answered():
    server = spicestream.Server(port=0, width=64, height=64, web_origins=[PORTAL]).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            hello = ClientLink(0, ChannelType.MAIN, 0).hello
            sock.sendall(upgrade_request(server.port) + client_frame(hello))
            data = read_until(sock, lambda d: b"\r\n\r\n" in d and len(d.split(b"\r\n\r\n", 1)[1]) > 20)
            head, rest = data.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 101") and b"Sec-WebSocket-Protocol: binary" in head
            # A server frame: 2-byte header (+2 for a 126 length), unmasked binary payload.
            assert rest[0] == 0x82
            length, start = (rest[1], 2) if rest[1] < 126 else (int.from_bytes(rest[2:4], "big"), 4)
            payload = rest[start : start + length]
            error = ClientLink.parse_reply(payload[: LINK_HEADER.size], payload[LINK_HEADER.size :])[0]
            assert error == LinkError.OK
    finally:
        server.stop()


def test_a_websocket_closed_by_the_client_ends_that_connection_only():
    server = spicestream.Server(port=0, width=64, height=64, web_origins=[PORTAL]).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(upgrade_request(server.port))
            read_until(sock, lambda d: b"\r\n\r\n" in d)
            sock.sendall(client_frame(b"\x03\xe8", Opcode.CLOSE))  # close, code 1000
            data = read_until(sock, lambda d: False, timeout=3)  # until the server closes
            assert data[:1] == b"\x88"  # it answered the close handshake
        deadline = time.monotonic() + 3
        while server._core.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server._core.connections
        assert server._loop is not None  # still serving
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(upgrade_request(server.port))
            assert read_until(sock, lambda d: b"\r\n\r\n" in d).startswith(b"HTTP/1.1 101")
    finally:
        server.stop()


# -- cross-site WebSocket hijacking -------------------------------------------------------------
def link_over_websocket(port: int, origin: str | None, channel=ChannelType.MAIN) -> bytes:
    """What a page at `origin` gets when it opens a WebSocket to us and sends a link hello."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(upgrade_request(port, origin) + client_frame(ClientLink(0, channel, 0).hello))
        # Refused: read to the server's close. Upgraded: until the link reply's frame is in.
        return read_until(sock, lambda d: d.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in d
                          and len(d.split(b"\r\n\r\n", 1)[1]) > 20, timeout=5)


def test_a_page_from_another_origin_cannot_link_or_type(caplog):
    """The attack: evil.example's page opens a WebSocket to a password-less loopback server
    and tries to link main and inputs. It gets 403 and nothing links; the log says why."""
    keys = []
    for kwargs in ({}, {"web_origins": [PORTAL]}, {"web": True}):
        server = spicestream.Server(port=0, width=64, height=64, **kwargs).start()
        server.on_key = lambda *a: keys.append(a)
        try:
            for channel in (ChannelType.MAIN, ChannelType.INPUTS):
                answer = link_over_websocket(server.port, "https://evil.example", channel)
                assert answer.startswith(b"HTTP/1.1 403"), (kwargs, answer[:80])
                assert b"\r\n\r\n" in answer and b"\x82" not in answer.split(b"\r\n\r\n", 1)[1]
            assert server.sessions == 0
        finally:
            server.stop()
    refusals = [r.getMessage() for r in caplog.records if "WebSocket refused" in r.getMessage()]
    assert len(refusals) == 6, refusals
    assert all("evil.example" in m or "WebSocket is off" in m for m in refusals), refusals
    assert keys == []


def test_websocket_is_off_without_web_or_web_origin():
    server = spicestream.Server(port=0, width=64, height=64).start()
    try:
        assert link_over_websocket(server.port, None).startswith(b"HTTP/1.1 403")
    finally:
        server.stop()


def test_allowed_origins_link():
    """The page --web serves (same origin as the Host it asked), a listed portal, and
    non-browser clients (no Origin) all link."""
    def linked(answer: bytes) -> bool:
        return answer.startswith(b"HTTP/1.1 101") and b"\r\n\r\n\x82" in answer

    server = spicestream.Server(port=0, width=64, height=64, web=True, web_origins=[PORTAL]).start()
    try:
        for origin in (f"http://127.0.0.1:{server.port}", PORTAL, PORTAL.upper() + ":443", None):
            assert linked(link_over_websocket(server.port, origin)), origin
        # The same page served on another port is another origin.
        assert link_over_websocket(server.port, f"http://127.0.0.1:{server.port + 1}").startswith(b"HTTP/1.1 403")
        assert link_over_websocket(server.port, "null").startswith(b"HTTP/1.1 403")  # sandboxed iframes
    finally:
        server.stop()


# -- HTTP on the SPICE port ---------------------------------------------------------------------
def http_exchange(port: int, request: bytes) -> bytes:
    """Send `request`, read until the server closes (it must, promptly)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        data = read_until(sock, lambda d: False, timeout=5)
        sock.settimeout(0.5)
        assert sock.recv(1) == b"", "the server left the connection open"
        return data


def test_hostile_http_requests_get_an_answer_and_a_close(caplog):
    import logging

    import pytest

    from spicestream.server.web import SPICE_HTML5_ROOT

    if not os.path.isdir(SPICE_HTML5_ROOT):
        pytest.skip("needs Debian's spice-html5")
    caplog.set_level(logging.INFO, logger="spicestream")
    server = spicestream.Server(port=0, width=64, height=64, web=True).start()
    try:
        answer = http_exchange(server.port, b"GET /%00 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:60]
        answer = http_exchange(server.port, b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n")
        assert answer.startswith(b"HTTP/1.1 414"), answer[:60]
        answer = http_exchange(server.port, b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 10_000 + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431"), answer[:60]
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"c" * 1000) for i in range(20))
        answer = http_exchange(server.port, b"GET / HTTP/1.1\r\n" + many)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:60]
        page = http_exchange(server.port, b"GET /spice_auto.html HTTP/1.1\r\nHost: x\r\n\r\n")
        head = page.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 200") and b"X-Frame-Options: DENY" in head
        assert b"frame-ancestors 'none'" in head and b"X-Content-Type-Options: nosniff" in head
        assert not [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
    finally:
        server.stop()


def test_dns_rebinding_against_a_password_less_server_is_refused():
    """A page at http://rebound.example:PORT whose name the attacker re-pointed to 127.0.0.1
    is same-origin with itself: without a password only loopback names count as ours."""
    server = spicestream.Server(port=0, width=64, height=64, web=True).start()
    protected = spicestream.Server(port=0, width=64, height=64, web=True, password="p").start()
    try:
        for srv, allowed in ((server, False), (protected, True)):
            origin = f"http://rebound.example:{srv.port}"
            key = base64.b64encode(os.urandom(16)).decode()
            request = (f"GET / HTTP/1.1\r\nHost: rebound.example:{srv.port}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                       f"Sec-WebSocket-Protocol: binary\r\nOrigin: {origin}\r\n\r\n").encode()
            with socket.create_connection(("127.0.0.1", srv.port)) as sock:
                sock.sendall(request)
                answer = read_until(sock, lambda d: b"\r\n\r\n" in d)
            assert answer.startswith(b"HTTP/1.1 101" if allowed else b"HTTP/1.1 403"), (allowed, answer[:40])
    finally:
        server.stop()
        protected.stop()


def test_big_websocket_frames_before_login_close_the_connection():
    """Ten connections each upgrade and start a 16 MiB frame before linking: each is closed at
    the frame's header (pre-login frames are small), and the server's memory stays flat."""
    import struct

    from attack import ServerProcess, push

    with ServerProcess(web_origins=[PORTAL]) as server:
        before = server.rss_mib()
        socks = []
        frame_head = bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 16 << 20) + os.urandom(4)
        for i in range(10):
            sock = socket.create_connection(("127.0.0.1", server.port))
            # A masked binary frame announcing 16 MiB (64-bit length), then its start: half of
            # them in the same segment as the upgrade request (parsed before any upgrade code
            # of ours runs), half after the 101.
            if i % 2:
                sock.sendall(upgrade_request(server.port) + frame_head)
            else:
                sock.sendall(upgrade_request(server.port))
                assert read_until(sock, lambda d: b"\r\n\r\n" in d).startswith(b"HTTP/1.1 101")
                sock.sendall(frame_head)
            push(sock, 4 << 20, seconds=0.3)
            socks.append(sock)
        after = server.rss_mib()
        closed = 0
        for sock in socks:
            data = read_until(sock, lambda d: False, timeout=3)  # to the server's close
            closed += data[:1] == b"\x88" or data == b""
            sock.close()
        print(f"\n10 pre-login 16 MiB frames: server RSS {before:.0f} -> {after:.0f} MiB")
        assert closed == 10
        assert after - before < 16, f"server RSS grew {after - before:.0f} MiB"
        xclient.wait_until(lambda: len(server.lines("closing connection")) >= 10, 5, 0.05, "ten log lines")
        closes = server.lines("closing connection")
        # Message too big: 1009 once upgraded, or refused with the upgrade itself.
        assert len(closes) == 10 and all("1009" in line or "too big" in line for line in closes), closes


def test_a_peer_that_never_reads_is_cut_off_after_the_close_grace():
    """Closing waits for queued bytes to leave; a peer that never reads them (a tiny receive
    window) must not hold its connection, and its unlinked slot, forever."""
    import pytest

    from spicestream.server.connection import ABORT_GRACE_S
    from spicestream.server.web import SPICE_HTML5_ROOT

    if not os.path.isdir(SPICE_HTML5_ROOT):
        pytest.skip("needs Debian's spice-html5")
    server = spicestream.Server(port=0, width=64, height=64, web=True).start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.connect(("127.0.0.1", server.port))
        big = max((os.path.join(dp, f) for dp, _, fs in os.walk(SPICE_HTML5_ROOT) for f in fs),
                  key=os.path.getsize)
        path = "/" + os.path.relpath(big, SPICE_HTML5_ROOT)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # and never read
        started = time.monotonic()
        xclient.wait_until(lambda: not server._core.connections, ABORT_GRACE_S * 3, 0.1,
                           "the server to cut the connection off")
        print(f"\n{os.path.getsize(big)} bytes unread: cut off after {time.monotonic() - started:.1f} s")
        assert server._core.unlinked.total == 0
        sock.close()
    finally:
        server.stop()
