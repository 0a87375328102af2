"""GL scanouts for a local client: the DMA-BUF fd itself, over a unix socket (brief §5.11).

The client gets GL_SCANOUT_UNIX followed by one dummy byte that carries the fd (SCM_RIGHTS),
then a GL_DRAW per draw. At most one GL_DRAW is outstanding: draws made meanwhile are merged
into the next one. The client's GL_DRAW_DONE completes every draw up to the one it answers.
"""

from __future__ import annotations

import array
import logging
import socket

from ..protocol.messages import SERVER
from ..protocol.wire import ProtocolError

log = logging.getLogger("spicestream.localgl")
Y0_TOP = 1
FD_BYTE = b"@"  # what spice-server sends with the fd


def send_fd(sock: socket.socket, fd: int) -> None:
    """One byte with the fd attached. The socket is non-blocking, but the transport's buffer is
    empty when we get here, so a single byte always fits."""
    fds = array.array("i", [fd])
    sock.sendmsg([FD_BYTE], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


class LocalGL:
    def __init__(self, channel):
        self.channel, self.conn, self.display = channel, channel.conn, channel.core.display
        self.scanout = None  # the Scanout whose fd this client has
        self.outstanding: int | None = None  # draw sequence of the GL_DRAW in flight
        self.sent_seq = 0
        self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            # A socket object of our own on the same descriptor: asyncio's wrapper does not
            # offer sendmsg with ancillary data.
            self._sock = socket.socket(fileno=self.conn.transport.get_extra_info("socket").fileno())
            self._sock.setblocking(False)
        return self._sock

    def pump(self) -> None:
        """Send a new scanout, then a GL_DRAW if draws are pending and none is outstanding."""
        display = self.display
        current = display.scanout
        if current is not None and current is not self.scanout:
            if self.conn.transport.get_write_buffer_size():
                return  # the fd byte must follow its message directly: wait for the buffer
            ref = current.acquire()
            if ref is None:
                return
            # Counted in before the client can see the scanout: a draw made the moment it does
            # must wait for this client. A draw after the snapshot gets a GL_DRAW.
            self.sent_seq = display.draws.seq  # what it is given is the picture so far
            display.draws.add_consumer(self)
            try:
                self.conn.send(SERVER.DISPLAY_GL_SCANOUT_UNIX(
                    ref.width, ref.height, ref.stride, ref.drm_fourcc, Y0_TOP if ref.y0_top else 0))
                self.conn.flush()
                if self.conn.transport.get_write_buffer_size():
                    raise OSError("socket full while sending the scanout")
                send_fd(self._socket(), ref.fd)
            except OSError as exc:
                self.conn.abort(f"cannot pass the scanout fd: {exc}")
                return
            finally:
                ref.release()  # the client has its own fd now
            self.scanout = current
            self.channel.send_monitors_config()
            # An outstanding GL_DRAW stays outstanding: the client still answers it.
        if self.scanout is None or self.outstanding is not None or display.draws.seq <= self.sent_seq:
            return
        seq = display.draws.seq
        x, y, w, h = display.drawn_since(self.sent_seq)
        self.conn.send(SERVER.DISPLAY_GL_DRAW(x, y, w, h))
        self.conn.flush()
        self.outstanding, self.sent_seq = seq, seq

    def draw_done(self) -> None:
        if self.outstanding is None:
            # spice-server treats this as a protocol error too: the client is confused.
            raise ProtocolError("GL_DRAW_DONE without a GL_DRAW")
        seq, self.outstanding = self.outstanding, None
        self.display.draws.consumed(self, seq)
        self.pump()

    def close(self) -> None:
        self.display.draws.remove_consumer(self)
        if self._sock is not None:
            self._sock.detach()  # the transport owns the descriptor
            self._sock = None
