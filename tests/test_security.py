"""Tickets that expire and change, a brake on guessing, TLS and secure channels."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import subprocess
import sys
import time

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

import spicestream
from spicestream.protocol.constants import ChannelType as Ch
from spicestream.protocol.constants import LinkError
from spicestream.server.tickets import FREE_FAILURES, Tickets
from spicestream.protocol.link import LINK_HEADER, ClientLink
from spicestream.testing.client import LinkRefused, TestClient

import xclient


# -- tickets --------------------------------------------------------------------------------------
def test_ticket_rules():
    t = Tickets(b"pw")
    assert t.check(b"pw") is None
    assert t.check(b"pW") == "wrong password" and t.check(None) == "ticket did not decrypt"
    t.set(b"new", expires_in=10)
    assert t.check(b"pw") == "wrong password" and t.check(b"new") is None
    assert t.check(b"new", now=time.monotonic() + 11) == "ticket expired"
    t.set(None)
    assert t.check(b"anything") is None
    delays = [t.failed("10.0.0.9", now=100.0 + i) for i in range(FREE_FAILURES + 4)]
    assert delays[:FREE_FAILURES] == [0.0] * FREE_FAILURES
    assert delays[FREE_FAILURES:] == sorted(delays[FREE_FAILURES:]) and delays[-1] > delays[FREE_FAILURES]
    assert t.failed("10.0.0.10", now=110.0) == 0.0  # another address is not slowed down
    t.succeeded("10.0.0.9")
    assert t.failed("10.0.0.9", now=111.0) == 0.0


def test_right_wrong_expired_and_changed_tickets():
    server = spicestream.Server(port=0, width=64, height=64, password="first", ticket_expiry=1.5).start()
    try:
        TestClient("127.0.0.1", server.port, password="first").connect().close()
        with pytest.raises(LinkRefused) as info:
            TestClient("127.0.0.1", server.port, password="wrong").connect()
        assert info.value.error == LinkError.PERMISSION_DENIED
        linked = TestClient("127.0.0.1", server.port, password="first").connect()
        time.sleep(1.6)
        with pytest.raises(LinkRefused) as info:  # expired
            TestClient("127.0.0.1", server.port, password="first").connect()
        assert info.value.error == LinkError.PERMISSION_DENIED
        # A client linked before the expiry stays linked.
        frame = np.full((64, 64, 4), 77, np.uint8)
        server.display.update(frame)
        linked.wait_for(lambda c: c.frame is not None and (c.frame[..., :3] == 77).all())
        linked.close()
        server.set_ticket("second")  # changed at run time, no expiry
        TestClient("127.0.0.1", server.port, password="second").connect().close()
        with pytest.raises(LinkRefused):
            TestClient("127.0.0.1", server.port, password="first").connect()
    finally:
        server.stop()


def test_repeated_failures_from_one_address_are_slowed_down(caplog):
    server = spicestream.Server(port=0, width=64, height=64, password="right").start()
    try:
        times = []
        for _ in range(FREE_FAILURES + 3):
            t0 = time.monotonic()
            with pytest.raises(LinkRefused):
                TestClient("127.0.0.1", server.port, password="guess").connect()
            times.append(time.monotonic() - t0)
        # Held back at least as long as the brake's schedule says (a lower bound: load only makes
        # it longer), while the free attempts are answered far sooner than the last one.
        brake = Tickets()
        schedule = [brake.failed("x", now=float(i)) for i in range(len(times))]
        assert schedule[-1] >= 1.0 and schedule[:FREE_FAILURES] == [0.0] * FREE_FAILURES
        assert all(t >= d * 0.99 for t, d in zip(times, schedule)), (times, schedule)
        assert float(np.median(times[:FREE_FAILURES])) < schedule[-1] / 3, times
        refusals = [r for r in caplog.records if "wrong password" in r.getMessage()]
        assert len(refusals) == FREE_FAILURES + 3 and all("127.0.0.1:" in r.getMessage() for r in refusals)
        TestClient("127.0.0.1", server.port, password="right").connect().close()  # still works
    finally:
        server.stop()


# -- TLS --------------------------------------------------------------------------------------------
def make_ca_and_cert(tmp_path):
    """A test CA and a server certificate for localhost / 127.0.0.1 signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spicestream test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_server(tmp_path):
    paths = make_ca_and_cert(tmp_path)
    server = spicestream.Server(port=0, width=320, height=240, tls_port=0, tls_cert=str(paths["cert"]),
                                tls_key=str(paths["key"]), secure_channels="all",
                                streaming_video="off").start()
    frame = np.zeros((240, 320, 4), np.uint8)
    frame[..., 2] = 255  # red
    server.display.update(frame)
    yield server, paths
    server.stop()


