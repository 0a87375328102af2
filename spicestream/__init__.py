"""spicestream: a SPICE remote-display server in Python.

    import spicestream
    server = spicestream.Server(host="127.0.0.1", port=5900)
    server.start()
    server.display.update(frame)   # (H, W, 4) uint8 BGRx
"""

from .display.surface import Display
from .server.api import Server

__all__ = ["Server", "Display"]
__version__ = "0.1.0"
