"""Bad options exit with status 2 and a message naming the option."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args,option", [
    (["--size", "12"], "--size"), (["--size", "10x10"], "--size"), (["--fps", "0"], "--fps"),
    (["--port", "70000"], "--port"), (["--max-clients", "0"], "--max-clients"),
    (["--ticket-expiry", "-1"], "--ticket-expiry"), (["--host", "0.0.0.0"], "--host"),
    (["--password-file", "/nonexistent/pw"], "--password-file"), (["--video-codecs", ""], "--video-codecs"),
    (["--streaming-video", "sometimes"], "--streaming-video"), (["--source", "vnc"], "--source"),
    (["--source", "x11"], "--x-display"), (["--secure-channels", "all"], "--secure-channels"),
    (["--web-origin", "evil.example"], "--web-origin"), (["--web-origin", "https://a.example/page"], "--web-origin"),
    (["--unix-mode", "666"], "--unix-mode"),
    (["--max-clipboard", "0"], "--max-clipboard"), (["--max-clipboard", "12Q"], "--max-clipboard"),
    (["--file-transfer-dir", "/nonexistent/dir"], "--file-transfer-dir"),
    (["--max-file-size", "-5"], "--max-file-size"),
    (["--metrics", "localhost:99999"], "--metrics"), (["--metrics", "x"], "--metrics"),
    (["--audio", "alsa"], "--audio"), (["--audio", "pulse"], "--audio"),  # the latter: not x11
    (["--bogus"], "--bogus"),
])
def test_bad_option_exits_2_naming_it(args, option):
    result = subprocess.run([sys.executable, "-m", "spicestream", "serve", *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result
    assert option in result.stderr, result.stderr
