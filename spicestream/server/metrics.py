"""Prometheus metrics: `/metrics` over HTTP, made at each scrape from `Server.stats()` (the same
numbers, one source of truth). Names are prefixed `spicestream_`; README lists them.

Per-stream series are labelled client (its address), stream (the stream id) and codec; a
stream's counters start at zero with the stream (a new series).
"""

from __future__ import annotations

import logging

log = logging.getLogger("spicestream.metrics")

STREAM_LABELS = ("client", "stream", "codec")


def _histogram(family, labels, snapshot: dict) -> None:
    buckets = [(str(b), c) for b, c in zip(snapshot["buckets"], snapshot["cumulative"])]
    buckets.append(("+Inf", snapshot["count"]))
    family.add_metric(labels, buckets, snapshot["sum"])


class StatsCollector:
    """A prometheus_client collector over `server.stats()`."""

    def __init__(self, server):
        self.server = server

    def describe(self):
        return []  # made at each scrape: no fixed description (prometheus_client allows it)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        try:
            stats = self.server.stats()
        except Exception as exc:  # a stopping server: report nothing rather than fail the scrape
            log.debug("no stats for a scrape: %s", exc)
            return
        top = stats["server"]
        yield GaugeMetricFamily("spicestream_clients_connected", "Clients connected now.",
                                value=top["clients_connected"])
        yield CounterMetricFamily("spicestream_sessions_started", "Clients that connected since start.",
                                  value=top["sessions_started"])
        yield CounterMetricFamily("spicestream_link_attempts", "Channel links attempted.",
                                  value=top["link_attempts"])
        refusals = CounterMetricFamily("spicestream_link_refusals", "Links refused, by reason.", labels=["reason"])
        auth = CounterMetricFamily("spicestream_auth_failures",
                                   "Links refused for their ticket (password), by reason.", labels=["reason"])
        for reason, n in sorted(top["link_refusals"].items()):
            refusals.add_metric([reason], n)
            if reason.startswith("PERMISSION_DENIED"):
                auth.add_metric([reason.split(": ", 1)[-1]], n)
        yield refusals
        yield auth
        fallbacks = CounterMetricFamily("spicestream_encoder_fallbacks",
                                        "Codecs given up for a client (the next one took over).", labels=["codec"])
        for codec, n in sorted(top["encoder_fallbacks"].items()):
            fallbacks.add_metric([codec], n)
        yield fallbacks
        draws = top["gl_draws"]
        yield CounterMetricFamily("spicestream_gl_draws_completed", "GL draws completed.", value=draws["completed"])
        yield CounterMetricFamily("spicestream_gl_draws_late", "GL draws completed by the deadline, not by clients.",
                                  value=draws["late"])
        draw_latency = HistogramMetricFamily("spicestream_gl_draw_completion_seconds",
                                             "From gl_draw to its completion.", labels=[])
        _histogram(draw_latency, [], draws["latency_hist"])
        yield draw_latency
        audio = top["audio"]
        yield CounterMetricFamily("spicestream_audio_packets", "10 ms sound packets encoded (once for all).",
                                  value=audio["packets"])
        yield CounterMetricFamily("spicestream_audio_dropped_samples",
                                  "Samples dropped: written over 1 s ahead, or a live source's late backlog.",
                                  value=audio["dropped_samples"])
        yield CounterMetricFamily("spicestream_audio_late_samples",
                                  "Samples a live source (the desktop's sound) delivered late, dropped.",
                                  value=audio["late_samples"])
        yield from self._clients(stats["clients"])
        yield from self._agents(top["agents"])

    @staticmethod
    def _agents(agents):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        received = CounterMetricFamily("spicestream_files_received", "Files a client dropped, kept whole.",
                                       labels=["client"])
        refused = CounterMetricFamily("spicestream_files_refused",
                                      "Files refused (size, space, name, too many at once).", labels=["client"])
        active = GaugeMetricFamily("spicestream_files_in_transfer", "Transfers under way or being synced.",
                                   labels=["client"])
        messages = CounterMetricFamily("spicestream_agent_messages", "Agent messages from a client, by type.",
                                       labels=["client", "type"])
        for agent in agents:
            files = agent["files"]
            received.add_metric([agent["peer"]], files["completed"])
            refused.add_metric([agent["peer"]], files["refused"])
            active.add_metric([agent["peer"]], files["active"] + files["finishing"])
            for kind, n in sorted(agent["messages"].items()):
                messages.add_metric([agent["peer"], kind], n)
        yield from (received, refused, active, messages)

    def _clients(self, clients):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        client_bytes = CounterMetricFamily("spicestream_client_bytes_sent", "Display bytes sent to a client.",
                                           labels=["client"])
        counters = {
            "frames_produced": ("spicestream_frames_offered", "Frames the source produced while the stream ran."),
            "frames_encoded": ("spicestream_frames_encoded", "Frames encoded for the stream."),
            "frames_sent": ("spicestream_frames_sent", "Frames written to the client."),
            "bytes_sent": ("spicestream_stream_bytes_sent", "Video bytes written to the client."),
        }
        gauges = {
            "bit_rate": ("spicestream_bit_rate_bps", "The rate controller's target, bit/s."),
            "sent_rate": ("spicestream_sent_rate_bps", "What the encoder sent over the last second, bit/s."),
            "bandwidth_estimate": ("spicestream_bandwidth_estimate_bps", "The link's delivered rate, bit/s."),
        }
        families = {k: CounterMetricFamily(n, h, labels=list(STREAM_LABELS)) for k, (n, h) in counters.items()}
        families.update({k: GaugeMetricFamily(n, h, labels=list(STREAM_LABELS)) for k, (n, h) in gauges.items()})
        rtt = GaugeMetricFamily("spicestream_rtt_seconds", "TCP round-trip time to the client.",
                                labels=list(STREAM_LABELS))
        dropped = CounterMetricFamily("spicestream_frames_dropped", "Frames not shown, by where they went.",
                                      labels=list(STREAM_LABELS) + ["reason"])
        encode = HistogramMetricFamily("spicestream_encode_latency_seconds", "Capture to encoded frame.",
                                       labels=list(STREAM_LABELS))
        playout = HistogramMetricFamily("spicestream_playout_delay_seconds",
                                        "How far ahead of the client's clock frames were stamped.",
                                        labels=list(STREAM_LABELS))
        for client in clients:
            client_bytes.add_metric([client["peer"]], client["bytes_sent"])
            active = (client.get("streams") or {}).get("active")
            if not active:
                continue
            labels = [client["peer"], str(active["stream_id"]), active["codec"]]
            for key, family in families.items():
                if active.get(key) is not None:
                    family.add_metric(labels, active[key])
            if active.get("rtt_ms") is not None:
                rtt.add_metric(labels, active["rtt_ms"] / 1000)
            for reason, n in sorted((active.get("dropped") or {}).items()):
                dropped.add_metric(labels + [reason], n)
            _histogram(encode, labels, active["encode_latency_hist"])
            _histogram(playout, labels, active["playout_delay_hist"])
        yield client_bytes
        yield from families.values()
        yield from (rtt, dropped, encode, playout)


def serve_metrics(server, host: str, port: int):
    """Serve /metrics on host:port from a thread; returns (http server, its thread)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(server))
    return start_http_server(port, addr=host, registry=registry)
