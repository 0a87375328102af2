"""The built-in MJPEG encoder works on the caller's thread for small frames (no hand-off to
its thread and back), on its thread for large ones; the choice is made from measured encodes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from xclient import wait_until

from spicestream.video import mjpeg
from spicestream.video.codec import Codec

pytestmark = pytest.mark.skipif(mjpeg.simplejpeg is None, reason="simplejpeg is not installed")

FAST, SLOW = mjpeg.INLINE_MAX_S / 4, mjpeg.INLINE_MAX_S * 4


def test_inline_needs_enough_small_encodes():
    assert not mjpeg.encodes_inline([])
    assert not mjpeg.encodes_inline([FAST] * (mjpeg.INLINE_SAMPLES - 1))  # not measured yet
    assert mjpeg.encodes_inline([FAST] * mjpeg.INLINE_SAMPLES)
    assert not mjpeg.encodes_inline([SLOW] * mjpeg.INLINE_SAMPLES)
    # One encode the scheduler interrupted does not send frames to the thread; most being
    # slow does.
    assert mjpeg.encodes_inline([FAST, FAST, FAST, FAST, 100 * SLOW])
    assert not mjpeg.encodes_inline([FAST, FAST, SLOW, SLOW, SLOW])


def _encoder(width=64, height=48):
    out, errors = [], []
    encoder = mjpeg.MjpegEncoder(
        Codec.MJPEG, width, height, 1_000_000,
        lambda frame: out.append((threading.get_ident(), frame)), errors.append)
    return encoder, out, errors


def _wait_for(out, n):
    wait_until(lambda: len(out) >= n, 20, interval=0.002, what=f"{n} frames encoded")


def test_small_frames_go_inline_once_measured_and_back_to_the_thread_when_slow():
    encoder, out, errors = _encoder()
    frame = np.random.default_rng(1).integers(0, 256, (48, 64, 4), dtype=np.uint8)
    try:
        # Unmeasured: the first frame goes to the encoder's thread, and is measured there.
        assert encoder.encode(frame, 1)
        _wait_for(out, 1)
        assert out[0][0] != threading.get_ident()
        assert len(encoder.recent_s) == 1 and 0 < encoder.recent_s[0] < 5.0

        # Measured fast: encoded on this thread, handed over before encode() returns.
        encoder.recent_s.extend([FAST] * mjpeg.INLINE_SAMPLES)
        assert encoder.encode(frame, 2)
        assert len(out) == 2 and out[1][0] == threading.get_ident()
        assert encoder.inline_frames == 1 and encoder.in_flight == 0

        # Measured slow: back to the thread.
        encoder.recent_s.extend([SLOW] * mjpeg.INLINE_SAMPLES)
        assert encoder.encode(frame, 3)
        _wait_for(out, 3)
        assert out[2][0] != threading.get_ident()
        assert encoder.inline_frames == 1

        assert [f.timestamp_ms for _t, f in out] == [1, 2, 3]
        for _thread, f in out:  # each a whole JPEG of the frame's size
            assert mjpeg.simplejpeg.decode_jpeg_header(f.data)[:2] == (48, 64)
        assert errors == [] and encoder.stats()["inline_frames"] == 1
    finally:
        encoder.close()


def test_an_inline_encode_that_fails_is_reported_not_raised():
    encoder, out, errors = _encoder()
    encoder.recent_s.extend([FAST] * mjpeg.INLINE_SAMPLES)
    encoder.quality = "not a quality"  # simplejpeg refuses it
    try:
        assert encoder.encode(np.zeros((48, 64, 4), np.uint8), 1)  # taken, then failed
        assert out == [] and len(errors) == 1 and errors[0].startswith("simplejpeg")
        assert encoder.in_flight == 0  # the encoder takes the next frame
    finally:
        encoder.close()


def test_an_encoder_that_never_used_its_thread_never_started_one():
    encoder, _out, _errors = _encoder()
    encoder.close()
    assert encoder._thread is None
