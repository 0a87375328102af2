"""Bad input against a real server over loopback TCP: every case has one exact outcome.

Each test opens a misbehaving peer next to a well-behaved `TestClient` that linked before it,
and checks three things: what the bad peer receives (byte-exact link replies / link results,
then EOF), that the well-behaved client still gets display updates afterwards, and what the
server logged about the bad peer (records are matched by the peer's "ip:port", which the
server uses as its log prefix; the server logs from its own thread and caplog still sees it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
import time

import numpy as np
import pytest

import spicestream
from helpers import fresh_source
from spicestream.protocol.channel import ChannelProtocol
from spicestream.protocol.constants import (
    MAGIC,
    TICKET_PUBKEY_BYTES,
    ChannelType,
    CommonCap,
    LinkError,
)
from spicestream.protocol.link import LINK_HEADER, LINK_MESS, LINK_REPLY, ClientLink, encrypt_ticket
from spicestream.protocol.messages import CLIENT, SERVER
from spicestream.testing.client import TestClient

HOST = "127.0.0.1"
PASSWORD = "s3cret"
W, H = 64, 48
TIMEOUT = 5.0
MINI = (CommonCap.PROTOCOL_AUTH_SELECTION, CommonCap.MINI_HEADER)
FULL = (CommonCap.PROTOCOL_AUTH_SELECTION,)
REJECT_REPLY_BYTES = LINK_HEADER.size + LINK_REPLY.size  # 16 + 178


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    srv = spicestream.Server(host=HOST, port=0, width=W, height=H, password=PASSWORD,
                             max_clients=64).start()  # many fuzzing sessions at once
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def host(server):
    """A session (main channel only) for raw peers to link their channels into: a session has
    one channel of each kind, so peers must not replace the well-behaved client's own."""
    c = TestClient(HOST, server.port, password=PASSWORD, channels=()).connect()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def client(server, host):
    c = TestClient(HOST, server.port, password=PASSWORD).connect()
    try:
        c.wait_for(lambda c: c.marked and c.frame is not None, TIMEOUT, "first frame")
        yield c
    finally:
        c.close()


@pytest.fixture(autouse=True)
def _logs(caplog):
    caplog.set_level(logging.INFO, logger="spicestream")
    return caplog


_frame_seeds = itertools.count(1)


def assert_client_updates(server, client) -> None:
    """The application publishes a changed frame; the well-behaved client ends up with it."""
    frame = np.random.default_rng(next(_frame_seeds)).integers(0, 256, (H, W, 4), dtype=np.uint8)
    frame[..., 3] = 255
    draws = client.draws
    server.display.update(frame)
    client.wait_for(lambda c: c.draws > draws and same_picture(c.frame, frame), TIMEOUT,
                    "the changed frame")
    assert server._thread is not None and server._thread.is_alive()
    assert server.sessions == 2  # only the well-behaved client's session, and the peers' host


def same_picture(a, b) -> bool:
    """Equal in B, G, R (the x byte of BGRx is not part of the picture)."""
    return a is not None and a.shape == b.shape and np.array_equal(a[..., :3], b[..., :3])


