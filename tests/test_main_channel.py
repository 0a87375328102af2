"""Main channel behaviour: INIT, channel list, mouse modes, name/uuid, pings, disconnect."""

import spicestream
from spicestream.protocol.constants import ChannelType as Ch
from spicestream.protocol.constants import MainCap, MouseMode
from spicestream.protocol.messages import CLIENT, SERVER
from spicestream.server import channels
from spicestream.testing.client import TestClient


def kinds(client):
    return [type(m) for m in client.messages]


def test_init_and_channels_list(server, connect):
    client = connect()
    client.wait_for(lambda c: SERVER.MAIN_MULTI_MEDIA_TIME in kinds(c))
    init = next(m for m in client.messages if type(m) is SERVER.MAIN_INIT)
    assert init.session_id != 0 and init.display_channels_hint == 1
    assert init.supported_mouse_modes == 3 and init.current_mouse_mode == MouseMode.CLIENT
    assert init.multi_media_time != 0
    listed = next(m for m in client.messages if type(m) is SERVER.MAIN_CHANNELS_LIST)
    assert [(e.type, e.id) for e in listed.channels] == [(2, 0), (3, 0), (4, 0), (5, 0), (6, 0)]


def test_mouse_mode_request(connect):
    client = connect()
    client.send(Ch.MAIN, CLIENT.MAIN_MOUSE_MODE_REQUEST(MouseMode.SERVER))
    client.wait_for(lambda c: SERVER.MAIN_MOUSE_MODE in kinds(c))
    reply = next(m for m in client.messages if type(m) is SERVER.MAIN_MOUSE_MODE)
    assert (reply.supported_modes, reply.current_mode) == (3, MouseMode.SERVER)


def test_name_and_uuid_only_with_the_cap(server):
    # The test client does not advertise NAME_AND_UUID, so the server must not send them.
    with TestClient("127.0.0.1", server.port) as client:
        client.wait_for(lambda c: c.marked)
        assert SERVER.MAIN_NAME not in kinds(client) and SERVER.MAIN_UUID not in kinds(client)
    with TestClient("127.0.0.1", server.port, main_caps=(MainCap.NAME_AND_UUID,)) as client:
        client.wait_for(lambda c: SERVER.MAIN_UUID in kinds(c))
        name = next(m for m in client.messages if type(m) is SERVER.MAIN_NAME)
        uuid = next(m for m in client.messages if type(m) is SERVER.MAIN_UUID)
        assert name.name == b"spicestream\x00" and len(uuid.uuid) == 16


def test_ping_is_answered_and_round_trip_measured(monkeypatch):
    monkeypatch.setattr(channels, "PING_INTERVAL_S", 0.05)
    srv = spicestream.Server(port=0, width=64, height=64).start()
    try:
        with TestClient("127.0.0.1", srv.port) as client:
            main = lambda: next(c for c in srv._core.connections if isinstance(c.handler, channels.MainChannel))
            client.wait_for(lambda c: main().proto.last_roundtrip_ms is not None, what="PONG")
            assert 0 <= main().proto.last_roundtrip_ms < 1000
    finally:
        srv.stop()


def test_stop_sends_disconnecting(server, connect):
    client = connect()
    client.wait_for(lambda c: c.marked)
    server.stop()
    client.wait_for(lambda c: Ch.MAIN in c.closed_channels, what="main closed")
