"""The agent (server/agent.py) with the in-repo test client: capabilities, clipboard both ways,
resize requests, file transfer, flow control and hostile input. Fast; the real clients'
proof is in test_remote_viewer_agent.py."""

from __future__ import annotations

import contextlib
import io
import os
import queue
import time

import numpy as np
import pytest
from PIL import Image

import spicestream
from spicestream.protocol.agent import (
    HEADER,
    MON_CONFIG,
    AgentCap,
    AgentCodec,
    AgentMsg,
    AgentStream,
    ClipboardType,
    Selection,
    XferStatus,
    XFER_NOT_ENOUGH_SPACE,
    caps_of,
    caps_words,
    chunks,
    u32_list,
)
from spicestream.protocol.constants import ChannelType as Ch
from spicestream.protocol.wire import ProtocolError
from spicestream.server.agent import ClipboardError
from spicestream.server.filexfer import parse_start, safe_name
from spicestream.testing.client import TestClient

from helpers import FakeConnection, metrics_text


# What spice-gtk 0.42 announces (channel-main.c agent_announce_caps).
GTK_CAPS = {AgentCap.MOUSE_STATE, AgentCap.MONITORS_CONFIG, AgentCap.REPLY, AgentCap.DISPLAY_CONFIG,
            AgentCap.CLIPBOARD_BY_DEMAND, AgentCap.CLIPBOARD_SELECTION,
            AgentCap.MONITORS_CONFIG_POSITION, AgentCap.FILE_XFER_DETAILED_ERRORS,
            AgentCap.CLIPBOARD_NO_RELEASE_ON_REGRAB, AgentCap.CLIPBOARD_GRAB_SERIAL,
            AgentCap.MAX_CLIPBOARD}


@pytest.fixture
def server(tmp_path):
    srv = spicestream.Server(port=0, width=320, height=240, file_transfer_dir=str(tmp_path),
                             max_file_size=1 << 20, max_clipboard=1 << 20)
    srv.start()
    srv.display.update(np.zeros((240, 320, 4), np.uint8))
    yield srv
    srv.stop()


@contextlib.contextmanager
def agent_client(server, caps=GTK_CAPS, **kw):
    """A client with only its main channel, past the agent's capability exchange."""
    with TestClient("127.0.0.1", server.port, agent_caps=caps, channels=(), **kw) as client:
        client.wait_for(lambda c: c.agent_server_caps is not None, what="the agent's capabilities")
        yield client


def calls(server, name):
    got = queue.Queue()
    setattr(server, name, lambda *args: got.put(args))
    return got


# -- protocol ----------------------------------------------------------------------------------
def test_grab_layout_follows_the_negotiated_capabilities():
    both = AgentCodec({AgentCap.CLIPBOARD_SELECTION, AgentCap.CLIPBOARD_GRAB_SERIAL})
    packed = both.pack(AgentMsg.CLIPBOARD_GRAB, both.make(AgentMsg.CLIPBOARD_GRAB, selection=1, serial=7,
                                                           types=(1).to_bytes(4, "little")))
    header = HEADER.unpack(packed[:20])
    assert (header.protocol, header.type, header.size) == (1, 7, 12)
    assert packed[20:] == bytes([1, 0, 0, 0]) + (7).to_bytes(4, "little") + (1).to_bytes(4, "little")
    plain = AgentCodec()
    packed = plain.pack(AgentMsg.CLIPBOARD_GRAB, plain.make(AgentMsg.CLIPBOARD_GRAB, types=b"\x01\0\0\0"))
    assert packed[20:] == b"\x01\0\0\0"
    decoded = plain.unpack(AgentMsg.CLIPBOARD_GRAB, b"\x02\0\0\0")
    assert decoded.selection == Selection.CLIPBOARD and u32_list(decoded.types) == [2]


def test_caps_words_round_trip():
    assert caps_of(caps_words({0, 5, 17, 33})) == {0, 5, 17, 33}


