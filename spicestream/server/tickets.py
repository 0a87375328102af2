"""The ticket (password) clients must present, when it expires, and a brake on guessing.

Tickets are compared in constant time. Every failed attempt is logged by the connection with
the peer's address; an address that keeps failing waits longer and longer for its answer
(the link result is held back), which makes guessing slow without blocking anyone else.
"""

from __future__ import annotations

import hmac
import time

FREE_FAILURES = 3  # failures per address before answers are held back
MAX_DELAY_S = 5.0
FORGET_AFTER_S = 300.0  # an address quiet for this long starts over


class Tickets:
    def __init__(self, password: bytes | None = None, expires_in: float | None = None):
        self.password: bytes | None = None
        self.expires_at: float | None = None
        self.set(password, expires_in)
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (count, last failure)

    def set(self, password: bytes | None, expires_in: float | None = None) -> None:
        """None disables ticketing (any client may link)."""
        if expires_in is not None and expires_in <= 0:
            raise ValueError("expires_in must be positive")
        self.password = password
        self.expires_at = None if expires_in is None else time.monotonic() + expires_in

    def check(self, presented: bytes | None, now: float | None = None) -> str | None:
        """None if `presented` may link, else why not. `presented` is None when the ticket
        did not decrypt."""
        if presented is None:
            return "ticket did not decrypt"
        if self.password is None:
            return None
        now = time.monotonic() if now is None else now
        if not hmac.compare_digest(presented, self.password):
            return "wrong password"
        if self.expires_at is not None and now >= self.expires_at:
            return "ticket expired"
        return None

    def failed(self, address: str, now: float | None = None) -> float:
        """Record a failure from `address`; returns how long to hold back its answer."""
        now = time.monotonic() if now is None else now
        self._forget_old(now)
        count, _ = self._failures.get(address, (0, now))
        count += 1
        self._failures[address] = (count, now)
        if count <= FREE_FAILURES:
            return 0.0
        return min(MAX_DELAY_S, 0.25 * 2 ** (count - FREE_FAILURES - 1))

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _forget_old(self, now: float) -> None:
        if len(self._failures) > 1000 or any(now - t > FORGET_AFTER_S for _, t in self._failures.values()):
            self._failures = {a: (c, t) for a, (c, t) in self._failures.items() if now - t <= FORGET_AFTER_S}
