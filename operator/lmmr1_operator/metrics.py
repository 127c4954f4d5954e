"""Prometheus metrics: runs by phase, reconcile durations, stage restarts and disruptions,
and each stage's held-out evaluation (from the run's status)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed")
POINTS = ("baseline", "latest", "final")
# status.stages[].evaluation[].<point>.<field> -> the gauge's name suffix.
EVALUATION_FIELDS = {
    "accuracy": "accuracy",
    "passAtK": "pass_at_k",
    "formatRate": "format_rate",
    "responseLength": "response_length_tokens",
    "prompts": "prompts",
    "step": "step",
}
_EVAL_LABELS = ["namespace", "run", "stage", "dataset", "point"]


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
        self.reconcile_errors = Counter(
            "lmmr1_reconcile_errors_total",
            "Reconciles that raised (an API or S3 error); shown on the run's next pass",
            ["error"],
            registry=self.registry,
        )
        self.create_failures = Counter(
            "lmmr1_child_create_failures_total",
            "Children the API server refused to create",
            ["kind", "reason"],
            registry=self.registry,
        )
        self.disruptions = Counter(
            "lmmr1_stage_disruptions_total",
            "Stages restarted from their last checkpoint because Kubernetes ended a pod "
            "(DisruptionTarget: preemption, eviction, a lost node); not in restarts",
            registry=self.registry,
        )
        self.api_requests = Counter(
            "lmmr1_api_requests_total",
            "Calls to the Kubernetes API server by verb and kind (reads come from the "
            "informers' cache: list and watch here are theirs)",
            ["verb", "kind"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "lmmr1_workqueue_depth", "Runs waiting for a reconcile", registry=self.registry
        )
        self.queue_wait = Histogram(
            "lmmr1_workqueue_wait_seconds",
            "Time a run waited in the queue before its reconcile started",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.leader = Gauge(
            "lmmr1_leader", "1 on the replica that holds the leader lease", registry=self.registry
        )
        self.evaluation = {
            key: Gauge(
                f"lmmr1_evaluation_{suffix}",
                f"Held-out evaluation: {suffix.replace('_', ' ')} of a stage's evaluation "
                "dataset at its baseline (starting weights), latest and final evaluation",
                _EVAL_LABELS,
                registry=self.registry,
            )
            for key, suffix in EVALUATION_FIELDS.items()
        }
        self.evaluation_gain = Gauge(
            "lmmr1_evaluation_gain",
            "Held-out accuracy gained over the stage's starting weights (final, else latest)",
            ["namespace", "run", "stage", "dataset"],
            registry=self.registry,
        )
        self._evaluated: dict[tuple[str, str], set[tuple[str, ...]]] = {}
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
            self._drop_evaluation(namespace, name, set())

    def observe_evaluation(self, namespace: str, name: str, stages: list[dict[str, Any]]) -> None:
        """The evaluation results of the run's status (`status.stages`, camelCase)."""
        with self._lock:
            seen: set[tuple[str, ...]] = set()
            for stage in stages:
                for entry in stage.get("evaluation") or []:
                    base = (namespace, name, stage["name"], entry["dataset"])
                    for point in POINTS:
                        result = entry.get(point) or {}
                        for key, gauge in self.evaluation.items():
                            if result.get(key) is not None:
                                gauge.labels(*base, point).set(float(result[key]))
                                seen.add((key, *base, point))
                    if entry.get("gain") is not None:
                        self.evaluation_gain.labels(*base).set(float(entry["gain"]))
                        seen.add(("gain", *base))
            self._drop_evaluation(namespace, name, seen)
            self._evaluated[(namespace, name)] = seen

    def _drop_evaluation(self, namespace: str, name: str, keep: set[tuple[str, ...]]) -> None:
        """Remove the run's series that its status no longer has (or all of them)."""
        for series in self._evaluated.pop((namespace, name), set()) - keep:
            key, labels = series[0], series[1:]
            gauge = self.evaluation_gain if key == "gain" else self.evaluation[key]
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    def _publish(self) -> None:
        for phase in PHASES:
            self.runs.labels(phase).set(sum(1 for p in self._phases.values() if p == phase))

    def serve(self, address: str, port: int) -> None:
        """Expose the registry on `address:port` (0: not at all); idempotent."""
        if port and not self._serving:
            start_http_server(port, addr=address, registry=self.registry)
            self._serving = True
