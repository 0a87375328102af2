"""Small helpers shared by the tests."""

import numpy as np


def random_frame(height, width, seed=0):
    frame = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    frame[..., 3] = 255
    return frame


def same_picture(a, b):
    """Equal in B, G, R (the x byte is not part of the picture)."""
    return a is not None and b is not None and a.shape == b.shape and (a[..., :3] == b[..., :3]).all()
