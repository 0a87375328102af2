"""One TCP connection = one SPICE channel: the asyncio pump around the sans-IO protocol.

The connection runs the link stage, asks the server whether the channel may link and whether
the ticket is right, then hands decoded messages to a channel handler (main, display, inputs,
cursor). Any protocol error closes this connection alone, with one log line.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from typing import TYPE_CHECKING

from ..protocol.channel import ChannelProtocol
from ..protocol.constants import ChannelType, LinkError
from ..protocol.link import LinkFailed, LinkRequested, ServerLink, TicketReceived
from ..protocol.wire import ProtocolError
from ..unixpeer import peer_pid
from .tickets import network_of
from . import tcpinfo, web

if TYPE_CHECKING:
    from .core import ServerCore

log = logging.getLogger("spicestream.connection")

WRITE_HIGH_WATER = 4 << 20  # bytes buffered in the transport before we stop producing
WRITE_LOW_WATER = 1 << 20
LINK_TIMEOUT_S = 30.0  # a peer that never finishes the link stage is dropped
ABORT_GRACE_S = 5.0  # a closing connection's queued bytes get this long to leave
# Connections that have not linked yet cost an fd each and are free to open: cap them, in all
# and per network (/24, /56), well below the usual 1024-fd limit (linked ones are bounded by
# --max-clients sessions of a few channels each).
MAX_UNLINKED = 256
MAX_UNLINKED_PER_NETWORK = 64  # a client links 4-6 channels at once; a NAT has several clients
REFUSAL_LOG_INTERVAL_S = 10.0

_unix_connections = itertools.count(1)


def unix_peer(sock) -> str:
    """A unix-socket peer's name for logs and the per-client metrics: its process (the
    kernel's SO_PEERCRED) and a number of its own, since a client's socket has no address and
    two clients must not share one label (duplicate series break a Prometheus scrape)."""
    number = next(_unix_connections)
    pid = peer_pid(sock)
    if pid is None:  # no credentials to read: the number alone
        return f"unix:#{number}"
    return f"unix:pid{pid}#{number}"


class UnlinkedConnections:
    """Counts connections that have not linked, in all and by network, and refuses more than
    the caps; refusals are logged at most once per interval, with how many there were."""

    def __init__(self, max_total: int = MAX_UNLINKED, max_per_network: int = MAX_UNLINKED_PER_NETWORK):
        self.max_total, self.max_per_network = max_total, max_per_network
        self._by_network: dict[str, set] = {}
        self._total = 0
        self._refused = 0
        self._last_log = -1e9

    def admit(self, address: str, conn) -> str | None:
        network = network_of(address)  # an IPv6 peer has a whole /64 (or more) of addresses
        held = self._by_network.get(network, ())
        if self._total >= self.max_total:
            return f"{self._total} connections have not linked yet"
        if len(held) >= self.max_per_network:
            return f"{len(held)} connections from {network} have not linked yet"
        self._by_network.setdefault(network, set()).add(conn)
        self._total += 1
        return None

    def release(self, conn) -> None:
        network = network_of(conn.address)
        held = self._by_network.get(network)
        if held is not None and conn in held:
            held.discard(conn)
            self._total -= 1
            if not held:
                del self._by_network[network]

    def log_refusal(self, peer: str, reason: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._refused += 1
        if now - self._last_log >= REFUSAL_LOG_INTERVAL_S:
            log.warning("%s: refused: %s (%d refused in the last %.0f s)", peer, reason, self._refused,
                        REFUSAL_LOG_INTERVAL_S)
            self._last_log, self._refused = now, 0

    @property
    def total(self) -> int:
        return self._total


class ChannelConnection(asyncio.Protocol):
    def __init__(self, core: "ServerCore"):
        self.core = core
        self.link = ServerLink()
        self.proto: ChannelProtocol | None = None
        self.handler = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.is_unix = False
        self.is_tcp = False
        self.ws: web.WebSocketTransport | None = None
        self._http = None  # the HTTP parser while a browser's request is coming in
        self._first = True
        self.address = "?"
        self.secure = False
        self.paused = False
        self.closed = False
        self._link_timer: asyncio.TimerHandle | None = None
        self._lost = False  # connection_lost came
        self._key_wait: asyncio.Future | None = None  # waiting for an RSA key (linkkeys.py)

    # -- asyncio callbacks --------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        self.is_unix = sock is not None and sock.family == socket.AF_UNIX
        self.is_tcp = tcpinfo.is_tcp(sock)  # TCP_INFO can be read (a stream's tick, 20/s)
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else unix_peer(sock)
        self.address = peer[0] if isinstance(peer, tuple) else "unix"  # for the guessing brake
        self.secure = transport.get_extra_info("ssl_object") is not None
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        # Keep the kernel's unsent backlog small: what waits, waits in our buffer, where rate
        # control sees it and frames can still be skipped.
        tcpinfo.limit_unsent(sock)
        refusal = self.core.unlinked.admit(self.address, self)
        if refusal is not None:
            self._drop(refusal)
            return
        self._link_timer = asyncio.get_running_loop().call_later(
            LINK_TIMEOUT_S, self.abort, "link stage timed out")
        self.core.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            if self._http is not None or (self._first and data[:4] == b"GET "):
                self._first = False
                self._receive_http(data)  # a browser: WebSocket upgrade, or a page
                return
            self._first = False
            if self.ws is not None:
                for payload in self.ws.receive(data):
                    self._receive_spice(payload)
                if not self.ws.open:
                    self.abort(self.ws.closing_reason(), logging.INFO)
                return
            self._receive_spice(data)
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
        except Exception:  # a handler bug must not take the server down; log it loudly
            log.exception("%s: error handling channel data", self.peer)
            self.abort("internal error")

    def _receive_spice(self, data: bytes) -> None:
        if self.closed:
            return
        if self.proto is None:
            self._receive_link(data)
        else:
            self._receive_messages(data)

    def _receive_http(self, data: bytes) -> None:
        """An HTTP request on the SPICE port (brief §1.8): upgrade it to a WebSocket that
        carries SPICE, or answer a GET with the web client (--web)."""
        if self._http is None:
            self._http = web.new_protocol()
            self._http_bytes = 0
        self._http_bytes += len(data)
        self._http.receive_data(data)
        events = self._http.events_received()
        if not events:
            if self._http.handshake_exc is not None:
                # The parser refused the request (a line too long: 414/431, or malformed: 400)
                # and queued its answer: send it and close, rather than wait for the timeout.
                for chunk in self._http.data_to_send():
                    if chunk:
                        self.transport.write(chunk)
                self.abort(f"bad HTTP request: {self._http.handshake_exc}", logging.INFO)
            elif self._http_bytes > web.MAX_REQUEST_BYTES:
                self.transport.write(web.too_large_response())
                self.abort("HTTP request too large", logging.INFO)
            return
        request, ws = events[0], self._http
        self._http = None
        raw = self.transport
        if web.is_upgrade(request):
            refusal = web.websocket_refusal(request.headers, self.core.web is not None,
                                            self.core.web_origins, self.secure,
                                            password_set=self.core.tickets.password is not None)
            if refusal is not None:
                ws.send_response(ws.reject(403, "WebSocket refused\n"))
                for chunk in ws.data_to_send():
                    if chunk:
                        raw.write(chunk)
                self.abort(f"WebSocket refused: {refusal}")
                return
            response = ws.accept(request)
            ws.send_response(response)
            if response.status_code != 101:
                for chunk in ws.data_to_send():
                    raw.write(chunk)
                self.abort(f"WebSocket handshake refused: {response.status_code}")
                return
            self.ws = web.WebSocketTransport(raw, ws)
            self.ws.flush()
            self.transport = self.ws
            if raw.is_closing():  # the parser refused a frame that came with the request
                self.abort("WebSocket frame refused before the upgrade completed (too big)", logging.INFO)
                return
            # Frames that came in the same read as the request were parsed with it.
            for payload in web.data_payloads(events[1:]):
                self._receive_spice(payload)
            if not self.ws.open:  # one of them was refused (too big, malformed)
                self.abort(self.ws.closing_reason(), logging.INFO)
            return
        if self.core.web is None:
            response = ws.reject(404, "This SPICE server has no web client (start it with --web)\n")
        else:
            response = self.core.web.respond(request.path, request.headers.get("Host", ""),
                                             raw.get_extra_info("sockname")[1])
        ws.send_response(response)
        for chunk in ws.data_to_send():
            if chunk:
                raw.write(chunk)
        self.abort(f"HTTP {request.path} -> {response.status_code}", logging.INFO)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._lost = True
        if self._key_wait is not None:
            self._key_wait.cancel()  # its key goes to the next hello, not to a dead one
        self.core.unlinked.release(self)
        if self._link_timer:
            self._link_timer.cancel()
        self.core.connections.discard(self)
        if self.handler is not None:
            self.handler.closed()

    def pause_writing(self) -> None:
        # A peer that does not read while it keeps asking (pings, mode requests) would make
        # our replies pile up: stop reading until our buffer drains.
        self.paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        if self.handler is not None:
            self.handler.writable()

    # -- link stage -----------------------------------------------------------------------
    def _receive_link(self, data: bytes) -> None:
        events = self.link.receive_data(data)
        while events:
            event = events.pop(0)
            if isinstance(event, LinkRequested):
                if not self.core.hellos.allow(self.address, time.monotonic()):
                    self._drop("too many link hellos from its network")
                    return
                self.core.link_attempts += 1
                error = self.core.check_link(event, self)
                if error != LinkError.OK:
                    self.link.reject(error)
                    self._write_link()
                    self.abort(f"link refused: {error.name}")
                    return
                key = self.core.link_keys.take()
                if key is None:  # none ready: wait for the worker, reading nothing meanwhile
                    self.transport.pause_reading()
                    self._key_wait = self.core.link_keys.wait()
                    self._key_wait.add_done_callback(lambda future, event=event: self._key_ready(future, event))
                    return
                self.link.accept(self.core.channel_caps(event.channel_type), key)
                # A client may send its auth word and ticket without waiting for our reply.
                events += self.link.receive_data(b"")
            elif isinstance(event, TicketReceived):
                # Nothing more is read until the ticket is answered (which may be held back
                # for a guesser): an unauthenticated peer cannot make us buffer its stream.
                self.transport.pause_reading()
                self._write_link()
                # A network that keeps guessing waits longer and longer for every answer, right
                # or wrong, one delay apart: the decision itself is held back (tickets.py).
                tickets = self.core.tickets
                delay = tickets.answer_in(self.address)
                if self.core.is_guess(event.password, self.link.request):
                    # Counted now: a guesser that gives up before the answer still pays.
                    tickets.failed(self.address)
                if delay > 0:
                    asyncio.get_running_loop().call_later(delay, self._answer_ticket, event.password)
                else:
                    self._answer_ticket(event.password)
                return
            elif isinstance(event, LinkFailed):
                self._write_link()
                self.abort(f"bad link: {event.reason}")
                return
        self._write_link()

    def _key_ready(self, future, event: LinkRequested) -> None:
        self._key_wait = None
        if self.closed or future.cancelled():
            return
        try:
            self.link.accept(self.core.channel_caps(event.channel_type), future.result())
            self.transport.resume_reading()  # a pipelined ticket pauses it again
            self._receive_link(b"")
        except ProtocolError as exc:
            self.abort(f"protocol error: {exc}")
        except Exception:  # a handler bug must not take the server down; log it loudly
            log.exception("%s: error answering a link", self.peer)
            self.abort("internal error")

    def _answer_ticket(self, password: bytes | None) -> None:
        if self.closed:
            return
        try:
            error, session, reason = self.core.authenticate(password, self.link.request, self)
            if error != LinkError.OK:
                self._refuse(error, reason)
                return
            self.link.finish(error)
            self._write_link()
            self._start_channel(session)
        except ProtocolError as exc:  # bytes that came with the ticket
            self.abort(f"protocol error: {exc}")
        except Exception:  # a handler bug must not take the server down; log it loudly
            log.exception("%s: error answering a ticket", self.peer)
            self.abort("internal error")

    def _refuse(self, error: LinkError, reason: str) -> None:
        if self.closed:
            return
        # Counted by kind (a wrong ticket says which way it was wrong; other reasons carry
        # ids, which would make a metric label per attacker).
        key = f"{error.name}: {reason}" if error == LinkError.PERMISSION_DENIED else error.name
        self.core.link_refusals[key] += 1
        self.link.finish(error)
        self._write_link()
        self.abort(f"link refused: {error.name} ({reason})")

    def _write_link(self) -> None:
        out = self.link.data_to_send()
        if out and not self.closed:
            self.transport.write(out)

    def _start_channel(self, session) -> None:
        if self._link_timer:
            self._link_timer.cancel()
        self.core.unlinked.release(self)
        if self.ws is not None:
            self.ws.linked()
        request = self.link.request
        self.proto = ChannelProtocol(request.channel_type, self.link.mini_header)
        self.handler = self.core.make_handler(request, session, self)
        log.info("%s: linked %s channel %d of session %08x", self.peer,
                 ChannelType(request.channel_type).name.lower(), request.channel_id,
                 session.session_id)
        self.handler.start()
        self.flush()
        if self.link.leftover:
            self._receive_messages(self.link.leftover)
        if not self.paused and not self.closed:
            self.transport.resume_reading()

    # -- linked ----------------------------------------------------------------------------
    def _receive_messages(self, data: bytes) -> None:
        window_shut = not self.proto.can_send
        for message in self.proto.receive_data(data):
            self.handler.handle(message)
        self.flush()
        if window_shut and self.proto.can_send:
            # An ACK reopened the window. Otherwise what a message changes is sent by its
            # handler, and a channel's pending work has its own wakes (display, socket).
            self.handler.writable()

    def send(self, message) -> None:
        self.proto.send(message)

    def flush(self) -> None:
        if self.proto is None or self.closed:
            return
        parts = self.proto.data_to_send()
        if parts:
            self.transport.writelines(parts)

    @property
    def can_send(self) -> bool:
        """True when neither the socket buffer nor the client's ACK window is full."""
        return not self.closed and not self.paused and self.proto.can_send

    def _drop(self, reason: str) -> None:
        """Cut a connection off at once and quietly: refusals of floods are counted and logged
        once a while (UnlinkedConnections.log_refusal), and the fd is what is scarce."""
        self.closed = True
        self.transport.abort()
        self.core.unlinked.log_refusal(self.peer, reason)

    def abort(self, reason: str, level: int = logging.WARNING) -> None:
        """Close this connection (after writing what is queued), with one log line. A peer
        that does not read what is queued is cut off after ABORT_GRACE_S: a close that waits
        for it would hold the connection (and whatever it holds) forever."""
        if self.closed:
            return
        log.log(level, "%s: closing connection: %s", self.peer, reason)
        self.closed = True
        if self.transport is not None:
            self.transport.close()
            asyncio.get_running_loop().call_later(ABORT_GRACE_S, self._cut_off)

    def _cut_off(self) -> None:
        if not self._lost and self.transport is not None:
            self.transport.abort()