def test_secure_channels_follow_need_secured_to_the_tls_port(tls_server):
    server, paths = tls_server
    context = ssl.create_default_context(cafile=str(paths["ca"]))
    with TestClient("127.0.0.1", server.port, tls_port=server.tls_port, tls=context) as client:
        client.wait_for(lambda c: c.frame is not None and (c.frame[..., 2] == 255).all())
        assert client.secured_channels == {Ch.MAIN, Ch.DISPLAY, Ch.INPUTS, Ch.CURSOR}
    with pytest.raises(LinkRefused) as info:  # plain port only: refused
        TestClient("127.0.0.1", server.port).connect()
    assert info.value.error == LinkError.NEED_SECURED


def test_bad_tls_files_exit_with_status_2(tmp_path):
    paths = make_ca_and_cert(tmp_path)
    (tmp_path / "garbage.pem").write_text("not a key")
    for args in (["--tls-cert", str(paths["cert"])],
                 ["--tls-cert", str(paths["cert"]), "--tls-key", str(tmp_path / "missing.pem")],
                 ["--tls-cert", str(paths["cert"]), "--tls-key", str(tmp_path / "garbage.pem")]):
        result = subprocess.run([sys.executable, "-m", "spicestream", "serve", "--port", "0",
                                 "--tls-port", "0", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "--tls-" in result.stderr, (args, result.stderr)


@pytest.mark.realclient
@pytest.mark.skipif(bool(xclient.missing_tools()), reason="needs Xvfb, remote-viewer, xdotool, import")
def test_remote_viewer_follows_to_tls(tls_server, tmp_path):
    server, paths = tls_server
    ca = paths["ca"].read_text().strip().replace("\n", "\\n")
    secure = tmp_path / "secure.vv"
    secure.write_text(f"[virt-viewer]\ntype=spice\nhost=localhost\nport={server.port}\n"
                      f"tls-port={server.tls_port}\nca={ca}\n")
    plain = tmp_path / "plain.vv"
    plain.write_text(f"[virt-viewer]\ntype=spice\nhost=localhost\nport={server.port}\n")

    def red_shown(shot):
        return ((shot[..., 0] > 240) & (shot[..., 1] < 20) & (shot[..., 2] < 20)).sum() > 320 * 240 * 0.8

    with xclient.XSession(1024, 768, log_dir=tmp_path) as x:
        viewer = x.start_viewer(plain)  # plain port, no TLS port known: must not show it
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert not red_shown(x.screenshot()), "the picture showed without TLS"
            time.sleep(0.5)
        assert server.sessions == 0
        x.stop(viewer)
        viewer = x.start_viewer(secure)  # pointed at the plain port: follows to the TLS port
        xclient.wait_until(lambda: red_shown(x.screenshot()), 20, 0.3, "the picture over TLS")
        assert server.sessions == 1


# -- memory before login (attacks on a server process of its own) -------------------------------
def test_a_held_back_answer_does_not_let_a_guesser_fill_our_memory():
    """After repeated failures the answer to a wrong ticket is held back; meanwhile the
    attacker streams junk at full speed. The server stops reading once the ticket is in."""
    from attack import ServerProcess, link_and_send_ticket, push
    from spicestream.protocol.constants import ChannelType

    with ServerProcess(password="right") as server:
        for _ in range(FREE_FAILURES + 3):  # the next answer is held back for 2 s
            with pytest.raises(LinkRefused):
                TestClient("127.0.0.1", server.port, password="guess").connect()
        before = server.rss_mib()
        sock = link_and_send_ticket(server.port, ChannelType.MAIN, "guess")
        pushed = push(sock, 512 << 20, seconds=1.5)
        after = server.rss_mib()
        sock.close()
        print(f"\npushed {pushed >> 20} MiB while the answer was held back; server RSS "
              f"{before:.0f} -> {after:.0f} MiB")
        assert after - before < 16, f"server RSS grew {after - before:.0f} MiB"
        assert pushed < 64 << 20, f"the server took {pushed >> 20} MiB from an unauthenticated peer"
        TestClient("127.0.0.1", server.port, password="right").connect().close()  # still serving


def test_junk_pipelined_before_the_link_completes_closes_that_connection():
    from attack import ServerProcess, push

    from spicestream.protocol.link import MAX_PENDING_BYTES

    with ServerProcess() as server:
        before = server.rss_mib()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            # A valid link header announcing the biggest message, then far more than that.
            sock.sendall(ClientLink(0, Ch.MAIN, 0).hello[:LINK_HEADER.size])
            pushed = push(sock, 64 << 20, seconds=1.5)
        after = server.rss_mib()
        print(f"\npushed {pushed >> 10} KiB before the link; server RSS {before:.0f} -> {after:.0f} MiB")
        assert after - before < 16
        deadline = time.monotonic() + 5
        while not server.lines("closing connection") and time.monotonic() < deadline:
            time.sleep(0.05)
        closed = server.lines("closing connection")
        assert len(closed) == 1 and ("bytes before the link" in closed[0] or "bad link" in closed[0]), closed
        assert MAX_PENDING_BYTES <= 64 << 10
        TestClient("127.0.0.1", server.port).connect().close()


# -- amplification after login ------------------------------------------------------------------
def test_oversized_and_amplifying_messages_close_only_their_connection():
    """After login: a message whose sub-message list points 2000 times at one 32 KiB part
    (64 MiB if expanded), and a 32 MiB KEY_SCANCODE. Each closes its own connection with one
    log line, before anything big is buffered; a watching client goes on."""
    import struct as st

    from attack import ServerProcess, linked, push

    with ServerProcess() as server:
        watcher = TestClient("127.0.0.1", server.port).connect()
        # The attacker's own session: main and (below) inputs.
        attacker = TestClient("127.0.0.1", server.port, channels=()).connect()
        session_id = attacker.session_id
        before = server.rss_mib()
        # A full-header message (sub-lists exist only there): MIGRATE_DATA, whose body may be 64 KiB.
        display = linked(server.port, Ch.DISPLAY, connection_id=session_id, mini_header=False)
        part_size = (32 << 10) - 6
        part = st.pack("<HI", 2, part_size) + bytes(part_size)
        sub_list = st.pack("<H", 2000) + st.pack("<I", 0) * 2000
        body = part + sub_list
        display.sendall(st.pack("<QHII", 1, 5, len(body), len(part)) + body)
        # A 32 MiB KEY_SCANCODE on the inputs channel (inputs messages are a few bytes).
        inputs = linked(server.port, Ch.INPUTS, connection_id=session_id)
        inputs.sendall(st.pack("<HI", 104, 32 << 20))
        pushed = push(inputs, 32 << 20, seconds=1.5)
        after = server.rss_mib()
        print(f"\namplified list and a 32 MiB KEY_SCANCODE ({pushed >> 20} MiB pushed): server RSS "
              f"{before:.0f} -> {after:.0f} MiB")
        assert after - before < 16, f"server RSS grew {after - before:.0f} MiB"
        deadline = time.monotonic() + 5
        while len(server.lines("exceeds the limit") + server.lines("add up to more")) < 2 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        closes = server.lines("closing connection")
        assert any("add up to more than their message" in c for c in closes), closes
        assert any("type 104 of 33554432 bytes exceeds the limit" in c for c in closes), closes
        assert not server.lines("key ")  # nothing reached the application
        # The watcher still gets updates.
        before_frames = watcher.draws
        server.update()
        watcher.wait_for(lambda c: c.draws > before_frames, timeout=10, what="an update after the attacks")
        display.close()
        inputs.close()
        attacker.close()
        watcher.close()