def wait_until(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except RuntimeError:  # a set changed size while the server thread touched it
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_connection_gone(server, peer: str) -> None:
    wait_until(lambda: peer not in {c.peer for c in list(server._core.connections)},
               what=f"the server to drop {peer}")


def server_lines(caplog, peer: str, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name.startswith("spicestream") and r.levelno >= level
            and r.getMessage().startswith(peer + ":")]


def assert_one_close_line(caplog, peer: str, reason: str) -> None:
    """Exactly one 'closing connection' warning for this peer, naming the reason."""
    closing = [r for r in server_lines(caplog, peer) if "closing connection" in r.getMessage()]
    assert len(closing) == 1, [r.getMessage() for r in server_lines(caplog, peer, 0)]
    record = closing[0]
    assert reason in record.getMessage(), record.getMessage()
    assert record.levelno == logging.WARNING
    assert record.threadName == "spicestream"  # logged on the server thread, seen by caplog


# -- a raw peer -----------------------------------------------------------------------------------
class Peer:
    def __init__(self, port: int):
        # Each peer from a /24 of its own: these tests send wrong tickets and unknown session
        # ids by the dozen, and the guessing brake (tickets.py) would hold back the answers to
        # one network that keeps failing, which is not what they test.
        self.sock = socket.create_connection((HOST, port), timeout=TIMEOUT, source_address=(fresh_source(), 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = self.sock.getsockname()[:2]
        self.name = f"{host}:{port}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise AssertionError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def recv_to_eof(self) -> bytes:
        """Everything until the server closes (a reset counts as closing); bounded by TIMEOUT."""
        out = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return bytes(out)
            except TimeoutError:
                raise AssertionError(f"server did not close; got {len(out)} bytes") from None
            if not chunk:
                return bytes(out)
            out += chunk

    def expect_open(self, seconds: float = 0.3) -> None:
        """Nothing arrives and the connection stays open for a while."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return
        finally:
            self.sock.settimeout(TIMEOUT)
        raise AssertionError(f"expected silence on an open connection, got {data!r}")

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def peer(server):
    p = Peer(server.port)
    try:
        yield p
    finally:
        p.close()


def read_link_reply(p: Peer):
    header = p.recv_exactly(LINK_HEADER.size)
    size = LINK_HEADER.unpack(header)[3]
    body = p.recv_exactly(size)
    return header, body


def assert_rejected(p: Peer, error: LinkError) -> None:
    """A 16-byte link header + a zeroed 178-byte LinkReply carrying `error`, then EOF."""
    data = p.recv_to_eof()
    assert len(data) == REJECT_REPLY_BYTES, data
    magic, major, minor, size = LINK_HEADER.unpack_from(data)
    assert (magic, major, minor, size) == (MAGIC, 2, 2, LINK_REPLY.size)
    err, pub, n_common, n_channel, _offset = LINK_REPLY.unpack_from(data, LINK_HEADER.size)
    assert err == error
    assert pub == bytes(TICKET_PUBKEY_BYTES)
    assert (n_common, n_channel) == (0, 0)


def link_to_reply(p: Peer, channel_type: int, connection_id: int, common=MINI) -> bytes:
    """Send a valid link message, expect an OK reply; return the server's public key."""
    p.send(ClientLink(connection_id, channel_type, 0, (), common).hello)
    header, body = read_link_reply(p)
    error, pub, _, _ = ClientLink.parse_reply(header, body)
    assert error == LinkError.OK
    return pub


def link(p: Peer, channel_type: int, connection_id: int, common=MINI) -> ChannelProtocol:
    """Link a channel completely; returns a client-side protocol to parse what follows."""
    pub = link_to_reply(p, channel_type, connection_id, common)
    p.send(ClientLink.ticket(pub, PASSWORD))
    assert p.recv_exactly(4) == struct.pack("<I", LinkError.OK)
    return ChannelProtocol(channel_type, CommonCap.MINI_HEADER in common, side="client")


def header(mini: bool, type_id: int, size: int, sub_list: int = 0) -> bytes:
    if mini:
        return struct.pack("<HI", type_id, size)
    return struct.pack("<QHII", 1, type_id, size, sub_list)


def hello_with(*, magic=MAGIC, major=2, minor=2, size=None, conn_id=0, ch_type=1, ch_id=0,
               n_common=1, n_channel=0, caps_offset=LINK_MESS.size, caps=None) -> bytes:
    caps = struct.pack("<I", 1 << CommonCap.MINI_HEADER) if caps is None else caps
    mess = LINK_MESS.pack(conn_id, ch_type, ch_id, n_common, n_channel, caps_offset) + caps
    return LINK_HEADER.pack(magic, major, minor, len(mess) if size is None else size) + mess


def unknown_session_id(server) -> int:
    used = set(server._core.sessions)
    return next(i for i in itertools.count(0x1234) if i not in used)


# -- sanity ---------------------------------------------------------------------------------------
def test_well_behaved_client_baseline(server, client, caplog):
    assert_client_updates(server, client)
    assert client.session_id in server._core.sessions


# -- link header ----------------------------------------------------------------------------------
def test_wrong_magic(server, client, caplog):
    with peer(server) as p:
        p.send(hello_with(magic=b"RFB "))
        assert_rejected(p, LinkError.INVALID_MAGIC)
    assert_one_close_line(caplog, p.name, "bad magic")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


def test_wrong_major_version(server, client, caplog):
    with peer(server) as p:
        p.send(hello_with(major=1))
        assert_rejected(p, LinkError.VERSION_MISMATCH)
    assert_one_close_line(caplog, p.name, "major version 1")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


@pytest.mark.parametrize("size", [0, 5, 17, 4097, 100000, 0xFFFFFFFF])
def test_link_message_size_out_of_range(server, client, caplog, size):
    with peer(server) as p:
        p.send(LINK_HEADER.pack(MAGIC, 2, 2, size))  # the server answers on the header alone
        assert_rejected(p, LinkError.INVALID_DATA)
    assert_one_close_line(caplog, p.name, f"link message size {size}")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


# -- link message ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    # announces one common caps word but the message ends at 18 bytes
    dict(n_common=1, caps=b""),
    # caps_offset below the 18-byte fixed part
    dict(caps_offset=10, caps=bytes(8)),
    dict(caps_offset=0),
    # caps_offset / counts pushing the array past the end
    dict(caps_offset=0xFFFFFFFF),
    dict(n_common=1, n_channel=1),
    dict(caps_offset=LINK_MESS.size + 1),
], ids=["caps-missing", "offset-10", "offset-0", "offset-huge", "channel-caps-missing",
        "offset-past-end"])
def test_caps_do_not_fit(server, client, caplog, case):
    with peer(server) as p:
        p.send(hello_with(**case))
        assert_rejected(p, LinkError.INVALID_DATA)
    assert_one_close_line(caplog, p.name, "caps do not fit")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


@pytest.mark.parametrize("counts", [(1025, 0), (0, 1025), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_too_many_caps_words(server, client, caplog, counts):
    with peer(server) as p:
        # The count check comes before the fit check (4096 bytes could not hold them anyway).
        p.send(hello_with(n_common=counts[0], n_channel=counts[1], caps=b""))
        assert_rejected(p, LinkError.INVALID_DATA)
    assert_one_close_line(caplog, p.name, "too many caps")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


@pytest.mark.parametrize("ch_type, ch_id", [(ChannelType.SMARTCARD, 0), (200, 0), (0, 0),
                                            (ChannelType.DISPLAY, 1)],
                         ids=["smartcard", "type-200", "type-0", "display-1"])
def test_unknown_channel(server, host, client, caplog, ch_type, ch_id):
    with peer(server) as p:
        p.send(ClientLink(host.session_id, ch_type, ch_id).hello)
        assert_rejected(p, LinkError.CHANNEL_NOT_AVAILABLE)
    assert_one_close_line(caplog, p.name, "link refused: CHANNEL_NOT_AVAILABLE")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


# -- authentication -------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism", [0, 2, 0xFFFFFFFF], ids=["zero", "sasl", "huge"])
def test_wrong_auth_mechanism(server, client, caplog, mechanism):
    with peer(server) as p:
        link_to_reply(p, ChannelType.MAIN, 0)
        p.send(struct.pack("<I", mechanism))
        assert p.recv_to_eof() == struct.pack("<I", LinkError.INVALID_DATA)
    assert_one_close_line(caplog, p.name, f"auth mechanism {mechanism}")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


def test_ticket_that_does_not_decrypt(server, client, caplog):
    with peer(server) as p:
        link_to_reply(p, ChannelType.MAIN, 0)
        p.send(struct.pack("<I", 1) + os.urandom(128))
        assert p.recv_to_eof() == struct.pack("<I", LinkError.PERMISSION_DENIED)
    assert_one_close_line(caplog, p.name, "link refused: PERMISSION_DENIED")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


@pytest.mark.parametrize("password", [b"wrong", b"", b"s3cre", b"s3cret!", PASSWORD.upper().encode()])
def test_wrong_password(server, client, caplog, password):
    with peer(server) as p:
        pub = link_to_reply(p, ChannelType.MAIN, 0)
        p.send(struct.pack("<I", 1) + encrypt_ticket(pub, password))
        assert p.recv_to_eof() == struct.pack("<I", LinkError.PERMISSION_DENIED)
    assert_one_close_line(caplog, p.name, "link refused: PERMISSION_DENIED")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


@pytest.mark.parametrize("ch_type", [ChannelType.DISPLAY, ChannelType.INPUTS, ChannelType.CURSOR])
def test_unknown_connection_id(server, client, caplog, ch_type):
    with peer(server) as p:
        pub = link_to_reply(p, ch_type, unknown_session_id(server))
        p.send(ClientLink.ticket(pub, PASSWORD))
        assert p.recv_to_eof() == struct.pack("<I", LinkError.BAD_CONNECTION_ID)
    assert_one_close_line(caplog, p.name, "link refused: BAD_CONNECTION_ID")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


def _auth_failure(server, kind: str) -> str:
    with peer(server) as p:
        if kind == "undecryptable":
            link_to_reply(p, ChannelType.MAIN, 0)
            p.send(struct.pack("<I", 1) + os.urandom(128))
        elif kind == "wrong-password":
            pub = link_to_reply(p, ChannelType.MAIN, 0)
            p.send(ClientLink.ticket(pub, "wrong"))
        else:
            pub = link_to_reply(p, ChannelType.INPUTS, unknown_session_id(server))
            p.send(ClientLink.ticket(pub, PASSWORD))
        p.recv_to_eof()
    return p.name


@pytest.mark.parametrize("kind", ["undecryptable", "wrong-password", "bad-connection-id"])
def test_auth_failure_logs_exactly_one_line(server, client, caplog, kind):
    name = _auth_failure(server, kind)
    assert_connection_gone(server, name)
    assert len(server_lines(caplog, name)) == 1, [r.getMessage() for r in server_lines(caplog, name)]


def test_pipelined_auth_and_ticket_are_answered(server, client, caplog):
    with peer(server) as p:
        p.send(ClientLink(0, ChannelType.MAIN, 0).hello + struct.pack("<I", 1) + os.urandom(128))
        header_, body = read_link_reply(p)
        assert ClientLink.parse_reply(header_, body)[0] == LinkError.OK
        p.sock.settimeout(TIMEOUT)
        try:
            result = p.recv_exactly(4)
        except TimeoutError:
            result = b"(nothing within the timeout)"
        assert result == struct.pack("<I", LinkError.PERMISSION_DENIED)


# -- after a successful link ----------------------------------------------------------------------
@pytest.mark.parametrize("mini", [True, False], ids=["mini-header", "full-header"])
@pytest.mark.parametrize("size", [(64 << 20) + 1, 0xFFFFFFFF])
def test_oversized_message_closes(server, host, client, caplog, mini, size):
    with peer(server) as p:
        link(p, ChannelType.INPUTS, host.session_id, MINI if mini else FULL)
        p.send(header(mini, CLIENT.INPUTS_KEY_SCANCODE.type_id, size))
        rest = p.recv_to_eof()
        proto = ChannelProtocol(ChannelType.INPUTS, mini, side="client")
        assert [type(m) for m in proto.receive_data(rest)] == [SERVER.INPUTS_INIT]
    assert_one_close_line(caplog, p.name, f"protocol error: message type 104 of {size} bytes")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


@pytest.mark.parametrize("mini", [True, False], ids=["mini-header", "full-header"])
@pytest.mark.parametrize("message_type, body", [
    (CLIENT.INPUTS_MOUSE_POSITION.type_id, b"\x01\x02\x03"),  # needs 11 bytes
    (CLIENT.INPUTS_MOUSE_MOTION.type_id, b""),                # needs 10 bytes
    (CLIENT.INPUTS_KEY_DOWN.type_id, b"\x1e\x00"),            # needs 4 bytes
    (CLIENT.PONG.type_id, bytes(11)),                         # base message, needs 12 bytes
], ids=["mouse-position", "mouse-motion", "key-down", "pong"])
def test_truncated_known_message_closes(server, host, client, caplog, mini, message_type, body):
    pointer = []
    server.on_pointer = lambda *a: pointer.append(a)
    try:
        with peer(server) as p:
            link(p, ChannelType.INPUTS, host.session_id, MINI if mini else FULL)
            p.send(header(mini, message_type, len(body)) + body)
            p.recv_to_eof()
    finally:
        server.on_pointer = None
    assert pointer == []
    assert_one_close_line(caplog, p.name, "protocol error: truncated")
    assert_connection_gone(server, p.name)
    assert_client_updates(server, client)


@pytest.mark.parametrize("mini", [True, False], ids=["mini-header", "full-header"])
def test_unknown_message_types_are_skipped(server, host, client, caplog, mini):
    pointer = []
    server.on_pointer = lambda *a: pointer.append(a)
    unknown = [(0, b""), (7, b"xyz"), (50, bytes(20)), (99, b"\xff" * 3), (100, b""),
               (105, bytes(7)), (110, b"q"), (200, bytes(300)), (999, b"abc"),
               (0xFFFF, bytes(40)), (CLIENT.DISPLAY_INIT.type_id + 1000, b"")]
    try:
        with peer(server) as p:
            proto = link(p, ChannelType.INPUTS, host.session_id, MINI if mini else FULL)
            stream = b"".join(header(mini, t, len(b)) + b for t, b in unknown)
            # Four good MOUSE_POSITIONs after the junk: the server must still decode them, call
            # the application and answer with one MOUSE_MOTION_ACK.
            good = b"".join(header(mini, CLIENT.INPUTS_MOUSE_POSITION.type_id, 11)
                            + struct.pack("<IIHB", 10 + i, 20 + i, 0, 0) for i in range(4))
            for i in range(0, len(stream), 7):  # dribbled in small pieces
                p.send(stream[i : i + 7])
            p.send(good)
            received = []
            deadline = time.monotonic() + TIMEOUT
            while SERVER.INPUTS_MOUSE_MOTION_ACK not in received:
                assert time.monotonic() < deadline, received
                chunk = p.sock.recv(1 << 16)
                assert chunk, "server closed the connection"
                received += [type(m) for m in proto.receive_data(chunk)]
            assert received == [SERVER.INPUTS_INIT, SERVER.INPUTS_MOUSE_MOTION_ACK]
            p.expect_open()
            assert pointer == [(10 + i, 20 + i, 0) for i in range(4)]
            assert_client_updates(server, client)
    finally:
        server.on_pointer = None
    assert_connection_gone(server, p.name)
    assert server_lines(caplog, p.name) == []  # skipping is not an error
    assert_client_updates(server, client)


# -- peers that vanish mid-message ----------------------------------------------------------------
def _half_link_header(p, server, client):
    p.send(ClientLink(0, ChannelType.MAIN, 0).hello[:8])


def _half_link_message(p, server, client):
    p.send(ClientLink(0, ChannelType.MAIN, 0).hello[:25])


def _half_ticket(p, server, client):
    pub = link_to_reply(p, ChannelType.MAIN, 0)
    p.send(ClientLink.ticket(pub, PASSWORD)[:70])


def _half_message_header(p, server, client):
    link(p, ChannelType.INPUTS, client.session_id)
    p.send(header(True, CLIENT.INPUTS_KEY_SCANCODE.type_id, 100)[:3])


def _half_message_body(p, server, client):
    link(p, ChannelType.INPUTS, client.session_id)
    p.send(header(True, CLIENT.INPUTS_KEY_SCANCODE.type_id, 40) + b"\x1e" * 20)


def _half_full_header(p, server, client):
    link(p, ChannelType.INPUTS, client.session_id, FULL)
    p.send(header(False, CLIENT.INPUTS_KEY_SCANCODE.type_id, 100)[:11])


@pytest.mark.parametrize("vanish", [_half_link_header, _half_link_message, _half_ticket,
                                    _half_message_header, _half_message_body, _half_full_header],
                         ids=lambda f: f.__name__.strip("_"))
def test_peer_disconnects_mid_message(server, host, client, caplog, vanish):
    keys = []
    server.on_key = lambda *a: keys.append(a)
    try:
        with peer(server) as p:
            vanish(p, server, host)
            time.sleep(0.05)  # let the partial bytes reach the server before the FIN
    finally:
        server.on_key = None
    assert_connection_gone(server, p.name)
    assert keys == []  # a half message is never delivered
    # A peer going away is not a protocol error: nothing is logged at WARNING for it.
    assert server_lines(caplog, p.name) == []
    assert_client_updates(server, client)
    # The server still links new channels normally.
    with peer(server) as q:
        link(q, ChannelType.CURSOR, host.session_id)
    assert_connection_gone(server, q.name)
    assert_client_updates(server, client)


def test_server_still_accepts_new_clients(server, client):
    with TestClient(HOST, server.port, password=PASSWORD) as other:
        other.wait_for(lambda c: same_picture(c.frame, server.display.frame), TIMEOUT,
                       "current frame")
        assert server.sessions == 3
    wait_until(lambda: server.sessions == 2, what="the new session to end")
    assert_client_updates(server, client)
