"""`spicestream` command line. Bad options exit with status 2 and a message naming them."""

from __future__ import annotations

import argparse
import os
import logging
import signal
import sys
import threading

from .display.streams import MODES
from .video.codec_list import DEFAULT_CODECS, CodecListError, parse_codec_list

SOURCES = ("demo", "x11")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if not (32 <= w <= 8192 and 32 <= h <= 8192):
        raise argparse.ArgumentTypeError(f"size {w}x{h} out of range 32..8192")
    return w, h


def _number(convert, low, high, what: str, low_open: bool = False):
    """An argparse type: `convert` the text and check it lies in [low, high] ((low, high]
    with `low_open`); argparse turns the error into exit status 2 naming the option."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low or (low_open and value == low) or value > high:
            bounds = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{value} is not in {bounds}")
        return value
    return parse


_fps = _number(float, 0, 240, "a number", low_open=True)
_port = _number(int, 0, 65535, "a port number")
_positive = _number(int, 1, 1000, "a number")
_seconds = _number(float, 0, 10 ** 9, "seconds", low_open=True)


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=5900, help="SPICE port (default 5900)")
    serve.add_argument("--unix", metavar="PATH", help="also listen on this unix socket (local clients, GL scanouts)")
    serve.add_argument("--unix-mode", type=_unix_mode, default=0o600, metavar="MODE",
                       help="permissions of the unix socket: 600 (default, only this user) or 660 (its group too)")
    auth = serve.add_mutually_exclusive_group()
    auth.add_argument("--password-file", metavar="F", help="file whose first line is the password")
    auth.add_argument("--disable-ticketing", action="store_true", help="accept clients without a password")
    serve.add_argument("--source", choices=SOURCES, default="demo",
                       help="what to display: the demo desktop, or a running X server (default demo)")
    serve.add_argument("--x-display", metavar=":N", help="with --source x11: the X display to serve")
    serve.add_argument("--view-only", action="store_true", help="with --source x11: ignore client input")
    serve.add_argument("--audio", type=_audio, metavar="pulse[:SOURCE]",
                       help="with --source x11: the desktop's sound from PulseAudio (SOURCE: default, the "
                            "default sink's monitor), and clients' microphones as a PulseAudio source")
    serve.add_argument("--max-clients", type=_positive, default=8, metavar="N",
                       help="most clients connected at once (default 8)")
    serve.add_argument("--ticket-expiry", type=_seconds, metavar="SECONDS",
                       help="the password is valid for this long after start")
    serve.add_argument("--tls-port", type=_port, metavar="N", help="also listen with TLS on this port")
    serve.add_argument("--tls-cert", metavar="F", help="TLS certificate (PEM)")
    serve.add_argument("--tls-key", metavar="F", help="TLS private key (PEM)")
    serve.add_argument("--tls-ca", metavar="F", help="CA certificates (PEM) to verify clients with")
    serve.add_argument("--web", action="store_true",
                       help="also answer browsers on the SPICE port with the spice-html5 client")
    serve.add_argument("--web-origin", type=_origin, action="append", default=[], metavar="ORIGIN",
                       help="a page (scheme://host[:port]) that may open a WebSocket here, e.g. a "
                            "portal serving spice-html5 itself (repeatable)")
    serve.add_argument("--secure-channels", default="", metavar="LIST",
                       help="channels refused on the plain port: main,display,inputs,cursor or all")
    serve.add_argument("--metrics", type=_host_port, metavar="[HOST:]PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST: 127.0.0.1 unless given)")
    serve.add_argument("--max-clipboard", type=_byte_size, default=16 << 20, metavar="BYTES",
                       help="largest clipboard content either way, e.g. 16M (default 16M)")
    serve.add_argument("--file-transfer-dir", metavar="DIR",
                       help="receive files dropped into a viewer here (default: refused)")
    serve.add_argument("--max-file-size", type=_byte_size, default=1 << 30, metavar="BYTES",
                       help="with --file-transfer-dir: largest file accepted, e.g. 500M (default 1G)")
    serve.add_argument("--size", type=_size, default=(1280, 720), metavar="WxH", help="display size (default 1280x720)")
    serve.add_argument("--fps", type=_fps, default=30.0, help="frames per second of the source (default 30)")
    serve.add_argument("--video-codecs", type=_codec_list, default=DEFAULT_CODECS, metavar="LIST",
                       help=f"encoder:codec entries separated by ';' (default {DEFAULT_CODECS})")
    serve.add_argument("--streaming-video", choices=MODES, default="filter",
                       help="which changing regions become video streams (default filter)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spicestream", description="SPICE remote-display server")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a display to SPICE clients")
    _add_serve_options(serve)
    run = sub.add_parser("run", help="run COMMAND on a private X server and serve it until COMMAND ends",
                         usage="spicestream run [options] -- COMMAND [ARGS...]")
    _add_serve_options(run)
    run.add_argument("--x-server", choices=("xvfb", "xorg"), default="xvfb",
                     help="the private X server: Xvfb (default), or Xorg with the dummy driver, whose "
                          "screen follows the viewer's window")
    run.add_argument("--exit-on-disconnect", action="store_true",
                     help="end the session when the last client leaves")
    run.add_argument("--keep-alive", action="store_true", help="keep serving after COMMAND exits")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    codecs = sub.add_parser("codecs", help="probe the video encoders and print what works here")
    codecs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: [HOST:]PORT") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is not in [0, 65535]")
    return host, number


def _audio(text: str) -> str:
    kind, _, source = text.partition(":")
    if kind != "pulse" or (_ and not source):
        raise argparse.ArgumentTypeError(f"{text!r}: pulse, or pulse:SOURCE")
    return source or ""


def _byte_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = text.strip(), ""
    if number[-1:].upper() in units and number[-1:].upper() != "":
        number, unit = number[:-1], number[-1].upper()
    try:
        value = int(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a size in bytes, e.g. 4096, 512K, 16M, 1G") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 byte")
    return value


def _codec_list(text: str) -> str:
    try:
        parse_codec_list(text)
    except CodecListError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _read_password(parser, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"argument --password-file: cannot read {path}: {exc}")
    if not password or len(password.encode()) > 60:
        parser.error("argument --password-file: the password must be 1 to 60 bytes")
    return password


def _unix_mode(text: str) -> int:
    if text not in ("600", "0600", "660", "0660"):
        raise argparse.ArgumentTypeError(f"expected 600 or 660, got {text!r}")
    return int(text, 8)


def _origin(text: str) -> str:
    from .server.web import normalise_origin

    try:
        return normalise_origin(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def serve(parser, args) -> int:
    from . import Server
    from .server.security import TLSConfigError, is_loopback
    from .server.web import WebError
    from .sources.demo import DemoResize, run_demo

    session = None
    if args.command == "run":
        _check_run(parser, args)  # before anything starts: a bad run leaves nothing behind
    if args.source == "x11" and not args.x_display:
        parser.error("argument --x-display: required with --source x11")
    if args.audio is not None and args.source != "x11" and args.command != "run":
        parser.error("argument --audio: needs --source x11 (applications give sound with server.audio)")
    password = _read_password(parser, args.password_file) if args.password_file else None
    if password is None and not args.disable_ticketing and not is_loopback(args.host):
        parser.error(f"argument --host: refusing to serve {args.host} without a password; "
                     "give --password-file F or --disable-ticketing")
    if args.ticket_expiry is not None and password is None:
        parser.error("argument --ticket-expiry: needs --password-file")
    if args.tls_port is not None:
        for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
            if not path:
                parser.error(f"argument {option}: required with --tls-port")
        for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                             ("--tls-ca", args.tls_ca)):
            if path and not os.access(path, os.R_OK):
                parser.error(f"argument {option}: cannot read {path}")
    elif args.secure_channels:
        parser.error("argument --secure-channels: needs --tls-port")
    if args.file_transfer_dir is not None and not (
            os.path.isdir(args.file_transfer_dir) and os.access(args.file_transfer_dir, os.W_OK | os.X_OK)):
        parser.error(f"argument --file-transfer-dir: {args.file_transfer_dir} is not a folder we can write to")
    width, height = args.size
    try:
        server = Server(host=args.host, port=args.port, password=password, width=width, height=height,
                        video_codecs=args.video_codecs, streaming_video=args.streaming_video,
                        unix_path=args.unix, unix_mode=args.unix_mode, max_clients=args.max_clients,
                        ticket_expiry=args.ticket_expiry, tls_port=args.tls_port, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, tls_ca=args.tls_ca, secure_channels=args.secure_channels,
                        web=args.web, web_origins=args.web_origin,
                        allow_unauthenticated_remote=args.disable_ticketing,
                        max_clipboard=args.max_clipboard, file_transfer_dir=args.file_transfer_dir,
                        max_file_size=args.max_file_size)
    except WebError as exc:
        parser.error(f"argument --web: {exc}")
    except TLSConfigError as exc:
        parser.error(f"argument --tls-cert/--tls-key: {exc}")
    except ValueError as exc:
        parser.error(f"argument --secure-channels: {exc}")
    if args.command == "run":
        session = _start_session(args)
        if isinstance(session, int):
            return session
    try:
        server.start()
    except OSError as exc:
        print(f"spicestream: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        if session is not None:
            session.close()
        return 1
    metrics = None
    if args.metrics is not None:
        from .server.metrics import serve_metrics

        try:
            metrics, _ = serve_metrics(server, *args.metrics)
        except OSError as exc:
            print(f"spicestream: --metrics: cannot listen on {args.metrics[0]}:{args.metrics[1]}: {exc}",
                  file=sys.stderr)
            server.stop()
            if session is not None:
                session.close()
            return 1
        print(f"spicestream: metrics on http://{args.metrics[0]}:{metrics.server_port}/metrics", flush=True)
    what = f"{' '.join(args.cmd)} on {args.x_display}" if session is not None else f"the {args.source} display"
    serving = f"spicestream: serving {what} on spice://{args.host}:{server.port}"
    stop = threading.Event()
    signalled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: (signalled.append(signum), stop.set()))
    status = 0
    try:
        if args.source == "x11":
            from .sources.x11 import X11Error, X11Source

            try:
                source = X11Source(args.x_display, server, view_only=args.view_only, fps=args.fps)
            except X11Error as exc:
                print(f"spicestream: {exc}", file=sys.stderr)
                return 1
            bridge = None
            if args.audio is not None:
                from .sources.pulse import PulseBridge, PulseError

                try:
                    bridge = PulseBridge(server, args.audio or None, microphone=not args.view_only)
                except (PulseError, ValueError) as exc:
                    print(f"spicestream: --audio: {exc}", file=sys.stderr)
                    source.close()
                    return 1
            watcher = None
            if session is not None:
                session.run_command()
                watcher = SessionWatch(session, server, stop, args.keep_alive, args.exit_on_disconnect)
                watcher.start()
            print(serving, flush=True)
            try:
                source.run(stop)
            except X11Error as exc:  # the X server went away under us
                print(f"spicestream: {exc}", file=sys.stderr)
                status = 1
                stop.set()
            finally:
                if bridge is not None:
                    bridge.close()
                source.close()
            if watcher is not None and status == 0:
                status = watcher.outcome(signalled)
        else:
            print(serving, flush=True)
            resizer = DemoResize()
            server.on_resize = resizer.request  # the demo follows the viewer's window
            run_demo(server.display, args.fps, args.size, stop, f"spice://{args.host}:{server.port}",
                     resizer)
    finally:
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
        server.stop()
        if session is not None:
            session.close()
    return status


def _check_run(parser, args) -> None:
    """`run`'s own arguments (exit status 2 naming what is wrong)."""
    import shutil

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        parser.error("the command to run is missing: spicestream run [options] -- COMMAND [ARGS...]")
    if args.x_display or args.source != "demo":
        parser.error("argument --source/--x-display: run serves the X server it starts itself")
    if args.audio:
        parser.error("argument --audio: with run, give --audio pulse (the session's own PulseAudio)")
    if shutil.which(command[0]) is None:
        parser.error(f"the command to run does not exist: {command[0]}")
    args.cmd = command


