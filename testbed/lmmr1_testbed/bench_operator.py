"""Operator scale benchmark: N concurrent runs on kwok nodes.

    python -m lmmr1_testbed.bench_operator 50 200     # part of `make bench`

For each N, applies N two-stage runs at once (CPU-sized, so every pod lands on the kwok
nodes), waits until every run has its stage-1 trainer Job, and records the latency from a
run's creation to its first child (rollout pod) and to its trainer Job (p50/p99, the API's
one-second timestamps), whether any run shows an error condition, and the operator
process's CPU seconds and resident memory. The operator is installed by the chart and runs
on the process node under its real RBAC.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lmmr1_testbed import bed
from lmmr1_testbed.bench import RESULTS
from lmmr1_testbed.demo import driver
from lmmr1_testbed.layout import TestBedState
from lmmr1_trainer.machine import describe_machine

NAMESPACE = "lmmr1-scale"


def _run(name: str) -> dict[str, Any]:
    # Separate rollout servers: the most children per run, and comparable with earlier results.
    cpu = {
        "trainer": {"gpusPerNode": 0, "shmSize": "64Mi"},
        "rollout": {"mode": "separate", "gpusPerReplica": 0},
    }
    return {
        "apiVersion": "lmmr1.io/v1alpha1",
        "kind": "LMMR1Run",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "hf://Qwen/Qwen2.5-VL-3B-Instruct"},
            "storage": {"uri": "s3://scale/ckpt"},
            "stages": [
                {
                    "name": "fre",
                    "type": "text",
                    "dataset": {"uri": "s3://scale/fre.jsonl"},
                    "resources": cpu,
                },
                {
                    "name": "mgt",
                    "type": "multimodal",
                    "dataset": {"uri": "s3://scale/m.jsonl"},
                    "resources": cpu,
                },
            ],
        },
    }


def _ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _items(state: TestBedState, kind: str) -> list[dict[str, Any]]:
    out = driver.cli(state, "kubectl", "get", kind, "-n", NAMESPACE, "-o", "json").stdout
    return list(json.loads(out)["items"])


def _operator_usage(state: TestBedState) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of the leader operator's process."""
    cpu = rss = 0.0
    for pod in _items(state, "pods"):
        if not pod["metadata"]["name"].startswith("scale-lmmr1-operator"):
            continue
        for status in pod["status"].get("containerStatuses", []):
            pid = status.get("containerID", "").removeprefix("process://")
            if not pid:
                continue
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(stat[11]) + int(stat[12])) / 100
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
    return cpu, rss


def measure(state: TestBedState, count: int, timeout: float = 600) -> dict[str, Any]:
    driver.cli(
        state,
        "kubectl",
        "delete",
        "lmr",
        "--all",
        "-n",
        NAMESPACE,
        "--wait=true",
        "--timeout=300s",
        check=False,
    )
    cpu_before, _ = _operator_usage(state)
    runs = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [_run(f"run-{count}-{i:03d}") for i in range(count)],
    }
    started = time.monotonic()
    driver.cli(state, "kubectl", "apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(runs))
    while time.monotonic() - started < timeout:
        jobs = {j["metadata"]["labels"].get("lmmr1.io/run") for j in _items(state, "jobs")}
        if all(f"run-{count}-{i:03d}" in jobs for i in range(count)):
            break
        time.sleep(2)
    elapsed = time.monotonic() - started
    cpu_after, rss = _operator_usage(state)
    created = {
        r["metadata"]["name"]: _ts(r["metadata"]["creationTimestamp"])
        for r in _items(state, "lmmr1runs")
    }
    first_child: dict[str, float] = {}
    for pod in _items(state, "pods"):
        run = pod["metadata"].get("labels", {}).get("lmmr1.io/run", "")
        if run in created:
            delay = (_ts(pod["metadata"]["creationTimestamp"]) - created[run]).total_seconds()
            first_child[run] = min(first_child.get(run, delay), delay)
    job_delay = [
        (
            _ts(j["metadata"]["creationTimestamp"])
            - created[j["metadata"]["labels"]["lmmr1.io/run"]]
        ).total_seconds()
        for j in _items(state, "jobs")
        if j["metadata"]["labels"].get("lmmr1.io/run") in created
    ]
    errors = [
        r["metadata"]["name"]
        for r in _items(state, "lmmr1runs")
        if any(
            c["type"] == "Failed" and c["status"] == "True"
            for c in (r.get("status") or {}).get("conditions", [])
        )
    ]

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "runs": count,
        "all_jobs_after_s": elapsed,
        "failed_runs": len(errors),
        "runs_with_children": len(first_child),
        "runs_with_job": len(job_delay),
        "child_p50": statistics.median(first_child.values()) if first_child else float("nan"),
        "child_p99": pct(list(first_child.values()), 0.99),
        "job_p50": statistics.median(job_delay) if job_delay else float("nan"),
        "job_p99": pct(job_delay, 0.99),
        "operator_cpu_s": cpu_after - cpu_before,
        "operator_rss_mib": rss,
    }


def main(argv: list[str]) -> int:
    counts = [int(a) for a in argv] or [50, 200]
    state = bed.up()
    driver.install_operator(
        state, namespace=NAMESPACE, release="scale", watch_namespaces=[NAMESPACE]
    )
    time.sleep(5)  # leader election
    rows = [measure(state, count) for count in counts]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## Operator at scale, {stamp}\n",
        f"Machine: {describe_machine()}. Command: `python -m lmmr1_testbed.bench_operator "
        f"{' '.join(map(str, counts))}` (part of `make bench`). Runs are applied at once "
        "as one List; latencies use the API's 1-second creation timestamps.\n",
        "| runs | all trainer Jobs created after | run -> first child p50 / p99 | "
        "run -> trainer Job p50 / p99 | runs Failed | operator CPU | operator RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['runs']} ({r['runs_with_job']} with a Job) | "
            f"{r['all_jobs_after_s']:.0f} s | {r['child_p50']:.0f} s / "
            f"{r['child_p99']:.0f} s | {r['job_p50']:.0f} s / {r['job_p99']:.0f} s | "
            f"{r['failed_runs']} | {r['operator_cpu_s']:.0f} s | "
            f"{r['operator_rss_mib']:.0f} MiB |"
        )
    section = "\n".join(lines) + "\n"
    with RESULTS.open("a") as out:
        out.write(section)
    print(section)
    ok = all(r["failed_runs"] == 0 and r["runs_with_job"] == r["runs"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
