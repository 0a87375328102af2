"""The update rate a new stream's encoder is given (display/framerate.py), with an injected clock."""

from spicestream.display.framerate import DEFAULT_FPS, WINDOW, FrameRate


def fed(times) -> FrameRate:
    rate = FrameRate()
    for t in times:
        rate.observe(t)
    return rate


def test_a_burst_of_two_updates_does_not_move_the_rate():
    # 30 fps, with a second update 2 ms after the first (as two captures close together at
    # the start of an export). A moving average of 1/interval read 58 after it.
    times = [0.0, 0.002] + [0.002 + k / 30 for k in range(1, 6)]
    assert abs(fed(times).fps - 30) < 0.01
    ema = 30.0
    for a, b in zip(times, times[1:]):
        ema += (1 / (b - a) - ema) * 0.1
    assert ema > 55  # what the stream was told before


def test_the_rate_follows_a_source_that_changes_its_pace():
    times = [k / 60 for k in range(60)]
    assert abs(fed(times).fps - 60) < 0.01
    rate = fed(times)
    last = times[-1]
    for k in range(1, WINDOW // 2 + 2):  # a majority of the window at 10 fps
        rate.observe(last + k / 10)
    assert abs(rate.fps - 10) < 0.01


def test_idle_gaps_and_no_updates_are_not_a_rate():
    assert fed([]).fps == DEFAULT_FPS
    assert fed([0.0]).fps == DEFAULT_FPS
    assert fed([0.0, 5.0, 10.0]).fps == DEFAULT_FPS  # seconds apart: a desktop at rest
    assert abs(fed([0.0, 5.0, 5.04, 5.08]).fps - 25) < 0.01
