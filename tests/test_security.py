"""Tickets that expire and change, a brake on guessing, TLS and secure channels."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import struct
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
from spicestream.server.tickets import (FORGET_AFTER_S, FREE_FAILURES, GLOBAL_DELAY_S, GLOBAL_FAILURES_PER_S,
                                         Tickets, network_of)
from spicestream.protocol.link import LINK_HEADER, ClientLink
from spicestream.testing.client import LinkRefused, TestClient

import xclient


# -- tickets --------------------------------------------------------------------------------------
def test_ticket_rules():
    t = Tickets(b"pw")
    assert t.check(b"pw") is None
    assert t.check(b"pW") == "wrong password" and t.check(None) == "ticket did not decrypt"
    t.set(b"new", expires_in=10, now=50.0)
    assert t.check(b"pw", now=50.0) == "wrong password" and t.check(b"new", now=59.9) is None
    assert t.check(b"new", now=60.0) == "ticket expired"
    t.set(None)
    assert t.check(b"anything") is None
    delays = [t.failed("10.0.0.9", now=100.0 + i) for i in range(FREE_FAILURES + 4)]
    assert delays[:FREE_FAILURES] == [0.0] * FREE_FAILURES
    assert delays[FREE_FAILURES:] == sorted(delays[FREE_FAILURES:]) and delays[-1] > delays[FREE_FAILURES]
    # Every answer to that network waits now, a right one too, from any of its addresses.
    assert t.delay("10.0.0.9", now=110.0) == delays[-1] * 2
    assert t.delay("10.0.0.200", now=110.0) == delays[-1] * 2
    assert t.delay("10.0.1.9", now=110.0) == 0.0  # another network is not slowed down
    # Nothing clears the record but time (a right answer wiping it would tell a guesser that
    # one of the tries it gave up on was right).
    assert t.delay("10.0.0.9", now=111.0) > 0
    # IPv6 networks are /56s; IPv4 in IPv6 counts as IPv4.
    for i in range(FREE_FAILURES):
        t.failed(f"2001:db8::{i + 1}", now=120.0 + i)
    assert t.delay("2001:db8:0:ff::1", now=124.0) > 0 and t.delay("2001:db8:0:100::1", now=124.0) == 0.0
    assert network_of("::ffff:192.0.2.7") == network_of("192.0.2.200") == "192.0.2.0/24"
    # A network quiet for FORGET_AFTER_S starts over.
    assert t.delay("2001:db8::1", now=124.0 + FORGET_AFTER_S + 1) == 0.0


def test_the_brake_spaces_a_networks_answers_and_stays_at_its_ceiling():
    t = Tickets(b"pw")
    assert t.answer_in("10.1.1.1", now=0.0) == 0.0  # no penalty: at once
    for i in range(1100):  # far past where 2**n overflows a float (slow enough for the global limit)
        t.failed("10.1.1.1", now=i * 0.2)
    now = 1100 * 0.2
    assert t.delay("10.1.1.1", now=now) == 5.0
    # Tickets arriving together from the network are answered one delay apart...
    assert [t.answer_in(f"10.1.1.{i}", now=now) for i in range(1, 5)] == [5.0, 10.0, 15.0, 20.0]
    assert t.answer_in("10.1.2.1", now=now) == 0.0  # ...other networks are not queued behind
    assert t.answer_in("10.1.1.1", now=now + 100) == 5.0  # and a quiet queue starts over


def test_many_failures_a_second_from_anywhere_slow_every_answer():
    t = Tickets(b"pw")
    for i in range(GLOBAL_FAILURES_PER_S):  # one failure each from many networks: none is penalised
        assert t.failed(f"10.{i}.0.1", now=1.0 + i * 0.05) == 0.0
    assert t.delay("192.0.2.1", now=1.6) == GLOBAL_DELAY_S  # but everyone waits while it lasts
    assert t.delay("192.0.2.1", now=1.0 + (GLOBAL_FAILURES_PER_S - 1) * 0.05 + 1.01) == 0.0


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
        # The refusal is logged on the server thread just after the answer is written: wait for it.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            refusals = [r for r in caplog.records if "wrong password" in r.getMessage()]
            if len(refusals) >= FREE_FAILURES + 3:
                break
            time.sleep(0.02)
        assert len(refusals) == FREE_FAILURES + 3 and all("127.0.0.1:" in r.getMessage() for r in refusals)
        # Still works, though the network waits its turn for each answer (main only: one turn).
        TestClient("127.0.0.1", server.port, password="right", channels=()).connect(timeout=30).close()
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
    client_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a client")]))
                   .issuer_name(ca_name).public_key(client_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=2)).sign(ca_key, hashes.SHA256()))
    paths = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem",
             "client": tmp_path / "client.pem"}
    paths["client"].write_bytes(client_cert.public_bytes(serialization.Encoding.PEM) + client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
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


def test_tls_ca_requires_a_client_certificate_it_signed(tmp_path):
    paths = make_ca_and_cert(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_ca_and_cert(tmp_path / "other")
    server = spicestream.Server(port=0, width=64, height=64, tls_port=0, tls_cert=str(paths["cert"]),
                                tls_key=str(paths["key"]), tls_ca=str(paths["ca"]), secure_channels="all").start()
    try:
        signed = ssl.create_default_context(cafile=str(paths["ca"]))
        signed.load_cert_chain(str(paths["client"]))
        with TestClient("127.0.0.1", server.port, tls_port=server.tls_port, tls=signed) as client:
            client.wait_for(lambda c: c.frame is not None)
            assert client.secured_channels == {Ch.MAIN, Ch.DISPLAY, Ch.INPUTS, Ch.CURSOR}
        for client_cert in (None, other["client"]):  # none, or one from another CA
            context = ssl.create_default_context(cafile=str(paths["ca"]))
            if client_cert is not None:
                context.load_cert_chain(str(client_cert))
            try:  # TLS 1.3 reports the refusal on the first read: an alert, or the close
                with socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as raw:
                    with context.wrap_socket(raw, server_hostname="localhost") as tls:
                        tls.sendall(ClientLink(0, Ch.MAIN, 0).hello)
                        answer = tls.recv(1)
            except (ssl.SSLError, ConnectionError) as exc:
                answer = exc
            assert answer == b"" or isinstance(answer, Exception), (client_cert, answer)
            assert server.sessions == 0
    finally:
        server.stop()


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
        # Still serving (this network waits its turn: main only, one answer).
        TestClient("127.0.0.1", server.port, password="right", channels=()).connect(timeout=30).close()


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


# -- connection caps ----------------------------------------------------------------------------
def test_idle_connections_are_capped_per_network_and_in_all():
    from attack import ServerProcess, closed_by_server, connect_from, count_closed, linked

    from spicestream.server.connection import MAX_UNLINKED, MAX_UNLINKED_PER_NETWORK

    with ServerProcess() as server:
        before = server.rss_mib()
        one = [connect_from("127.0.0.1", server.port) for _ in range(MAX_UNLINKED_PER_NETWORK + 8)]
        # The server refuses the ones over the per-address cap; the others stay open.
        assert count_closed(one, expect=8) == 8
        assert not any(closed_by_server(s, 0) for s in one[:MAX_UNLINKED_PER_NETWORK])
        # Many addresses: the total cap.
        many = []
        for i in range(MAX_UNLINKED // MAX_UNLINKED_PER_NETWORK + 1):
            many += [connect_from(f"127.0.{i + 1}.1", server.port) for _ in range(MAX_UNLINKED_PER_NETWORK)]
        over = len(many) + MAX_UNLINKED_PER_NETWORK - MAX_UNLINKED
        assert count_closed(many, expect=over) == over
        after = server.rss_mib()
        print(f"\n{len(one) + len(many)} idle connections: server RSS {before:.0f} -> {after:.0f} MiB")
        refusals = server.lines("refused:")
        assert 1 <= len(refusals) <= 2, refusals  # one line per interval, not one per connection
        for s in one + many:
            s.close()
        # Room again, once the idle ones are gone.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                linked(server.port, Ch.MAIN, source="127.0.0.1").close()
                break
            except (ConnectionError, OSError):
                time.sleep(0.1)
        else:
            raise AssertionError("no room after the idle connections closed")


def test_out_of_fds_the_server_says_so_once_and_recovers():
    """Under a 128-fd limit, 200 idle connections from many addresses exhaust the fds before
    the caps do: the accept loop survives, logs one line (not a traceback per try), and
    serves again once they are gone."""
    from attack import ServerProcess, connect_from, linked

    with ServerProcess(fd_limit=128, streaming_video="off") as server:  # no encoder probe at start
        socks = []
        for i in range(200):
            try:
                socks.append(connect_from(f"127.2.{i // 20 + 1}.1", server.port, timeout=2))
            except OSError:
                break
        started = time.monotonic()
        xclient.wait_until(lambda: server.lines("cannot accept connections"), 10, 0.1, "the out-of-fds line")
        time.sleep(2.5)  # asyncio retries accepting every second: each try would have logged
        lines = server.lines("cannot accept connections")
        assert 1 <= len(lines) <= 1 + (time.monotonic() - started) / 10, lines  # one per 10 s
        assert not server.lines("Traceback"), "\n".join(server.log[-40:])
        for s in socks:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                linked(server.port, Ch.MAIN, source="127.0.0.1").close()
                break
            except (ConnectionError, OSError):
                assert time.monotonic() < deadline, "the server did not serve again"
                time.sleep(0.2)


def test_a_session_has_one_channel_of_each_kind():
    """Extra display channels joined to one session would each stream (the probe had 20-30
    streaming into one session counted once against --max-clients): a second link of the same
    channel replaces the first, so a session never has more than one of each."""
    from attack import linked

    server = spicestream.Server(port=0, width=64, height=64, max_clients=1).start()
    try:
        attacker = TestClient("127.0.0.1", server.port, channels=()).connect()  # main only
        socks = [linked(server.port, channel, connection_id=attacker.session_id)
                 for channel in (Ch.DISPLAY, Ch.INPUTS, Ch.CURSOR) for _ in range(10)]
        session = server._core.sessions[attacker.session_id]

        def settled():  # the replaced connections close, the last links start their channels
            kinds = sorted(h.conn.link.request.channel_type for h in list(session.channels))
            return (kinds == [Ch.DISPLAY, Ch.INPUTS, Ch.CURSOR] and len(server._core.connections) == 4
                    and len(server._core.display_channels) == 1)

        xclient.wait_until(settled, 5, 0.05, "one channel of each kind, and nothing else")
        time.sleep(0.3)  # and it stays so: no late link of the thirty comes in after
        assert settled(), (len(server._core.connections), len(server._core.display_channels))
        for sock in socks:
            sock.close()
        attacker.close()
    finally:
        server.stop()


def test_a_cursor_channel_that_is_not_read_keeps_only_the_newest_shape():
    """The shape changes 100 times a second while the client never reads its cursor channel:
    what waits for it stays bounded, and once it reads it ends with the newest shape."""
    from attack import linked

    from spicestream.protocol.channel import ChannelProtocol
    from spicestream.protocol.messages import SERVER
    from spicestream.server.connection import WRITE_HIGH_WATER

    server = spicestream.Server(port=0, width=64, height=64).start()
    try:
        owner = TestClient("127.0.0.1", server.port, channels=()).connect()
        sock = linked(server.port, Ch.CURSOR, connection_id=owner.session_id)
        rng = np.random.default_rng(0)
        conn = xclient.wait_until(  # the channel starts just after its link result is written
            lambda: next((c for c in list(server._core.connections)
                          if c.handler in server._core.cursor_channels), None), 5, 0.01, "the cursor channel")
        peak = 0
        period, next_at = 0.01, time.monotonic()
        for _ in range(300):  # 3 s of 128x128 shapes (64 KiB each): 19 MiB if all were kept
            server.set_cursor(rng.integers(0, 256, (128, 128, 4), dtype=np.uint8))
            peak = max(peak, conn.transport.get_write_buffer_size())
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
        print(f"\n300 cursor shapes, unread: at most {peak >> 10} KiB waiting")
        assert peak <= WRITE_HIGH_WATER + (128 << 10), peak
        server.stats()  # a round trip through the server loop: the last set_cursor has been applied
        newest = server._core.cursor
        # Now read (answering ACKs as spice-gtk does): the last shape to arrive is the newest.
        proto = ChannelProtocol(Ch.CURSOR, True, side="client")
        shapes = []
        sock.settimeout(1.0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (shapes and shapes[-1] == newest):
            try:
                data = sock.recv(1 << 20)
            except TimeoutError:
                continue
            assert data, "the server closed the cursor channel"
            shapes += [m.cursor for m in proto.receive_data(data) if type(m) is SERVER.CURSOR_SET]
            for part in proto.data_to_send():
                sock.sendall(part)
        assert shapes and shapes[-1] == newest
        assert len(shapes) < 300, len(shapes)  # superseded shapes were dropped, not queued
        sock.close()
        owner.close()
    finally:
        server.stop()


# -- the unix socket -----------------------------------------------------------------------------
def test_unix_socket_is_private_and_a_live_one_is_never_taken_over(tmp_path):
    import os
    import stat as st

    path = str(tmp_path / "spice.sock")
    old_umask = os.umask(0)  # the worst case: everything the process creates is world-writable
    try:
        first = spicestream.Server(port=0, width=64, height=64, unix_path=path).start()
    finally:
        os.umask(old_umask)
    try:
        assert st.S_IMODE(os.stat(path).st_mode) == 0o600
        inode = os.stat(path).st_ino
        second = spicestream.Server(port=0, width=64, height=64, unix_path=path)
        with pytest.raises(OSError, match="already listening"):
            second.start()
        assert os.stat(path).st_ino == inode  # untouched: the first server still owns it
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(ClientLink(0, Ch.MAIN, 0).hello)
            assert s.recv(4)[:4] == b"REDQ"  # the first server answers
        group = spicestream.Server(port=0, width=64, height=64, unix_path=path + "2", unix_mode=0o660).start()
        assert st.S_IMODE(os.stat(path + "2").st_mode) == 0o660
        group.stop()
        with pytest.raises(ValueError):
            spicestream.Server(port=0, unix_path=path + "3", unix_mode=0o666)
    finally:
        first.stop()
    assert not os.path.exists(path)
    # A stale socket (its server died without cleaning up) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    third = spicestream.Server(port=0, width=64, height=64, unix_path=path).start()
    third.stop()


def test_the_api_refuses_a_remote_listener_without_a_password():
    with pytest.raises(ValueError, match="without a password"):
        spicestream.Server(host="0.0.0.0", port=0)
    spicestream.Server(host="0.0.0.0", port=0, password="p")  # fine
    spicestream.Server(host="0.0.0.0", port=0, allow_unauthenticated_remote=True)  # said so
    spicestream.Server(host="::1", port=0)  # loopback


def answer_within(port: int, channel, password, wait: float, source: str, connection_id: int = 0):
    """A guesser's try: link, send the ticket, wait at most `wait` s for the answer (None: gave up)."""
    from attack import link_and_send_ticket

    sock = link_and_send_ticket(port, channel, password, connection_id=connection_id, source=source)
    sock.settimeout(wait)
    try:
        data = sock.recv(4)
        return int.from_bytes(data, "little") if len(data) == 4 else None
    except (TimeoutError, socket.timeout):
        return None
    finally:
        sock.close()