def test_stream_reassembles_across_chunks_and_bounds_sizes():
    codec = AgentCodec()
    big = codec.pack(AgentMsg.CLIPBOARD, codec.make(AgentMsg.CLIPBOARD, type=1, data=b"x" * 5000))
    stream = AgentStream(lambda kind: 6000)
    out = []
    for part in chunks(big) + chunks(codec.pack(AgentMsg.MAX_CLIPBOARD, codec.make(AgentMsg.MAX_CLIPBOARD, max=9))):
        out += stream.feed(part)
    assert [k for k, _ in out] == [AgentMsg.CLIPBOARD, AgentMsg.MAX_CLIPBOARD]
    assert codec.unpack(*out[0]).data == b"x" * 5000
    small = AgentStream(lambda kind: 100)
    with pytest.raises(ProtocolError):
        small.feed(big[:2048])  # refused at the header, before the body is buffered
    assert small.buffered <= 2048
    # A skippable type over its bound is read past, kept nowhere, and what follows still parses.
    skipping = AgentStream(lambda kind: 100, lambda kind: kind == AgentMsg.CLIPBOARD)
    tail = codec.pack(AgentMsg.MAX_CLIPBOARD, codec.make(AgentMsg.MAX_CLIPBOARD, max=9))
    out = []
    for part in chunks(big + tail):
        out += skipping.feed(part)
        assert skipping.buffered <= 100
    assert out == [(AgentMsg.CLIPBOARD, None), (AgentMsg.MAX_CLIPBOARD, tail[20:])]


def test_file_names_are_sanitised():
    assert safe_name("report.pdf") == "report.pdf"
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\Users\\x\\a.txt") == "a.txt"
    assert safe_name("..") is None and safe_name("") is None and safe_name("dir/") is None
    assert safe_name(".bashrc") is None
    assert safe_name("a\x00b\nc") == "abc"
    assert parse_start(b"[vdagent-file-xfer]\nname=a\\sb.txt\nsize=12\n\x00") == ("a b.txt", 12)
    with pytest.raises(ProtocolError):
        parse_start(b"[other]\nname=a\nsize=1\n")


# -- with the server ------------------------------------------------------------------------------
def test_main_init_announces_the_agent_and_its_capabilities(server):
    with agent_client(server) as client:
        init = next(m for m in client.messages if type(m).__name__ == "MAIN_INIT")
        assert init.agent_connected == 1 and init.agent_tokens > 0
        assert {AgentCap.CLIPBOARD_BY_DEMAND, AgentCap.CLIPBOARD_SELECTION, AgentCap.CLIPBOARD_GRAB_SERIAL,
                AgentCap.MONITORS_CONFIG, AgentCap.REPLY, AgentCap.MAX_CLIPBOARD,
                AgentCap.FILE_XFER_DETAILED_ERRORS} <= client.agent_server_caps
        assert AgentCap.FILE_XFER_DISABLED not in client.agent_server_caps


def test_client_text_copy_reaches_on_clipboard(server):
    got = calls(server, "on_clipboard")
    with agent_client(server) as client:
        client.agent_send(AgentMsg.CLIPBOARD_GRAB, selection=Selection.PRIMARY, serial=0,
                          types=(ClipboardType.UTF8_TEXT).to_bytes(4, "little"))
        client.wait_for(lambda c: c.agent_received(AgentMsg.CLIPBOARD_REQUEST), what="a request")
        request = client.agent_received(AgentMsg.CLIPBOARD_REQUEST)[0]
        assert (request.selection, request.type) == (Selection.PRIMARY, ClipboardType.UTF8_TEXT)
        client.agent_send(AgentMsg.CLIPBOARD, selection=Selection.PRIMARY, type=ClipboardType.UTF8_TEXT,
                          data="grüße".encode() + b"\x00")
        assert got.get(timeout=5) == ("text/plain;charset=utf-8", "grüße".encode(), "primary")


def png_of(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def test_client_bmp_image_arrives_as_png(server):
    pixels = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    got = calls(server, "on_clipboard")
    with agent_client(server) as client:
        client.agent_send(AgentMsg.CLIPBOARD_GRAB, selection=0, serial=0,
                          types=(ClipboardType.IMAGE_BMP).to_bytes(4, "little"))
        client.wait_for(lambda c: c.agent_received(AgentMsg.CLIPBOARD_REQUEST), what="a request")
        client.agent_send(AgentMsg.CLIPBOARD, selection=0, type=ClipboardType.IMAGE_BMP, data=png_of(pixels, "BMP"))
        mime, data, selection = got.get(timeout=5)
    assert (mime, selection) == ("image/png", "clipboard")
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == pixels).all()


