"""The server's periodic work rides on display updates, with a timer for when none come
(server/ticks.py), judged with an injected clock."""

from spicestream.display.scanout import DRAW_TIMEOUT_S
from spicestream.server.ticks import TICK_IDLE_S, TICK_S, TickSchedule


def run_schedule(frame_times: list[float], until: float) -> tuple[list[float], list[float]]:
    """Drive a TickSchedule as the server does: updates at `frame_times`, the timer where
    `ran` puts it. Returns (runs on an update, runs on the timer)."""
    schedule = TickSchedule(0.0)
    timer = schedule.ran(0.0)
    on_updates, on_timer = [], []
    frames = iter(frame_times)
    frame = next(frames, None)
    while True:
        now = min(timer, frame) if frame is not None else timer
        if now > until:
            return on_updates, on_timer
        if now == timer:
            on_timer.append(now)
            timer = schedule.ran(now)
            continue
        frame = next(frames, None)
        if schedule.due_on_update(now):
            on_updates.append(now)
            timer = schedule.ran(now)


def test_frames_at_30_and_60_fps_carry_the_work_and_the_timer_never_fires():
    on_updates, on_timer = run_schedule([k / 30 for k in range(1, 301)], until=10.0)
    assert (len(on_updates), on_timer) == (150, [])  # every other frame
    on_updates, on_timer = run_schedule([k / 60 for k in range(1, 601)], until=10.0)
    assert (len(on_updates), on_timer) == (200, [])  # every third frame


def test_jittered_frames_keep_the_work_between_the_update_period_and_the_idle_timer():
    import random

    rng = random.Random(7)
    times = [k / 30 + rng.uniform(-0.008, 0.008) for k in range(1, 301)]
    on_updates, on_timer = run_schedule(sorted(times), until=10.0)
    gaps = [b - a for a, b in zip(on_updates, on_updates[1:])]
    assert on_timer == [] and min(gaps) >= 0.04 and max(gaps) < TICK_IDLE_S


def test_without_updates_the_timer_runs_the_work_ten_times_a_second():
    on_updates, on_timer = run_schedule([], until=2.05)
    assert on_updates == [] and len(on_timer) == 20
    # Frames that stop: the timer takes over 100 ms after the last run.
    on_updates, on_timer = run_schedule([k / 30 for k in range(1, 31)], until=1.5)
    assert on_updates[-1] <= 1.0 and on_timer[0] == on_updates[-1] + TICK_IDLE_S


def test_a_draw_timeout_plus_the_longest_wait_for_a_run_stays_within_the_promised_second():
    # A draw expires DRAW_TIMEOUT_S after it was made, and the timer is armed at the next
    # deadline; even a run that came TICK_IDLE_S late would complete it within the second.
    assert DRAW_TIMEOUT_S + TICK_IDLE_S <= 1.0


def test_a_waiting_frame_or_a_draw_deadline_brings_the_timer_forward():
    schedule = TickSchedule(0.0)
    assert schedule.ran(1.0) == 1.0 + TICK_IDLE_S
    assert schedule.ran(2.0, hurry=True) == 2.0 + TICK_S
    assert schedule.ran(3.0, deadline=3.03) == 3.03
    assert schedule.ran(4.0, deadline=5.0) == 4.0 + TICK_IDLE_S
    assert schedule.ran(6.0, deadline=5.9) == 6.0  # overdue: at once
