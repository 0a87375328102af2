"""One client's stream decisions, pure: fed with `now` and measurements, no I/O, no clock.

StreamSender (server/streaming.py) does the I/O and asks this module what to do:

  - `Playout`: the stamp of each frame (brief §4.4). A frame is stamped when it goes to the
    socket, `lead` ahead of the server's media clock: the client shows it at once (GStreamer
    codecs) or keeps it (built-in MJPEG) instead of holding it for a frame interval, and a
    frame sent after a pause (a joiner's first frame, a re-sent key frame, an idle scanout)
    is never stamped in the client's past. `lead` is steered from the client's reports to the
    smallest value that its frames arrive in time with: the most the last few seconds of
    reports needed, plus a little; below zero where the client's clock runs behind ours.
  - `admit`: encode the newest frame now, or skip it (and why).
  - `FrameLedger`: where every frame the display produced went.
  - `QualityTuner`, `next_quality_index`: MJPEG quality against the rate's per-frame budget.

Times: `now` in seconds (time.monotonic), media times in integer milliseconds that never wrap
here (`mm_ms`); only the wire value wraps (`wire_stamp`), and spice-gtk compares stamps by
their signed 32-bit difference, so a stream carries on across the wrap (~49.7 days).
"""

from __future__ import annotations

import collections
import math

MM_WRAP = 1 << 32
START_LEAD_MS = 20.0  # before the first report: room for a LAN and a busy client
MAX_LEAD_MS = 2000.0
# The lead may be negative. The client's clock runs behind ours by however late it read the
# media time we gave it (MAIN_MULTI_MEDIA_TIME after ATTACH_CHANNELS: the one-way delay plus
# whatever kept the client busy then, tens of ms for a remote-viewer still starting up), and
# spice-gtk holds each frame until its own clock reaches the stamp. With the lead kept >= 0,
# that lag was added to every frame of the session; the reports measure it (a margin larger
# than the lead used), and the lead follows them below zero.
MIN_LEAD_MS = -MAX_LEAD_MS
SPARE_MS = 4.0  # added to the most any recent frame needed: scheduling noise at the client
LATE_STEP_MS = 5.0  # late frames whose shortfall is unknown (not the last of a report)
NEED_WINDOW = 30  # reports remembered (5 frames each: ~5 s at 30 fps)
LEADS_KEPT = 256  # stamps sent, to look up the lead a reported frame had
STALL_KEY_FRAME_S = 1.0  # after this long without feeding the encoder, resume with a key frame


def wire_stamp(mm_ms: int) -> int:
    """A media time as it goes on the wire: u32, never 0 (spice-gtk treats 0 as invalid)."""
    return mm_ms % MM_WRAP or 1


class Playout:
    """Stamps for one client: `stamp(send_mm)` when a frame is written; `on_report` with
    each of the client's stream reports. Stamps never go backwards."""

    def __init__(self, start_lead_ms: float = START_LEAD_MS):
        self.lead_ms = start_lead_ms
        self.last_stamp: int | None = None  # mm_ms, unwrapped
        self.last_margin_ms: float | None = None
        self.late = 0  # frames the client reported late
        self._needs: collections.deque = collections.deque(maxlen=NEED_WINDOW)
        self._leads: collections.OrderedDict = collections.OrderedDict()  # wire stamp -> lead used

    def stamp(self, send_mm: int) -> int:
        """The wire stamp of a frame written at media time `send_mm` (unwrapped ms)."""
        stamp = send_mm + math.ceil(self.lead_ms)
        if self.last_stamp is not None:
            stamp = max(stamp, self.last_stamp + 1)
        self.last_stamp = stamp
        wire = wire_stamp(stamp)
        self._leads[wire] = stamp - send_mm
        if len(self._leads) > LEADS_KEPT:
            self._leads.popitem(last=False)
        return wire

    def on_report(self, last_stamp: int, num_frames: int, num_drops: int, margin_ms: int) -> None:
        """A STREAM_REPORT: `last_stamp` (wire) is its last frame's stamp, `margin_ms` that
        frame's stamp minus the client's clock when it arrived, `num_drops` the frames of the
        window that arrived late (margin < 0)."""
        self.last_margin_ms = float(margin_ms)
        self.late += max(0, min(num_drops, num_frames))
        lead_used = self._leads.get(last_stamp, self.lead_ms)
        # What that frame needed: from its send to the client's clock reaching its arrival
        # (transit, the client's clock offset, its queueing before it reads the message).
        need = lead_used - margin_ms
        if num_drops > (1 if margin_ms < 0 else 0):
            # Other frames of the window were late by an unknown amount: ask for more.
            need = max(need, lead_used + LATE_STEP_MS)
        self._needs.append(need)
        self.lead_ms = min(MAX_LEAD_MS, max(MIN_LEAD_MS, max(self._needs) + SPARE_MS))

    def summary(self) -> dict:
        return {"lead_ms": round(self.lead_ms, 1), "last_margin_ms": self.last_margin_ms,
                "late_at_client": self.late}