def test_application_clipboard_reaches_the_client_in_chunks(server):
    text = ("spicestream " * 1000).encode()  # 12 kB: several AGENT_DATA chunks
    with agent_client(server) as client:
        server.set_clipboard(text)
        client.wait_for(lambda c: c.agent_received(AgentMsg.CLIPBOARD_GRAB), what="a grab")
        grab = client.agent_received(AgentMsg.CLIPBOARD_GRAB)[0]
        assert grab.selection == Selection.CLIPBOARD and u32_list(grab.types) == [ClipboardType.UTF8_TEXT]
        client.agent_send(AgentMsg.CLIPBOARD_REQUEST, selection=0, type=ClipboardType.UTF8_TEXT)
        client.wait_for(lambda c: c.agent_received(AgentMsg.CLIPBOARD), what="the data")
        reply = client.agent_received(AgentMsg.CLIPBOARD)[0]
        assert reply.type == ClipboardType.UTF8_TEXT and reply.data.rstrip(b"\x00") == text
        # A type we do not hold is answered with NONE, not silence.
        client.agent_send(AgentMsg.CLIPBOARD_REQUEST, selection=0, type=ClipboardType.IMAGE_PNG)
        client.wait_for(lambda c: len(c.agent_received(AgentMsg.CLIPBOARD)) == 2, what="a NONE")
        assert client.agent_received(AgentMsg.CLIPBOARD)[1].type == ClipboardType.NONE


def test_a_late_client_is_offered_what_is_on_the_clipboard_and_serials_advance(server):
    server.set_clipboard(png_of(np.zeros((4, 4, 3), np.uint8)), "image/png", "primary")
    with agent_client(server) as client:
        client.wait_for(lambda c: c.agent_received(AgentMsg.CLIPBOARD_GRAB), what="a grab")
        server.set_clipboard("two", selection="primary")
        client.wait_for(lambda c: len(c.agent_received(AgentMsg.CLIPBOARD_GRAB)) >= 2, what="a second grab")
        grabs = client.agent_received(AgentMsg.CLIPBOARD_GRAB)
        assert [g.selection for g in grabs] == [Selection.PRIMARY] * 2
        assert [u32_list(g.types) for g in grabs] == [[ClipboardType.IMAGE_PNG], [ClipboardType.UTF8_TEXT]]
        assert grabs[1].serial == grabs[0].serial + 1
        server.set_clipboard(None, selection="primary")
        client.wait_for(lambda c: c.agent_received(AgentMsg.CLIPBOARD_RELEASE), what="a release")


def test_a_clipboard_over_the_limit_is_passed_over_and_the_session_goes_on(server):
    got = calls(server, "on_clipboard")
    with agent_client(server) as client:
        client.agent_send(AgentMsg.CLIPBOARD_GRAB, selection=0, serial=0, types=(1).to_bytes(4, "little"))
        client.wait_for(lambda c: c.agent_received(AgentMsg.CLIPBOARD_REQUEST), what="a request")
        client.agent_send(AgentMsg.CLIPBOARD, selection=0, type=1, data=b"x" * ((1 << 20) + 1))
        client.agent_send(AgentMsg.CLIPBOARD_GRAB, selection=0, serial=1, types=(1).to_bytes(4, "little"))
        client.wait_for(lambda c: len(c.agent_received(AgentMsg.CLIPBOARD_REQUEST)) == 2, what="a second request")
        client.agent_send(AgentMsg.CLIPBOARD, selection=0, type=1, data=b"small")
        assert got.get(timeout=5) == ("text/plain;charset=utf-8", b"small", "clipboard")
        assert got.empty()


def test_set_clipboard_refuses_what_it_cannot_offer(server):
    with pytest.raises(ClipboardError):
        server.set_clipboard(b"x" * ((1 << 20) + 1))
    with pytest.raises(ClipboardError):
        server.set_clipboard(b"GIF89a", "image/gif")
    with pytest.raises(ClipboardError):
        server.set_clipboard(b"not a png", "image/png")
    with pytest.raises(ClipboardError):
        server.set_clipboard("x", selection="secondary")


