"""TLS listener settings, the channels that must use it (spice-server's secure-channels), and
what counts as a local address."""

from __future__ import annotations

import ipaddress
import ssl

from ..protocol.constants import ChannelType

CHANNEL_NAMES = {"main": ChannelType.MAIN, "display": ChannelType.DISPLAY,
                 "inputs": ChannelType.INPUTS, "cursor": ChannelType.CURSOR,
                 "playback": ChannelType.PLAYBACK, "record": ChannelType.RECORD,
                 "smartcard": ChannelType.SMARTCARD, "usbredir": ChannelType.USBREDIR}


class TLSConfigError(ValueError):
    """A certificate, key or CA that cannot be used; the message names the file."""


def tls_context(cert: str | None, key: str | None, ca: str | None = None) -> ssl.SSLContext:
    if not cert or not key:
        raise TLSConfigError("a TLS port needs both a certificate and a key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # spice-gtk disables anything older
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot use certificate {cert} with key {key}: {exc}") from None
    if ca:
        try:
            context.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot use CA file {ca}: {exc}") from None
        # A CA given means: only clients with a certificate it signed get in (the handshake
        # fails for the others, before any SPICE byte is read).
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_secure_channels(value) -> set[int]:
    """"main,display" or "all" (or a list of names) -> channel type numbers."""
    names = [v.strip().lower() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    if "all" in names:
        return {int(t) for t in CHANNEL_NAMES.values()}
    unknown = [n for n in names if n not in CHANNEL_NAMES]
    if unknown:
        raise ValueError(f"unknown channel(s) {', '.join(unknown)} (known: all, {', '.join(CHANNEL_NAMES)})")
    return {int(CHANNEL_NAMES[n]) for n in names}