def admit(can_send: bool, holding: bool, encoder_full: bool, rate, now: float) -> str | None:
    """None to encode the newest frame now, else why it waits (and is dropped for that reason
    if a newer frame comes first). The rate controller (`rate.admit(now)`) is asked last: it
    counts what it lets through."""
    if not can_send or holding:
        return "socket full"
    if encoder_full:
        return "encoder busy"
    return rate.admit(now)


def wants_key_frame(now: float, last_fed: float, ever_fed: bool) -> bool:
    """After a pause in feeding, the next frame is a key frame: the client may have lost
    whatever it was waiting on, and a fresh start costs one large frame."""
    return ever_fed and now - last_fed > STALL_KEY_FRAME_S


class FrameLedger:
    """Where the frames the display produced went, for one stream.

    A frame the sender sees but cannot encode yet is only *waiting*: if it is encoded later
    it counts as encoded; if a newer frame comes first it is dropped for the reason it last
    waited. Frames the sender never saw (two draws between two looks) are "superseded before
    encoding". After encoding, a frame is sent or dropped ("superseded", "awaiting key frame").
    """

    def __init__(self):
        self.produced = 0
        self.encoded = 0
        self.sent = 0
        self.follow_ups = 0  # skipped pictures sent after frames (video/h264skip.py): not frames
        self.dropped: collections.Counter = collections.Counter()
        self._newest = -1  # newest generation seen
        self._waiting: str | None = None  # why the newest generation is not encoded yet

    def seen(self, generation: int) -> None:
        """The display's newest frame is `generation` (counts produced, settles the last)."""
        if generation <= self._newest:
            return
        if self._newest >= 0:
            if self._waiting is not None:
                self.dropped[self._waiting] += 1
            if generation - self._newest > 1:
                self.dropped["superseded before encoding"] += generation - self._newest - 1
            self.produced += generation - self._newest
        else:
            self.produced += 1
        self._newest, self._waiting = generation, None

    def waiting(self, generation: int, reason: str) -> None:
        if generation == self._newest:
            self._waiting = reason

    def encoded_one(self, generation: int) -> None:
        if generation == self._newest:
            self._waiting = None
        self.encoded += 1

    @property
    def waiting_frame(self) -> bool:
        """The newest frame is neither encoded nor superseded: it waits for room."""
        return self._waiting is not None

    def dropped_after_encoding(self, reason: str) -> None:
        self.dropped[reason] += 1

    def sent_one(self) -> None:
        self.sent += 1

    def summary(self) -> dict:
        return {"frames_produced": self.produced, "frames_encoded": self.encoded,
                "frames_sent": self.sent, "follow_ups_sent": self.follow_ups,
                "dropped": dict(self.dropped),
                "waiting": self._waiting}


QUALITY_JUDGED_AFTER = 6  # frames encoded since the last judgement before the next


class QualityTuner:
    """MJPEG quality for one stream, judged on the last few frames encoded (at least
    QUALITY_JUDGED_AFTER since the last judgement). Averaged over the whole stream instead,
    the answer to a change of budget or content came later the older the stream was: after a
    minute at 30 fps a step moved the average by a few per cent."""

    def __init__(self, index: int, steps: int):
        self.index, self.steps = index, steps
        # The encoder's (frames, bytes) totals at the last judgement; None: not seen yet (a
        # client that joins a shared encoder starts from the totals it first sees).
        self._since: tuple[int, int] | None = None

    def update(self, frames: int, total_bytes: int, budget_bytes: float) -> int | None:
        """The encoder's totals so far and the rate's per-frame budget: a new quality index,
        or None to keep the one there is."""
        if self._since is None or frames < self._since[0]:  # first look, or a new encoder
            self._since = (frames, total_bytes)
            return None
        count = frames - self._since[0]
        if count < QUALITY_JUDGED_AFTER:
            return None
        index = next_quality_index(self.index, self.steps, (total_bytes - self._since[1]) / count,
                                   budget_bytes)
        self._since = (frames, total_bytes)
        if index == self.index:
            return None
        self.index = index
        return index


def next_quality_index(index: int, steps: int, average_bytes: float, budget_bytes: float) -> int:
    """MJPEG has no bit-rate target: one quality step down when frames overshoot the rate's
    per-frame budget, one up when they use well under it."""
    if average_bytes > budget_bytes * 1.1 and index > 0:
        return index - 1
    if average_bytes < budget_bytes * 0.6 and index < steps - 1:
        return index + 1
    return index
