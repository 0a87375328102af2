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