def test_monitors_config_reaches_on_resize_and_is_answered(server):
    got = calls(server, "on_resize")
    with agent_client(server) as client:
        monitors = MON_CONFIG.pack(MON_CONFIG.type(600, 800, 32, 0, 0))
        client.agent_send(AgentMsg.MONITORS_CONFIG, num_of_monitors=1, flags=1, monitors=monitors)
        assert got.get(timeout=5)[:2] == (800, 600)
        client.wait_for(lambda c: c.agent_received(AgentMsg.REPLY), what="a reply")
        reply = client.agent_received(AgentMsg.REPLY)[0]
        assert (reply.type, reply.error) == (AgentMsg.MONITORS_CONFIG, 1)
    seen = []
    server.on_resize = lambda w, h, monitors: seen.append((w, h, monitors))
    with agent_client(server) as client:
        two = MON_CONFIG.pack(MON_CONFIG.type(768, 1024, 32, 0, 0)) + MON_CONFIG.pack(MON_CONFIG.type(768, 1024, 32, 1024, 0))
        client.agent_send(AgentMsg.MONITORS_CONFIG, num_of_monitors=2, flags=1, monitors=two)
        client.wait_for(lambda c: c.agent_received(AgentMsg.REPLY), what="a reply")
    assert seen[0][:2] == (2048, 768) and [m["x"] for m in seen[0][2]] == [0, 1024]


def send_file(client, xfer_id, name, payload, size=None):
    text = f"[vdagent-file-xfer]\nname={name}\nsize={len(payload) if size is None else size}\n".encode()
    client.agent_send(AgentMsg.FILE_XFER_START, id=xfer_id, data=text + b"\x00")
    client.wait_for(lambda c: any(s.id == xfer_id for s in c.agent_received(AgentMsg.FILE_XFER_STATUS)),
                    what="a status")
    status = next(s for s in client.agent_received(AgentMsg.FILE_XFER_STATUS) if s.id == xfer_id)
    if status.result != XferStatus.CAN_SEND_DATA:
        return status
    for i in range(0, len(payload), 4096):
        piece = payload[i:i + 4096]
        client.agent_send(AgentMsg.FILE_XFER_DATA, id=xfer_id, size=len(piece), data=piece)
    return status


def final_status(client, xfer_id):
    client.wait_for(lambda c: [s for s in c.agent_received(AgentMsg.FILE_XFER_STATUS)
                               if s.id == xfer_id and s.result != XferStatus.CAN_SEND_DATA], what="the outcome")
    return [s for s in client.agent_received(AgentMsg.FILE_XFER_STATUS)
            if s.id == xfer_id and s.result != XferStatus.CAN_SEND_DATA][0]


def test_file_transfer_lands_whole_under_a_unique_sanitised_name(server, tmp_path):
    got = calls(server, "on_file")
    payload = os.urandom(100_000)
    (tmp_path / "notes.txt").write_bytes(b"already here")
    with agent_client(server) as client:
        send_file(client, 1, "../../notes.txt", payload)
        assert final_status(client, 1).result == XferStatus.SUCCESS
        name, path = got.get(timeout=5)
    assert name == "notes (1).txt" and path == str(tmp_path / "notes (1).txt")
    assert (tmp_path / "notes (1).txt").read_bytes() == payload
    assert (tmp_path / "notes.txt").read_bytes() == b"already here"
    assert sorted(os.listdir(tmp_path)) == ["notes (1).txt", "notes.txt"]


def test_a_file_is_synced_to_disk_off_the_servers_loop(server, tmp_path, monkeypatch):
    """fsync of a large file on a slow disk takes seconds: it must not freeze the server (every
    client's picture and sound) meanwhile. Here fsync blocks until the test lets it go; the
    server answers another transfer while it waits, and the file lands once it returns."""
    import threading

    from spicestream.server import filexfer

    syncing, release = threading.Event(), threading.Event()
    real_fsync = filexfer.os.fsync

    def slow_fsync(fd):
        syncing.set()
        release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(filexfer.os, "fsync", slow_fsync)
    got = calls(server, "on_file")
    with agent_client(server) as client:
        send_file(client, 1, "slow.bin", b"s" * 5000)
        assert syncing.wait(5)
        # The loop is free: a second transfer is answered while the first is being synced.
        assert send_file(client, 2, "next.bin", b"", size=10).result == XferStatus.CAN_SEND_DATA
        assert not [s for s in client.agent_received(AgentMsg.FILE_XFER_STATUS)
                    if s.id == 1 and s.result != XferStatus.CAN_SEND_DATA]  # not before it is kept
        assert not os.path.exists(tmp_path / "slow.bin")
        release.set()
        assert final_status(client, 1).result == XferStatus.SUCCESS
        assert got.get(timeout=5) == ("slow.bin", str(tmp_path / "slow.bin"))
    assert (tmp_path / "slow.bin").read_bytes() == b"s" * 5000


