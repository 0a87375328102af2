"""Inputs reach the application's callbacks; tickets are checked; slow clients stay bounded."""

import threading
import time

import pytest

import spicestream
from spicestream.protocol.constants import ChannelType as Ch
from spicestream.protocol.constants import LinkError
from spicestream.protocol.messages import CLIENT
from spicestream.protocol.scancodes import parse_key_code, parse_scancodes
from spicestream.testing.client import LinkRefused, TestClient

from helpers import random_frame


class Recorder:
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, *args):
        with self.lock:
            self.events.append(args)


def test_scancode_parsing():
    assert parse_scancodes(bytes.fromhex("1e9e")) == [(0x1E, True), (0x1E, False)]
    assert parse_scancodes(bytes.fromhex("e048e0c8")) == [(0x148, True), (0x148, False)]
    assert parse_key_code(0x1DE0) == [(0x11D, True)]  # right ctrl: bytes E0 1D
    assert parse_key_code(0x9DE0) == [(0x11D, False)]
    assert parse_key_code(0x9D) == [(0x1D, False)]
    assert parse_scancodes(bytes.fromhex("e11d45e19dc5")) == [(0x145, True), (0x145, False)]


def test_keys_and_pointer_reach_callbacks(server, connect):
    keys, pointer = Recorder(), Recorder()
    server.on_key, server.on_pointer = keys, pointer
    client = connect()
    client.key(0x1E)
    client.send(Ch.INPUTS, CLIENT.INPUTS_KEY_DOWN(0x1DE0))
    client.send(Ch.INPUTS, CLIENT.INPUTS_KEY_UP(0x9DE0))
    for i in range(8):
        client.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_POSITION(10 + i, 20 + i, 0, 0))
    client.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_PRESS(1, 1))
    client.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_RELEASE(1, 0))
    client.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_PRESS(4, 0))  # wheel up
    client.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_RELEASE(4, 0))
    client.wait_for(lambda c: len(pointer.events) >= 12 and len(keys.events) >= 4)
    assert keys.events == [(0x1E, True), (0x1E, False), (0x11D, True), (0x11D, False)]
    assert pointer.events[:8] == [(10 + i, 20 + i, 0) for i in range(8)]
    assert pointer.events[8:] == [(17, 27, 1), (17, 27, 0), (17, 27, 8), (17, 27, 0)]
    client.wait_for(lambda c: c.motion_acks == 2, what="a motion ack per 4 motions")


def test_server_mode_relative_motion_is_clamped(server, connect):
    pointer = Recorder()
    server.on_pointer = pointer
    client = connect()
    client.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_MOTION(50, 40, 0))
    client.send(Ch.INPUTS, CLIENT.INPUTS_MOUSE_MOTION(-100, 1000, 2))
    client.wait_for(lambda c: len(pointer.events) == 2)
    assert pointer.events == [(50, 40, 0), (0, 239, 2)]


def test_callback_exceptions_do_not_break_the_connection(server, connect):
    def broken(*_):
        raise RuntimeError("application bug")

    server.on_key = broken
    client = connect()
    client.key(0x1E)
    frame = random_frame(240, 320, 1)
    server.display.update(frame)
    client.wait_for(lambda c: c.frame is not None and (c.frame[..., :3] == frame[..., :3]).all())


@pytest.fixture
def locked_server():
    srv = spicestream.Server(port=0, width=64, height=64, password="s3cret").start()
    yield srv
    srv.stop()


def test_right_password_links_wrong_is_refused(locked_server):
    with TestClient("127.0.0.1", locked_server.port, password="s3cret") as client:
        client.wait_for(lambda c: c.marked)
    for wrong in ("s3cret2", "", None, "S3CRET"):
        with pytest.raises(LinkRefused) as info:
            TestClient("127.0.0.1", locked_server.port, password=wrong).connect()
        assert info.value.error == LinkError.PERMISSION_DENIED


def test_password_too_long_is_refused_by_the_api():
    with pytest.raises(ValueError, match="60 bytes"):
        spicestream.Server(password="x" * 61)


def test_stalled_client_does_not_grow_server_memory(server, connect):
    """A display client that never reads: the server stops producing for it at the socket's
    high-water mark instead of queueing frames, and the other client keeps getting frames."""
    server.display.resize(1280, 720)
    stalled = TestClient("127.0.0.1", server.port)
    stalled.connect()
    # Stop the stalled client's reader so its socket fills up.
    display = stalled.channels[Ch.DISPLAY]
    stalled._loop.call_soon_threadsafe(display.task.cancel)
    healthy = connect()
    from spicestream.server.connection import WRITE_HIGH_WATER

    conns = lambda: [c for c in server._core.connections if c.handler and type(c.handler).__name__ == "DisplayChannel"]
    peak = 0
    for seed in range(40):
        frame = random_frame(720, 1280, seed)
        server.display.update(frame)
        time.sleep(0.02)
        peak = max([peak] + [c.transport.get_write_buffer_size() for c in conns()])
    healthy.wait_for(lambda c: c.frame is not None and (c.frame[..., :3] == frame[..., :3]).all(), timeout=20)
    # At most one frame's worth (raw bitmap, worst case) above the high-water mark.
    assert peak <= WRITE_HIGH_WATER + 1280 * 720 * 4 + 65536, peak
    stalled.close()
