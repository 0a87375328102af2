"""The stream decisions of video/streampolicy.py, driven with a synthetic clock: stamps and
the client's playout margin, what is admitted, where frames went, MJPEG quality."""

import random

import pytest

from spicestream.video.ratecontrol import RateController
from spicestream.video.streampolicy import (
    MM_WRAP, QUALITY_JUDGED_AFTER, SPARE_MS, START_LEAD_MS, FrameLedger, Playout, QualityTuner,
    admit, next_quality_index, wants_key_frame, wire_stamp)


def signed(diff: int) -> int:
    """A u32 difference as spice-gtk reads it (spice_mmtime_diff)."""
    diff %= MM_WRAP
    return diff - MM_WRAP if diff >= MM_WRAP // 2 else diff


class Client:
    """A client as spice-gtk keeps time: its media clock runs `offset_ms` behind the server's
    (the one-way delay of MAIN_INIT); a frame's margin is its stamp minus the client's clock
    when the frame arrives; a report every 5 frames carries the last frame's margin and how
    many of the 5 arrived late."""

    def __init__(self, playout: Playout, offset_ms: int):
        self.playout, self.offset_ms = playout, offset_ms
        self.window: list[int] = []
        self.margins: list[int] = []
        self.stamps: list[int] = []

    def frame(self, send_mm: int, transit_ms: int) -> int:
        stamp = self.playout.stamp(send_mm)
        client_clock = send_mm + transit_ms - self.offset_ms
        margin = signed(stamp - wire_stamp(client_clock))
        self.stamps.append(stamp)
        self.margins.append(margin)
        self.window.append(margin)
        if len(self.window) == 5:
            self.playout.on_report(stamp, 5, sum(m < 0 for m in self.window), margin)
            self.window = []
        return margin


