"""The sans-IO link stage, driven with bytes and a real RSA-OAEP ticket."""

import struct

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from spicestream.protocol.constants import ChannelType, CommonCap, DisplayCap, LinkError, has_cap
from spicestream.protocol.link import (
    LINK_HEADER, ClientLink, LinkFailed, LinkRequested, ServerLink, TicketReceived)


def reply_of(data: bytes):
    header, body = data[: LINK_HEADER.size], data[LINK_HEADER.size :]
    return ClientLink.parse_reply(header, body)


def link_until_ticket(password, channel_type=ChannelType.MAIN, caps=(DisplayCap.LZ4_COMPRESSION,)):
    server = ServerLink()
    client = ClientLink(0, channel_type, 0, caps)
    events = server.receive_data(client.hello)
    assert events == [LinkRequested(0, channel_type, 0, (0b1001,), (1 << DisplayCap.LZ4_COMPRESSION,))]
    server.accept((DisplayCap.MONITORS_CONFIG,))
    error, pub, common, channel = reply_of(server.data_to_send())
    assert error == LinkError.OK
    assert has_cap(common, CommonCap.PROTOCOL_AUTH_SELECTION) and has_cap(common, CommonCap.AUTH_SPICE)
    assert has_cap(common, CommonCap.MINI_HEADER) and not has_cap(common, CommonCap.AUTH_SASL)
    assert channel == (1 << DisplayCap.MONITORS_CONFIG,)
    return server, server.receive_data(ClientLink.ticket(pub, password)), pub


OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)


def test_reply_carries_fresh_rsa1024_der_key():
    server, events, pub = link_until_ticket("pw")
    assert len(pub) == 162 and pub.startswith(bytes.fromhex("30819f300d06092a864886f70d010101050003818d00"))
    key = serialization.load_der_public_key(pub)
    assert key.key_size == 1024 and key.public_numbers().e == 65537
    _, _, pub2 = link_until_ticket("pw")
    assert pub2 != pub  # a new key per link


@pytest.mark.parametrize("password", ["", "s3cret", "x" * 60, "pässwörd"])
def test_ticket_decrypts_to_the_password(password):
    server, events, _ = link_until_ticket(password)
    assert events == [TicketReceived(password.encode())]
    server.finish(LinkError.OK)
    assert server.data_to_send() == b"\x00\x00\x00\x00" and server.done
    assert server.mini_header


def html5_ticket(pub: bytes, password: bytes, leading_zeros: int) -> bytes:
    """A ticket as spice-html5 writes one whose ciphertext starts with zero bytes: the big
    number's hex without them, left-aligned, zero-filled at the end (ticket.js rsa_encrypt)."""
    key = serialization.load_der_public_key(pub)
    while True:  # OAEP is random: about one ciphertext in 200 starts with a zero byte
        cipher = key.encrypt(password + b"\x00", OAEP)
        if cipher[:leading_zeros] == bytes(leading_zeros) and cipher[leading_zeros] != 0:
            return struct.pack("<I", 1) + cipher[leading_zeros:] + bytes(leading_zeros)


def test_spice_html5_ticket_with_a_leading_zero_byte_decrypts():
    server = ServerLink()
    server.receive_data(ClientLink(0, 1, 0).hello)
    server.accept()
    _, pub, _, _ = reply_of(server.data_to_send())
    assert server.receive_data(html5_ticket(pub, b"s3cret", 1)) == [TicketReceived(b"s3cret")]
    # The same bytes with a different key stay undecryptable.
    other = ServerLink()
    other.receive_data(ClientLink(0, 1, 0).hello)
    other.accept()
    other.data_to_send()
    assert other.receive_data(html5_ticket(pub, b"s3cret", 1)) == [TicketReceived(None)]


def test_garbage_ticket_is_reported_undecryptable_and_rejected():
    server = ServerLink()
    server.receive_data(ClientLink(0, 1, 0).hello)
    server.accept()
    server.data_to_send()
    assert server.receive_data(struct.pack("<I", 1) + bytes(128)) == [TicketReceived(None)]
    server.finish(LinkError.PERMISSION_DENIED)
    assert server.data_to_send() == struct.pack("<I", LinkError.PERMISSION_DENIED) and not server.done


def test_byte_by_byte_and_leftover():
    server = ServerLink()
    client = ClientLink(7, ChannelType.DISPLAY, 0)
    events = []
    for b in client.hello:
        events += server.receive_data(bytes([b]))
    assert events[0].connection_id == 7
    server.accept()
    _, pub, _, _ = reply_of(server.data_to_send())
    events = server.receive_data(ClientLink.ticket(pub, None) + b"NEXT")
    assert events == [TicketReceived(b"")] and server.leftover == b"NEXT"


def bad(header_fields=None, mess=None):
    mess = mess if mess is not None else ClientLink(0, 1, 0).hello[16:]
    magic, major, minor, size = header_fields or (b"REDQ", 2, 2, len(mess))
    return LINK_HEADER.pack(magic, major, minor, size) + mess


@pytest.mark.parametrize("data,error", [
    (bad((b"GET ", 2, 2, 18)), LinkError.INVALID_MAGIC),
    (bad((b"REDQ", 1, 2, 18)), LinkError.VERSION_MISMATCH),
    (bad((b"REDQ", 2, 2, 17)), LinkError.INVALID_DATA),
    (bad((b"REDQ", 2, 2, 5000)), LinkError.INVALID_DATA),
    (bad(mess=struct.pack("<IBBIII", 0, 1, 0, 2000, 0, 18)), LinkError.INVALID_DATA),
    (bad(mess=struct.pack("<IBBIII", 0, 1, 0, 1, 0, 10) + bytes(4)), LinkError.INVALID_DATA),
    (bad(mess=struct.pack("<IBBIII", 0, 1, 0, 1, 1, 18) + bytes(4)), LinkError.INVALID_DATA),
])
def test_bad_link_messages_get_the_matching_error(data, error):
    server = ServerLink()
    events = server.receive_data(data)
    assert len(events) == 1 and isinstance(events[0], LinkFailed) and events[0].error == error
    got, pub, common, channel = reply_of(server.data_to_send())
    assert got == error and pub == bytes(162) and common == channel == ()
    assert server.receive_data(b"more") == []  # closed: nothing more is parsed


def test_unknown_auth_mechanism():
    server = ServerLink()
    server.receive_data(ClientLink(0, 1, 0).hello)
    server.accept()
    server.data_to_send()
    events = server.receive_data(struct.pack("<I", 2))  # SASL, which we never offer
    assert isinstance(events[0], LinkFailed) and events[0].error == LinkError.INVALID_DATA
    assert server.data_to_send() == struct.pack("<I", LinkError.INVALID_DATA)


def test_reject_after_request():
    server = ServerLink()
    server.receive_data(ClientLink(0, 9, 0).hello)
    server.reject(LinkError.CHANNEL_NOT_AVAILABLE)
    assert reply_of(server.data_to_send())[0] == LinkError.CHANNEL_NOT_AVAILABLE


def test_full_header_when_client_lacks_mini_header():
    server = ServerLink()
    server.receive_data(ClientLink(0, 1, 0, common_caps=(CommonCap.PROTOCOL_AUTH_SELECTION,)).hello)
    server.accept()
    assert not server.mini_header
