"""The headless test client sees exactly what the application drew (pixel for pixel)."""

import threading

import numpy as np
import pytest

from spicestream.protocol.constants import DisplayCap
from spicestream.protocol.messages import SERVER
from spicestream.testing.client import DEFAULT_DISPLAY_CAPS

from helpers import random_frame, same_picture

NO_LZ4 = tuple(c for c in DEFAULT_DISPLAY_CAPS if c != DisplayCap.LZ4_COMPRESSION)


@pytest.mark.parametrize("kwargs", [{}, {"display_caps": NO_LZ4}, {"mini_header": False}],
                         ids=["lz4", "bitmap", "full-header"])
def test_first_frame_and_updates_match(server, connect, kwargs):
    frame = random_frame(240, 320)
    server.display.update(frame)
    client = connect(**kwargs)
    client.wait_for(lambda c: c.marked and same_picture(c.frame, frame), what="first frame")
    kinds = [type(m) for m in client.messages]
    order = [SERVER.DISPLAY_SURFACE_CREATE, SERVER.DISPLAY_MONITORS_CONFIG,
             SERVER.DISPLAY_DRAW_COPY, SERVER.DISPLAY_MARK]
    assert [k for k in kinds if k in order][:4] == order  # brief §5.6 order
    for seed in range(1, 4):
        frame = frame.copy()
        frame[30 * seed : 30 * seed + 40, 50:90] = random_frame(40, 40, seed)
        server.display.update(frame)
        client.wait_for(lambda c: same_picture(c.frame, frame), what=f"update {seed}")


def test_given_damage_is_all_that_is_sent(server, connect):
    frame = random_frame(240, 320)
    server.display.update(frame)
    client = connect(display_caps=NO_LZ4)
    client.wait_for(lambda c: same_picture(c.frame, frame))
    before = client.bytes_drawn
    new = frame.copy()
    new[10:20, 10:20] = 0
    new[200:210, 300:310] = 0  # changed but not declared damaged: must not be sent
    server.display.update(new, damage=[(10, 10, 10, 10)])
    client.wait_for(lambda c: (c.frame[10:20, 10:20, :3] == 0).all())
    assert client.bytes_drawn - before <= 64 * 64 * 4 + 200  # one tile at most
    assert (client.frame[200:210, 300:310] == frame[200:210, 300:310]).all()


def test_damage_found_by_tile_comparison(server, connect):
    frame = random_frame(240, 320)
    server.display.update(frame)
    client = connect(display_caps=NO_LZ4)
    client.wait_for(lambda c: same_picture(c.frame, frame))
    draws, before = client.draws, client.bytes_drawn
    frame[100, 100] = (1, 2, 3, 255)  # drawn in place into the same array: no damage given
    server.display.update(frame)
    client.wait_for(lambda c: same_picture(c.frame, frame))
    assert client.draws == draws + 1
    assert client.bytes_drawn - before <= 64 * 64 * 4 + 200
    server.display.update(frame)  # unchanged: nothing is sent
    assert server.display.views[0].pending is False


def test_lz4_full_hd_update_is_far_below_raw_size(connect, server):
    from spicestream.sources.demo import DemoScene

    server.display.resize(1920, 1080)
    frame, _ = DemoScene(1920, 1080).render(0.0)
    server.display.update(frame)
    client = connect()
    client.wait_for(lambda c: same_picture(c.frame, frame), timeout=20)
    raw = 1920 * 1080 * 4
    assert client.bytes_drawn < raw / 4, f"{client.bytes_drawn} bytes for a {raw}-byte frame"


def test_resize_gives_a_new_surface(server, connect):
    client = connect()
    client.wait_for(lambda c: c.marked and c.frame is not None and c.frame.shape == (240, 320, 4))
    server.display.resize(200, 100)
    frame = random_frame(100, 200, 5)
    server.display.update(frame)
    client.wait_for(lambda c: same_picture(c.frame, frame), what="resized frame")
    kinds = [type(m) for m in client.messages]
    assert SERVER.DISPLAY_SURFACE_DESTROY in kinds
    with pytest.raises(ValueError, match="100x200x4"):
        server.display.update(random_frame(240, 320))


def test_frames_are_not_copied_and_odd_layouts_work(server, connect):
    client = connect()
    frame = random_frame(240, 320, 9)
    server.display.update(frame, damage=[(0, 0, 320, 240)])
    assert server.display.frame is frame  # kept by reference
    client.wait_for(lambda c: same_picture(c.frame, frame))
    big = random_frame(300, 400, 10)
    view = big[10:250, 20:340]  # rows not contiguous
    server.display.update(view)
    client.wait_for(lambda c: same_picture(c.frame, view))
    raw = bytes(random_frame(240, 320, 11))  # any buffer with the layout
    server.display.update(raw)
    client.wait_for(lambda c: same_picture(c.frame, np.frombuffer(raw, np.uint8).reshape(240, 320, 4)))


def test_updates_from_many_threads(server, connect):
    client = connect()
    frames = [random_frame(240, 320, s) for s in range(4)]

    def draw(i):
        for _ in range(20):
            server.display.update(frames[i])

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = random_frame(240, 320, 99)
    server.display.update(final)
    client.wait_for(lambda c: same_picture(c.frame, final))


def test_two_clients_and_one_leaves(server, connect):
    a, b = connect(), connect()
    frame = random_frame(240, 320, 3)
    server.display.update(frame)
    for c in (a, b):
        c.wait_for(lambda c: same_picture(c.frame, frame))
    assert a.session_id != b.session_id and server.sessions == 2
    a.close()
    frame = random_frame(240, 320, 4)
    server.display.update(frame)
    b.wait_for(lambda c: same_picture(c.frame, frame))
    b.wait_for(lambda c: server.sessions == 1, what="session closed")


def test_cursor_init_is_visible_alpha(connect):
    client = connect()
    client.wait_for(lambda c: c.cursor is not None)
    cursor = client.cursor
    assert cursor.visible == 1
    flags, kind, width, height = (int.from_bytes(cursor.cursor[0:2], "little"), cursor.cursor[10],
                                  int.from_bytes(cursor.cursor[11:13], "little"),
                                  int.from_bytes(cursor.cursor[13:15], "little"))
    assert flags == 0 and kind == 0 and (width, height) == (32, 32)
    pixels = np.frombuffer(cursor.cursor[19:], np.uint8).reshape(32, 32, 4)
    assert (pixels[..., 3] == 255).sum() > 50  # a visible shape, not an empty image
