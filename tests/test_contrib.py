"""contrib/spicestream@.service: systemd's own checker accepts it, and it is hardened."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "spicestream@.service"
HARDENING = ("DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes",
             "ProtectHome=yes", "CapabilityBoundingSet=", "RestrictAddressFamilies=", "SystemCallFilter=")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_verifies_and_is_hardened(tmp_path):
    text = UNIT.read_text()
    for setting in HARDENING:
        assert any(line.startswith(setting) for line in text.splitlines()), setting
    # Verified as installed: ExecStart pointing at this checkout's spicestream.
    binary = Path(sys.executable).with_name("spicestream")
    assert binary.exists()
    unit = tmp_path / "spicestream@5901.service"
    unit.write_text(text.replace("/usr/local/bin/spicestream", str(binary)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [l for l in (result.stdout + result.stderr).splitlines() if str(unit) in l or "spicestream" in l]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