def test_file_transfers_and_agent_messages_are_in_stats_and_metrics(server, tmp_path):
    with agent_client(server) as client:
        send_file(client, 1, "a.txt", b"abc")
        assert final_status(client, 1).result == XferStatus.SUCCESS
        assert send_file(client, 2, "..", b"x").result == XferStatus.ERROR
        agents = server.stats()["server"]["agents"]
        assert len(agents) == 1
        files = agents[0]["files"]
        assert (files["completed"], files["refused"], files["active"], files["finishing"]) == (1, 1, 0, 0)
        assert agents[0]["messages"]["FILE_XFER_START"] == 2
        text = metrics_text(server)
        peer = agents[0]["peer"]
        assert f'spicestream_files_received_total{{client="{peer}"}} 1.0' in text
        assert f'spicestream_files_refused_total{{client="{peer}"}} 1.0' in text
        assert f'spicestream_agent_messages_total{{client="{peer}",type="FILE_XFER_START"}} 2.0' in text
    deadline = time.monotonic() + 5  # the server sees the close on its own thread
    while server.stats()["server"]["agents"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.stats()["server"]["agents"] == []  # gone with its client


def test_file_transfer_refusals_and_cancels_leave_nothing(server, tmp_path):
    with agent_client(server) as client:
        status = send_file(client, 1, "big.bin", b"", size=(1 << 20) + 1)
        assert status.result == XferStatus.NOT_ENOUGH_SPACE
        assert XFER_NOT_ENOUGH_SPACE.unpack(status.data).disk_free_space <= 1 << 20
        status = send_file(client, 2, "..", b"abc")
        assert status.result == XferStatus.ERROR and len(status.data) == 5  # detailed: GIO error
        assert send_file(client, 3, "half.bin", b"", size=5000).result == XferStatus.CAN_SEND_DATA
        client.agent_send(AgentMsg.FILE_XFER_DATA, id=3, size=2000, data=b"y" * 2000)
        client.agent_send(AgentMsg.FILE_XFER_STATUS, id=3, result=XferStatus.CANCELLED, data=b"")
        assert send_file(client, 4, "orphan.bin", b"", size=5000).result == XferStatus.CAN_SEND_DATA
        client.agent_send(AgentMsg.FILE_XFER_DATA, id=4, size=10, data=b"z" * 10)
        send_file(client, 5, "empty.txt", b"")
        assert final_status(client, 5).result == XferStatus.SUCCESS
    # The client left with transfer 4 half done: nothing partial stays behind.
    deadline = time.monotonic() + 5
    while os.listdir(tmp_path) != ["empty.txt"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(tmp_path) == ["empty.txt"]


def test_file_transfer_is_refused_without_a_folder():
    with spicestream.Server(port=0, width=64, height=64) as srv:
        with agent_client(srv) as client:
            assert AgentCap.FILE_XFER_DISABLED in client.agent_server_caps  # spice-gtk stops there
            assert send_file(client, 9, "a.txt", b"abc").result == XferStatus.DISABLED


def test_hostile_agent_data_closes_only_that_client(server):
    got = calls(server, "on_clipboard")
    with agent_client(server) as good:
        bad = [TestClient("127.0.0.1", server.port, agent_caps=GTK_CAPS, channels=()).connect() for _ in range(3)]
        for client in bad:
            client.wait_for(lambda c: c.agent_server_caps is not None, what="the agent's capabilities")
        # A wrong protocol number; a monitors config over any display's size (refused at its
        # header, before its body is buffered); a monitor count beyond any display.
        bad[0].agent_send_raw(HEADER.pack(HEADER.type(7, 4, 0, 4)) + b"\0" * 4)
        bad[1].agent_send_raw(HEADER.pack(HEADER.type(1, AgentMsg.MONITORS_CONFIG, 0, 1 << 20)))
        bad[2].agent_send(AgentMsg.MONITORS_CONFIG, num_of_monitors=1000, flags=0, monitors=b"")
        for client in bad:
            client.wait_for(lambda c: Ch.MAIN in c.closed_channels, what="the bad client closed")
            client.close()
        good.agent_send(AgentMsg.CLIPBOARD_GRAB, selection=0, serial=0, types=(1).to_bytes(4, "little"))
        good.wait_for(lambda c: c.agent_received(AgentMsg.CLIPBOARD_REQUEST), what="a request")
        good.agent_send(AgentMsg.CLIPBOARD, selection=0, type=1, data=b"still here\0")
        assert got.get(timeout=5) == ("text/plain;charset=utf-8", b"still here", "clipboard")


# -- fuzz: the agent only ever raises ProtocolError ------------------------------------------------
def _random_agent_message(rng, codec):
    from spicestream.protocol.agent import AGENT_TABLE

    kind, fields = rng.choice(AGENT_TABLE)
    values = {}
    for name, field in fields:
        if name in ("selection",):
            values[name] = rng.choice([0, 1, 2, 3, 255])
        elif name == "reserved":
            values[name] = None
        elif name in ("caps", "types", "monitors", "data"):
            values[name] = rng.randbytes(rng.choice([0, 3, 4, 8, 20, 40, rng.randint(0, 300)]))
        elif name == "size" and kind == AgentMsg.FILE_XFER_DATA:
            values[name] = rng.choice([0, 4, 8, 2 ** 64 - 1])
        elif name == "max":
            values[name] = rng.randint(-(2 ** 31), 2 ** 31 - 1)
        else:
            values[name] = rng.choice([0, 1, 2, 3, 16, 17, 1000, 2 ** 32 - 1])
    if kind == AgentMsg.FILE_XFER_START and rng.random() < 0.5:
        values["data"] = f"[vdagent-file-xfer]\nname={rng.choice(['a', '..', '/x', 'b c'])}\nsize={rng.randint(-2, 99)}\n".encode()
    return codec.pack(kind, codec.make(kind, **values))


def test_agent_fuzz_raises_only_protocol_errors(tmp_path):
    import random

    from spicestream.display.surface import Display
    from spicestream.server.agent import Agent
    from spicestream.server.core import ServerCore
    from spicestream.server.filexfer import FileTransferConfig

    fatal = 0
    for seed in range(300):
        rng = random.Random(seed)
        core = ServerCore(Display(64, 64), None, "fuzz")
        core.file_transfer = FileTransferConfig(str(tmp_path), 10_000)
        agent = Agent(core, FakeConnection("fuzz"), "fuzz")
        caps = set(rng.sample(sorted(AgentCap), rng.randint(0, len(AgentCap))))
        codec = AgentCodec(caps)
        stream = b""
        if rng.random() < 0.8:
            stream += codec.pack(AgentMsg.ANNOUNCE_CAPABILITIES,
                                 codec.make(AgentMsg.ANNOUNCE_CAPABILITIES, request=1, caps=caps_words(caps)))
        for _ in range(rng.randint(1, 30)):
            stream += _random_agent_message(rng, codec) if rng.random() < 0.9 else rng.randbytes(rng.randint(1, 50))
        try:
            agent.start(rng.choice([0, 1, 5, 0xFFFFFFFF]))
            for part in chunks(stream):
                agent.token(1)
                agent.data(part)
        except ProtocolError:
            fatal += 1
        finally:
            agent.closed()
        assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")], seed
    assert 30 < fatal < 290  # both outcomes were exercised


def test_the_demo_follows_a_client_resize():
    import threading

    from spicestream.sources.demo import DemoResize, run_demo

    with spicestream.Server(port=0, width=64, height=64, streaming_video="off") as srv:
        resize, stop = DemoResize(), threading.Event()
        srv.on_resize = resize.request
        demo = threading.Thread(target=run_demo, args=(srv.display, 10, (320, 240), stop), kwargs={"resize": resize})
        demo.start()
        try:
            with TestClient("127.0.0.1", srv.port, agent_caps=GTK_CAPS) as client:
                client.wait_for(lambda c: c.frame is not None and c.frame.shape[:2] == (240, 320), what="the demo")
                client.wait_for(lambda c: c.agent_server_caps is not None, what="the agent")
                monitors = MON_CONFIG.pack(MON_CONFIG.type(301, 417, 32, 0, 0))  # odd: made even
                client.agent_send(AgentMsg.MONITORS_CONFIG, num_of_monitors=1, flags=0, monitors=monitors)
                # Drawn at the new size, not just a new (black) surface.
                client.wait_for(lambda c: c.frame is not None and c.frame.shape[:2] == (300, 416)
                                and c.frame[..., :3].any(), what="the demo drawn at the new size")
        finally:
            stop.set()
            demo.join(5)
