import numpy as np

from spicestream.display.damage import TILE, TileGrid, cells_to_rects, diff_tiles


def covered(rects, w, h):
    mask = np.zeros((h, w), bool)
    for x, y, rw, rh in rects:
        assert 0 <= x and 0 <= y and x + rw <= w and y + rh <= h
        mask[y : y + rh, x : x + rw] = True
    return mask


def test_rects_cover_exactly_the_dirty_tiles():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = rng.integers(1, 700, 2)
        grid = TileGrid(int(w), int(h))
        grid.cells[:] = rng.random(grid.cells.shape) < 0.3
        cells = grid.cells.copy()
        rects = cells_to_rects(cells, int(w), int(h))
        expect = np.repeat(np.repeat(cells, TILE, 0), TILE, 1)[:h, :w]
        if len(rects) > 1:
            assert (covered(rects, int(w), int(h)) == expect).all()
        else:
            assert covered(rects, int(w), int(h))[expect].all()


def test_add_rect_clips_and_take_clears():
    grid = TileGrid(100, 100)
    grid.add_rect(-50, 90, 500, 500)
    assert grid.take_rects() == [(0, 64, 100, 36)]
    assert not grid and grid.take_rects() == []


def test_diff_tiles_finds_single_pixel_changes():
    a = np.zeros((130, 200, 4), np.uint8)
    b = a.copy()
    b[129, 199, 3] = 1
    b[0, 70, 0] = 9
    cells = diff_tiles(b, a)
    assert cells.shape == (3, 4)
    assert set(zip(*np.nonzero(cells))) == {(2, 3), (0, 1)}
    # Non-contiguous inputs take the generic path.
    assert (diff_tiles(b[:, ::-1][:, ::-1], a) == cells).all()


def test_repeated_damage_rectangles_reach_every_view_and_follow_a_resize():
    from spicestream.display.surface import GRID_CACHE, Display
    display = Display(640, 360, "off")
    view = display.attach()
    view.take()
    frame = np.zeros((360, 640, 4), np.uint8)
    for k in range(3 * GRID_CACHE):  # more patterns than are kept, each seen twice
        rect = (k * 40 % 600, 0, 20, 70)
        expected = TileGrid(640, 360)
        expected.add_rect(*rect)
        expected = expected.take_rects()
        for _ in range(2):
            display.update(frame, [rect])
            assert view.take()[1] == expected
    assert len(display._grids) == GRID_CACHE
    display.update(frame, [[0, 0, 64, 64]])  # lists: not a key, still damage
    assert view.take()[1] == [(0, 0, 64, 64)]
    display.resize(320, 200)
    view.new_surface(), view.take()
    display.update(np.zeros((200, 320, 4), np.uint8), [(0, 0, 20, 70)])
    assert view.take()[1] == [(0, 0, 64, 128)] and view.damage.cells.shape == (4, 5)
