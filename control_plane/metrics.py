"""Prometheus metrics, one registry per app instance (so several apps in one test process
never collide); served at `/metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edged_cp_http_requests", "API requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "edged_cp_http_request_seconds",
            "API request latency",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.denied = Counter(
            "edged_cp_denied", "Requests refused for role or scope", ["reason"], registry=r
        )
        self.ingest_messages = Counter(
            "edged_cp_ingest_messages", "Uplink messages by outcome", ["outcome"], registry=r
        )
        self.ingest_records = Counter(
            "edged_cp_ingest_records",
            "Records stored (after de-duplication)",
            ["channel"],
            registry=r,
        )
        self.ingest_duplicates = Counter(
            "edged_cp_ingest_duplicates", "Redelivered records not stored again", registry=r
        )
        self.ingest_rejected = Counter(
            "edged_cp_ingest_rejected", "Uplink messages refused", ["reason"], registry=r
        )
        self.ingest_batch_seconds = Histogram(
            "edged_cp_ingest_batch_seconds", "Time to write one ingest batch", registry=r
        )
        self.ingest_backlog = Gauge(
            "edged_cp_ingest_backlog", "Messages received, not yet written", registry=r
        )
        self.broker_connected = Gauge(
            "edged_cp_broker_connected", "1 while the ingest client is connected", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
