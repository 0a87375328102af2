"""When the server's periodic work runs (streams ending, rate control, draw completions).

On the wake-up of a display update once `every` has passed since the last run, so a stream's
frames carry it without waking the loop again: every other frame at 30 fps, every third at 60.
On a timer `idle` after the last run when no update comes (sooner while a frame waits for the
link, or a draw's completion falls due). Pure: fed with `now`; the server arms the timer where
`ran` says.
"""

from __future__ import annotations

TICK_S = 0.04
TICK_IDLE_S = 0.1


class TickSchedule:
    def __init__(self, now: float, every: float = TICK_S, idle: float = TICK_IDLE_S):
        self.every, self.idle = every, idle
        self.last = now

    def due_on_update(self, now: float) -> bool:
        """A display update's wake-up at `now`: run the periodic work with it?"""
        return now - self.last >= self.every

    def ran(self, now: float, hurry: bool = False, deadline: float | None = None) -> float:
        """The work ran at `now`; returns when the timer should run it next, if no update
        comes first: `every` from now while a frame waits for the link (`hurry`: the work
        retries it), else `idle`, and no later than `deadline` (a draw's completion)."""
        self.last = now
        at = now + (self.every if hurry else self.idle)
        return at if deadline is None else max(now, min(at, deadline))
