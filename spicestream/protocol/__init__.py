"""Sans-IO SPICE protocol: wire declarations, link stage, framing, channel flow control.

Nothing here touches sockets, asyncio or GStreamer: every piece takes bytes and returns bytes
or events, so it is tested without a network.
"""

from .wire import ProtocolError

__all__ = ["ProtocolError"]
