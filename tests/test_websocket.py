"""SPICE inside WebSocket frames on the SPICE port, at the byte level (no browser)."""

import base64
import os
import socket
import time

from websockets.frames import Frame, Opcode

import spicestream
from spicestream.protocol.constants import ChannelType, LinkError
from spicestream.protocol.link import LINK_HEADER, ClientLink


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: binary\r\n\r\n").encode()


def client_frame(payload: bytes, opcode=Opcode.BINARY) -> bytes:
    return Frame(opcode, payload).serialize(mask=True, extensions=[])


def read_until(sock, predicate, timeout=5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while not predicate(data) and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_link_in_the_same_packet_as_the_handshake_is_answered():
    server = spicestream.Server(port=0, width=64, height=64).start()
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
    server = spicestream.Server(port=0, width=64, height=64).start()
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
