"""The ticket (password) clients must present, when it expires, and a brake on guessing.

Tickets are compared in constant time. Every failed attempt (a wrong ticket, or an unknown
session id) is logged by the connection with the peer's address. A network that keeps failing
waits longer and longer for every answer, right or wrong (the link result is held back), and
many failures a second from anywhere slow every answer down: guessing becomes slow without
blocking anyone else for long. A right answer does not wipe the record: a guesser that gave up
on its tries would see its penalty vanish and learn that one of them was right. The record
is forgotten after FORGET_AFTER_S of quiet.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import time

FREE_FAILURES = 3  # failures per network before answers are held back
MAX_DELAY_S = 5.0
FORGET_AFTER_S = 300.0  # a network quiet for this long starts over
GLOBAL_FAILURES_PER_S = 10  # beyond this many failures a second from anywhere, every answer waits
GLOBAL_DELAY_S = 1.0
FORGET_SWEEP_S = 10.0


def network_of(address: str) -> str:
    """The unit a guesser is counted by: its /24 (IPv4) or /56 (IPv6), so that hopping to
    another address of the same network does not start over. Non-IP peers (unix) are one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 56  # a customer's IPv6 allocation is usually a /56 or /48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class Tickets:
    def __init__(self, password: bytes | None = None, expires_in: float | None = None):
        self.password: bytes | None = None
        self.expires_at: float | None = None
        self.set(password, expires_in)
        self._failures: dict[str, tuple[int, float]] = {}  # network -> (count, last failure)
        self._recent: collections.deque = collections.deque()  # times of failures, any network
        self._next_answer: dict[str, float] = {}  # network -> when its last held answer goes out
        self._next_sweep = float("-inf")

    def set(self, password: bytes | None, expires_in: float | None = None, now: float | None = None) -> None:
        """None disables ticketing (any client may link)."""
        if expires_in is not None and expires_in <= 0:
            raise ValueError("expires_in must be positive")
        now = time.monotonic() if now is None else now
        self.password = password
        self.expires_at = None if expires_in is None else now + expires_in

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

    def delay(self, address: str, now: float | None = None) -> float:
        """How long to hold back the next answer to `address`, right or wrong. A network under
        penalty waits for every answer: a guesser that gives up early must never learn that
        a guess was right sooner than that a guess was wrong."""
        now = time.monotonic() if now is None else now
        self._forget_old(now)
        count, _ = self._failures.get(network_of(address), (0, now))
        own = 0.0 if count < FREE_FAILURES else 0.25 * 2 ** min(count - FREE_FAILURES, 5)
        own = min(MAX_DELAY_S, own)
        while self._recent and now - self._recent[0] > 1.0:
            self._recent.popleft()
        busy = GLOBAL_DELAY_S if len(self._recent) >= GLOBAL_FAILURES_PER_S else 0.0
        return max(own, busy)

    def failed(self, address: str, now: float | None = None) -> float:
        """Record a failure (a wrong ticket, an unknown session id) from `address`; returns how
        long to hold back its answer."""
        now = time.monotonic() if now is None else now
        delay = self.delay(address, now)
        network = network_of(address)
        count, _ = self._failures.get(network, (0, now))
        self._failures[network] = (count + 1, now)
        self._recent.append(now)
        return delay

    def answer_in(self, address: str, now: float | None = None) -> float:
        """How long from `now` to hold back the answer to a ticket that just came from
        `address`: its network's delay, and after the answer before it. Under penalty the
        answers to one network go out one delay apart, so guesses sent in parallel do not add
        up; a client linking its channels at once just waits its turn for each."""
        now = time.monotonic() if now is None else now
        delay = self.delay(address, now)
        if delay <= 0:
            return 0.0
        network = network_of(address)
        at = max(now, self._next_answer.get(network, now)) + delay
        self._next_answer[network] = at
        return at - now

    def _forget_old(self, now: float) -> None:
        # At most one sweep per FORGET_SWEEP_S, so that many networks do not cost a scan per answer.
        if now < self._next_sweep:
            return
        self._next_sweep = now + FORGET_SWEEP_S
        self._failures = {a: (c, t) for a, (c, t) in self._failures.items() if now - t <= FORGET_AFTER_S}
        self._next_answer = {a: t for a, t in self._next_answer.items() if t > now}
