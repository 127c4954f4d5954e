"""Prometheus metrics: runs by phase, reconcile durations, stage restarts."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.runs = Gauge("lmmr1_runs", "LMMR1Runs by phase", ["phase"], registry=self.registry)
        self.reconcile_seconds = Histogram(
            "lmmr1_reconcile_duration_seconds",
            "Time to reconcile one run",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.restarts = Counter(
            "lmmr1_stage_restarts_total",
            "Stages restarted from their last checkpoint",
            registry=self.registry,
        )
        self.leader = Gauge(
            "lmmr1_leader", "1 on the replica that holds the leader lease", registry=self.registry
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._serving = False
        for phase in PHASES:
            self.runs.labels(phase).set(0)

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase:
                self._phases[(namespace, name)] = phase
            self._publish()

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)
            self._publish()

    def _publish(self) -> None:
        for phase in PHASES:
            self.runs.labels(phase).set(sum(1 for p in self._phases.values() if p == phase))

    def serve(self, address: str, port: int) -> None:
        """Expose the registry on `address:port` (0: not at all); idempotent."""
        if port and not self._serving:
            start_http_server(port, addr=address, registry=self.registry)
            self._serving = True