def test_a_guesser_that_gives_up_early_never_learns_the_password():
    """The probe gave up on every answer after 150 ms and found the password at guess 401.
    Now every answer to a penalised network waits, the right one too, whatever address of the
    network asks; other networks are not slowed."""
    server = spicestream.Server(port=0, width=64, height=64, password="right").start()
    try:
        guesses = [answer_within(server.port, Ch.MAIN, f"guess{i}", 0.15, "127.0.0.1")
                   for i in range(FREE_FAILURES)]
        assert guesses == [LinkError.PERMISSION_DENIED] * FREE_FAILURES  # free ones: answered at once
        for source in ("127.0.0.1", "127.0.0.9"):  # same /24
            assert answer_within(server.port, Ch.MAIN, "right", 0.15, source) is None
        assert answer_within(server.port, Ch.MAIN, "right", 10, "127.0.1.1") == LinkError.OK
        # Guesses in parallel do not add up: the network's answers go out one delay apart.
        from attack import link_and_send_ticket

        started = time.monotonic()
        socks = [link_and_send_ticket(server.port, Ch.MAIN, f"parallel{i}", source="127.0.0.20") for i in range(4)]
        answered = []
        for s in socks:
            s.settimeout(30)
            assert s.recv(4) == struct.pack("<I", LinkError.PERMISSION_DENIED)
            answered.append(time.monotonic() - started)
            s.close()
        # Lower bounds (load only makes them later): the penalty is at least 0.25 s per answer
        # and grows with every failure.
        assert all(b - a >= 0.24 for a, b in zip([0.0] + answered, answered)), answered
    finally:
        server.stop()


