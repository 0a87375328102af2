"""Send files to a SPICE server the way remote-viewer does when a file is dropped on it: with
spice-gtk's own library (SpiceClientGLib, from PyGObject), `SpiceMainChannel.file_copy_async`.

    python tests/spice_gtk_files.py spice://127.0.0.1:5900 FILE...

Prints one JSON line: {"ok": bool, "error": message or null, "agent_caps_seen": bool,
"file_errors": [each failed file's own message, as a viewer would show it]}.
"""

from __future__ import annotations

import json
import sys

import gi

gi.require_version("SpiceClientGLib", "2.0")
from gi.repository import Gio, GLib, GObject  # noqa: E402
from gi.repository import SpiceClientGLib as Spice  # noqa: E402

TIMEOUT_S = 30


def main() -> int:
    uri, paths = sys.argv[1], sys.argv[2:]
    loop = GLib.MainLoop()
    outcome = {"ok": False, "error": "timed out", "agent_caps_seen": False, "file_errors": []}
    session = Spice.Session(uri=uri)
    started = []

    def done(channel, result, _data=None):
        try:
            outcome["ok"] = bool(channel.file_copy_finish(result))
            outcome["error"] = None
        except GLib.Error as exc:
            outcome["ok"], outcome["error"] = False, exc.message
        loop.quit()

    def agent_update(channel):
        # Fires once the agent's capabilities arrived: the moment a viewer allows a drop.
        outcome["agent_caps_seen"] = True
        if started:
            return
        started.append(True)
        files = [Gio.File.new_for_path(p) for p in paths]
        channel.file_copy_async(files, Gio.FileCopyFlags.NONE, None, None, None, done, None)

    def task_finished(task, error):
        if error is not None:
            outcome["file_errors"].append(error.message)

    def new_task(_channel, task):
        GObject.Object.connect(task, "finished", task_finished)

    def channel_new(_session, channel):
        if isinstance(channel, Spice.MainChannel):
            GObject.Object.connect(channel, "new-file-transfer", new_task)
            # spice-gtk's objects have a connect() of their own (to the server): signals go
            # through GObject's.
            GObject.Object.connect(channel, "main-agent-update", agent_update)
            GObject.Object.connect(channel, "channel-event", lambda ch, event: (
                event in (Spice.ChannelEvent.ERROR_CONNECT, Spice.ChannelEvent.ERROR_LINK,
                          Spice.ChannelEvent.ERROR_IO, Spice.ChannelEvent.CLOSED)
                and (outcome.update(error=f"channel event {event.value_nick}"), loop.quit())))

    GObject.Object.connect(session, "channel-new", channel_new)
    GLib.timeout_add_seconds(TIMEOUT_S, loop.quit)
    if not session.connect():
        outcome["error"] = "could not connect"
    else:
        loop.run()
    session.disconnect()
    print(json.dumps(outcome), flush=True)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
