"""When the server's periodic work runs (streams ending, rate control, draw completions).

On the wake-up of a display update once `every` has passed since the last run, so a stream's
frames carry it without waking the loop again: every other frame at 30 fps, every third at 60.
On a timer `idle` after the last run when no update comes. Pure: fed with `now`; the server
arms the timer where `ran` says.
"""

from __future__ import annotations

TICK_S = 0.04
TICK_IDLE_S = 0.1  # draw completions are promised within 1 s: DRAW_TIMEOUT_S leaves this room


class TickSchedule:
    def __init__(self, now: float, every: float = TICK_S, idle: float = TICK_IDLE_S):
        self.every, self.idle = every, idle
        self.last = now

    def due_on_update(self, now: float) -> bool:
        """A display update's wake-up at `now`: run the periodic work with it?"""
        return now - self.last >= self.every

    def ran(self, now: float) -> float:
        """The work ran at `now`; returns when the timer should run it next, if no update
        comes first."""
        self.last = now
        return now + self.idle