def test_lead_converges_to_what_frames_need_plus_a_little():
    rng = random.Random(1)
    playout = Playout()
    client = Client(playout, offset_ms=2)
    for k in range(300):  # 10 s at 30 fps; transit 1-6 ms (a LAN, a busy client)
        client.frame(1000 + k * 33, rng.randint(1, 6))
    settled = client.margins[60:]
    assert min(settled) >= 0, "frames arrived late once the lead had settled"
    # The most any frame needed was 6 - 2 = 4 ms: the lead sits a few ms above, not at a
    # frame interval.
    assert playout.lead_ms <= 4 + SPARE_MS + 1
    assert sorted(settled)[len(settled) // 2] <= SPARE_MS + 5


def test_first_frames_use_the_start_lead_and_a_late_report_raises_it_at_once():
    playout = Playout()
    assert signed(playout.stamp(5000) - 5000) == START_LEAD_MS
    client = Client(playout, offset_ms=0)
    for k in range(50):
        client.frame(5000 + k * 33, 2)
    low = playout.lead_ms
    margin = client.frame(5000 + 50 * 33, 40)  # the network hiccups: 40 ms
    while len(client.window) != 0:
        margin = client.frame(5000 + (51 + len(client.margins)) * 33, 40)
    assert margin < 0
    assert playout.lead_ms >= 40 + SPARE_MS > low
    assert client.frame(5000 + 200 * 33, 40) >= 0  # the next frame is on time


def test_unknown_late_frames_in_a_window_raise_the_lead():
    playout = Playout()
    wire = playout.stamp(100)
    before = playout.lead_ms
    playout.on_report(wire, 5, 3, margin_ms=2)  # the last was on time, others were not
    assert playout.lead_ms >= before + 5 - 2


def test_lead_comes_down_once_the_spike_leaves_the_window():
    playout = Playout()
    client = Client(playout, offset_ms=0)
    for k in range(20):
        client.frame(k * 33, 50)
    assert playout.lead_ms >= 50
    for k in range(20, 400):
        client.frame(k * 33, 2)
    assert playout.lead_ms <= 2 + SPARE_MS + 1


def test_stamps_never_go_backwards_while_the_lead_shrinks():
    playout = Playout(start_lead_ms=200)
    first = playout.stamp(1000)
    playout._needs.clear()
    playout.on_report(first, 5, 0, margin_ms=199)  # frames need only 1 ms: the lead drops
    assert playout.lead_ms < 10
    stamps = [playout.stamp(1000 + k) for k in range(1, 50)]  # 1 ms apart, as fast as it gets
    diffs = [signed(b - a) for a, b in zip([first] + stamps, stamps)]
    assert all(d >= 1 for d in diffs)


def test_a_frame_after_a_pause_is_stamped_for_now_not_for_its_capture():
    """A joiner's first frame, a re-sent key frame, an idle scanout: whatever the frame's
    capture time, its stamp is ahead of the client's clock when it is sent."""
    playout = Playout()
    client = Client(playout, offset_ms=1)
    for k in range(30):
        client.frame(10_000 + k * 33, 2)
    # Seconds of nothing, then one frame (captured long ago, sent now).
    assert client.frame(10_000 + 6343 + 30 * 33, 2) >= 0


@pytest.mark.parametrize("start", [MM_WRAP - 1000, 2 * MM_WRAP - 200])
def test_stamps_are_wrap_safe(start):
    """Across the 2^32 ms wrap the stamps keep advancing by the frame interval (not by 1 ms a
    frame), stay on time, and reports of frames on either side find the lead they had."""
    playout = Playout()
    client = Client(playout, offset_ms=1)
    for k in range(120):
        client.frame(start + k * 33, 3)
    wires = client.stamps
    assert any(w < 5000 for w in wires) and any(w > MM_WRAP - 5000 for w in wires)
    assert all(0 < w < MM_WRAP for w in wires)
    steps = [signed(b - a) for a, b in zip(wires, wires[1:])]
    assert all(30 <= s <= 36 for s in steps[10:]), steps
    assert min(client.margins[30:]) >= 0
    assert playout.lead_ms <= 2 + SPARE_MS + 1


def test_wire_stamp_is_never_zero():
    assert wire_stamp(MM_WRAP) == 1 and wire_stamp(MM_WRAP + 5) == 5 and wire_stamp(7) == 7


def test_admit_asks_the_rate_controller_last():
    rate = RateController(4_000_000, 30, now=0.0)
    rate.on_sample(0.1, queue_bytes=200_000)  # congested
    assert admit(False, False, False, rate, 0.1) == "socket full"
    assert admit(True, True, False, rate, 0.1) == "socket full"
    assert admit(True, False, True, rate, 0.1) == "encoder busy"
    assert admit(True, False, False, rate, 0.1) == "congested"
    assert admit(True, False, False, rate, 0.7) is None


def test_key_frame_after_a_stall_only():
    assert not wants_key_frame(10.0, 9.5, True)
    assert wants_key_frame(10.0, 8.9, True)
    assert not wants_key_frame(10.0, 0.0, False)  # the first frame is a key frame anyway


def test_ledger_accounts_for_every_frame_produced():
    ledger = FrameLedger()
    ledger.seen(10)
    ledger.encoded_one(10)
    ledger.seen(11)
    ledger.waiting(11, "socket full")
    ledger.seen(12)  # 11 never went: dropped for the reason it waited
    ledger.waiting(12, "encoder busy")
    ledger.encoded_one(12)  # ...but 12 did go once the encoder had room: not a drop
    ledger.seen(16)  # 13-15 were drawn between two looks
    ledger.encoded_one(16)
    ledger.sent_one()
    ledger.dropped_after_encoding("superseded")
    ledger.sent_one()
    s = ledger.summary()
    assert s["frames_produced"] == 7 and s["frames_encoded"] == 3
    assert s["dropped"] == {"socket full": 1, "superseded before encoding": 3, "superseded": 1}
    assert s["frames_produced"] == s["frames_encoded"] + 1 + 3
    assert s["frames_encoded"] == s["frames_sent"] + 1
    ledger.seen(15)  # an older generation changes nothing
    assert ledger.summary()["frames_produced"] == 7


def test_mjpeg_quality_steps_toward_the_budget():
    assert next_quality_index(3, 6, average_bytes=12_000, budget_bytes=10_000) == 2
    assert next_quality_index(3, 6, average_bytes=5_000, budget_bytes=10_000) == 4
    assert next_quality_index(3, 6, average_bytes=9_000, budget_bytes=10_000) == 3
    assert next_quality_index(0, 6, average_bytes=90_000, budget_bytes=10_000) == 0
    assert next_quality_index(5, 6, average_bytes=10, budget_bytes=10_000) == 5


@pytest.mark.parametrize("offset_ms", [5, 70])
def test_a_client_clock_running_behind_ours_costs_no_display_delay(offset_ms):
    """spice-gtk holds a frame until its clock reaches the stamp, and its clock runs behind
    ours by however late it read MAIN_MULTI_MEDIA_TIME. The lead goes below zero by that much:
    frames still arrive in time, and none waits more than the spare for its stamp."""
    rng = random.Random(offset_ms)
    playout = Playout()
    client = Client(playout, offset_ms=offset_ms)
    for k in range(300):
        client.frame(1000 + k * 33, rng.randint(1, 6))
    settled = client.margins[60:]
    assert min(settled) >= 0, "frames arrived late once the lead had settled"
    assert max(settled) <= 6 - 1 + SPARE_MS, "frames waited at the client for their stamps"
    assert playout.lead_ms <= 6 - offset_ms + SPARE_MS
    # and the stamps still advance with the frames
    steps = [signed(b - a) for a, b in zip(client.stamps[60:], client.stamps[61:])]
    assert min(steps) >= 1


class JpegEncoderModel:
    """An encoder whose frames take 100 bytes per quality step index + 1: totals as
    `output_totals()` gives them, one or two frames a tick (30 fps against a 20/s tick)."""

    def __init__(self, tuner: QualityTuner):
        self.tuner, self.frames, self.bytes = tuner, 0, 0
        self.index_log: list[int] = []

    def tick(self, k: int, budget: float) -> None:
        for _ in range(1 + k % 2):
            self.frames += 1
            self.bytes += 100 * (self.tuner.index + 1)
        self.tuner.update(self.frames, self.bytes, budget)
        self.index_log.append(self.tuner.index)


def test_mjpeg_quality_answers_a_budget_change_as_fast_late_in_a_stream_as_early():
    tuner = QualityTuner(6, 8)
    model = JpegEncoderModel(tuner)
    for k in range(40):  # budget 450 bytes: index 3 (400 bytes) fits, 4 (500) overshoots
        model.tick(k, 450)
    assert tuner.index == 3
    for k in range(40, 2400):  # two minutes at this budget: it stays
        model.tick(k, 450)
    assert set(model.index_log[-2000:]) == {3}
    for k in range(2400, 2440):  # the link halves
        model.tick(k, 225)
    # index 1 (200 bytes) fits; one step per QUALITY_JUDGED_AFTER frames, ~12 ticks a step
    assert tuner.index == 1, model.index_log[-40:]
    for k in range(2440, 2480):  # and climbs back while frames use under 60 % of the budget
        model.tick(k, 450)
    assert tuner.index == 2  # 300 bytes: above 60 % of 450, under it + 10 %


def test_mjpeg_quality_survives_a_rebuilt_encoder():
    tuner = QualityTuner(6, 8)
    model = JpegEncoderModel(tuner)
    for k in range(20):
        model.tick(k, 10_000)
    model.frames = model.bytes = 0  # a new encoder: its totals start from nothing
    for k in range(20, 60):
        model.tick(k, 250)
    assert tuner.index == 1


def test_mjpeg_quality_answers_heavier_content_late_in_a_stream():
    """Two minutes within the band (400 bytes against 450), then frames twice as big: the
    quality steps down within a few judgements, not after the stream's average catches up."""
    tuner = QualityTuner(6, 8)
    frames = total = 0
    for k in range(3600):
        frames, total = frames + 1, total + 400
        if k % 2:
            tuner.update(frames, total, 450)
    assert tuner.index == 6
    for k in range(4 * QUALITY_JUDGED_AFTER):
        frames, total = frames + 1, total + 800
        if k % 2:
            tuner.update(frames, total, 450)
    assert tuner.index < 6