def _start_session(args):
    """`run`: start the private X server (and PulseAudio); the session, or the exit status
    when it cannot start."""
    from .session import Session, SessionError

    try:
        session = Session(args.cmd, args.x_server, args.size, audio=args.audio is not None).start()
    except SessionError as exc:
        print(f"spicestream: {exc}", file=sys.stderr)
        return 1
    args.source, args.x_display = "x11", session.x.display
    if session.pulse is not None:
        os.environ["PULSE_SERVER"] = session.pulse.address
        args.audio = "desktop.monitor"
    return session


class SessionWatch(threading.Thread):
    """Ends the serving loop when COMMAND ends (unless --keep-alive), when the X server dies,
    or, with --exit-on-disconnect, when the last client has left."""

    def __init__(self, session, server, stop: threading.Event, keep_alive: bool, exit_on_disconnect: bool):
        super().__init__(name="session-watch", daemon=True)
        self.session, self.server, self.stop = session, server, stop
        self.keep_alive, self.exit_on_disconnect = keep_alive, exit_on_disconnect
        self.why: str | None = None

    def run(self) -> None:
        while not self.stop.wait(0.1):
            if not self.session.x.alive():
                self.why = "x"
                print("spicestream: the X server has exited", file=sys.stderr)
                break
            if self.session.command_status() is not None and not self.keep_alive:
                self.why = "command"
                break
            if self.exit_on_disconnect and self.server.sessions_started and not self.server.sessions:
                self.why = "disconnect"
                break
        self.stop.set()

    def outcome(self, signalled: list[int]) -> int:
        """The exit status: COMMAND's when it has ended, 128+N after signal N, 1 when the X
        server died under us, 0 after --exit-on-disconnect."""
        self.join(2)
        if self.why == "x":
            return 1
        status = self.session.command_status()
        if status is not None:
            return status
        if signalled:
            return 128 + signalled[0]
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command in ("serve", "run"):
        return serve(parser, args)
    if args.command == "codecs":
        return print_codecs(args.json)
    return 2


def print_codecs(as_json: bool) -> int:
    import json

    from .video.factory import VideoCodecs

    table = VideoCodecs().table()
    if as_json:
        print(json.dumps(table, indent=2))
        return 0
    columns = ("codec", "encoder", "element", "hardware", "usable", "reason")
    rows = [[str(r[c]).lower() if isinstance(r[c], bool) else str(r[c]) for c in columns] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    for row in [list(columns)] + rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