def test_session_id_guessing_goes_through_the_same_brake():
    server = spicestream.Server(port=0, width=64, height=64).start()  # no ticketing at all
    try:
        real = TestClient("127.0.0.1", server.port, channels=()).connect()
        tries = [answer_within(server.port, Ch.DISPLAY, None, 5, "127.0.3.1", connection_id=real.session_id ^ (i + 1))
                 for i in range(FREE_FAILURES)]
        assert tries == [LinkError.BAD_CONNECTION_ID] * FREE_FAILURES
        # Now even the right session id waits, from that network.
        assert answer_within(server.port, Ch.DISPLAY, None, 0.15, "127.0.3.1", real.session_id) is None
        real.close()
    finally:
        server.stop()


# -- link hellos ----------------------------------------------------------------------------------
def test_rsa_keys_are_made_off_the_loop_and_hellos_are_limited_per_network(caplog):
    """A peer sending link hellos as fast as it can: each costs an RSA key, made on a worker
    thread (never on the loop that serves everyone's frames); past the per-network limit they
    are dropped, logged once a while; other networks link as before."""
    import logging

    from attack import connect_from, recv_exactly

    from spicestream.server.linkkeys import HELLO_BURST, HELLO_RATE

    caplog.set_level(logging.INFO, logger="spicestream")
    server = spicestream.Server(port=0, width=64, height=64).start()
    try:
        hello = ClientLink(0, Ch.MAIN, 0).hello
        answered = 0
        started = time.monotonic()
        for _ in range(HELLO_BURST * 3):  # far faster than the limit refills
            with connect_from("127.0.5.1", server.port) as s:
                s.sendall(hello)
                try:
                    recv_exactly(s, LINK_HEADER.size)
                    answered += 1
                except (ConnectionError, OSError):
                    pass
        elapsed = time.monotonic() - started
        # The burst, plus what the bucket refilled while we were at it: never more.
        assert HELLO_BURST <= answered <= HELLO_BURST + HELLO_RATE * elapsed + 1, (answered, elapsed)
        assert answered < HELLO_BURST * 3
        refusals = [r.getMessage() for r in caplog.records if "too many link hellos" in r.getMessage()]
        assert 1 <= len(refusals) <= 2, refusals
        TestClient("127.0.0.1", server.port).connect().close()  # another network: as before
        threads = dict(server._core.link_keys.made_on)
        assert threads and all(name.startswith("spicestream-keys") for name in threads), threads
    finally:
        server.stop()


def test_links_wait_for_a_key_when_none_is_ready():
    from spicestream.server.linkkeys import LinkKeys

    server = spicestream.Server(port=0, width=64, height=64)
    server._core.link_keys = LinkKeys(ready=0)  # every hello waits for the worker
    server.start()
    try:
        with TestClient("127.0.0.1", server.port) as client:
            server.display.update(np.full((64, 64, 4), 99, np.uint8))
            client.wait_for(lambda c: c.frame is not None and (c.frame[..., :3] == 99).all())
        assert sum(server._core.link_keys.made_on.values()) >= 4  # main, display, inputs, cursor
    finally:
        server.stop()
