"""Operator scale benchmark: N concurrent runs on kwok nodes.

    python -m lmmr1_testbed.bench_operator 50 200 --idle 1000    # part of `make bench`

For each N, applies N two-stage runs at once (CPU-sized, so every pod lands on the kwok
nodes), waits until every run has its stage-1 trainer Job, and records the latency from a
run's creation to its first child (rollout pod) and to its trainer Job (p50/p99, the API's
one-second timestamps), whether any run shows an error condition, the operator process's
CPU seconds and resident memory, and the API calls it made (its own
`lmmr1_api_requests_total`).

`--kueue` gives every run `spec.queueName`: each stage is one JobSet that the test bed's
real Kueue admits (a ClusterQueue far larger than the runs, so no run waits for quota) and
the JobSet controller turns into Jobs. It also reports the admission latency on its own:
from the JobSet's creation to its Workload's `Admitted` condition.

`--idle N` runs the same scenario with N runs, then ends them all (an
`activeDeadlineSeconds` already passed: the operator fails them, DeadlineExceeded, and
removes their pods), then measures the operator over IDLE_S seconds with N finished runs:
CPU seconds, passes and API calls. `--qps Q` / `--workers W` override the chart's
defaults (apiQPS, apiBurst = 2Q; workers).

The operator is installed by the chart with its defaults (no test-speed settings) and
runs on the process node under its real RBAC.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from lmmr1_testbed import batch, bed, runs
from lmmr1_testbed.bench import RESULTS
from lmmr1_testbed.demo import driver
from lmmr1_testbed.layout import TestBedState
from lmmr1_trainer.machine import describe_machine

NAMESPACE = "lmmr1-scale"
PODS_PER_NODE = 100  # kwok nodes take 110; each run has a rollout server and a trainer pod
IDLE_S = 300


QUEUE = "scale"  # the LocalQueue and ClusterQueue of --kueue


def _run(name: str, deadline: int | None = None, queue: str | None = None) -> dict[str, Any]:
    # Separate rollout servers: the most children per run, and comparable with earlier results.
    return runs.run(
        name,
        storage={"uri": "s3://scale/ckpt"},
        stages=runs.fre_then_mgt(
            "s3://scale/fre.jsonl", "s3://scale/m.jsonl", resources=runs.CPU_SEPARATE_ROLLOUT
        ),
        **({"activeDeadlineSeconds": deadline} if deadline else {}),
        **({"queueName": queue} if queue else {}),
    )


def _queue(state: TestBedState) -> None:
    """Kueue's objects for --kueue: quota for every run at once (admission, not waiting for
    quota, is what is measured)."""
    quota = {"cpu": "1M", "memory": "1Pi", "ephemeral-storage": "1Ei", "nvidia.com/gpu": "1M"}
    objects = batch.queue(QUEUE, NAMESPACE, quota)
    driver.cli(
        state,
        "kubectl",
        "apply",
        "--server-side",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )


def _ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _items(state: TestBedState, kind: str) -> list[dict[str, Any]]:
    return driver.items(state, NAMESPACE, kind)


def _trainer_jobs(state: TestBedState) -> list[dict[str, Any]]:
    """The trainer Jobs (on the JobSet path the JobSet controller also makes rollout Jobs)."""
    return driver.items(state, NAMESPACE, "jobs", "lmmr1.io/role=trainer")


def _operator_pod(state: TestBedState) -> dict[str, Any]:
    (pod,) = driver.items(state, NAMESPACE, "pods", "app.kubernetes.io/instance=scale")
    return pod


def _operator_metrics(state: TestBedState) -> dict[str, float]:
    """The operator's own counters, summed by name and verb (its metrics port; pods on the
    process node listen on loopback addresses)."""
    ip = _operator_pod(state)["status"]["podIP"]
    text = urllib.request.urlopen(f"http://{ip}:9090/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith("lmmr1_api_requests_total"):
            verb = name.split('verb="', 1)[1].split('"', 1)[0]
            key = f"api_{verb}"
        elif name.startswith(("lmmr1_reconcile_duration_seconds_count", "lmmr1_workqueue")):
            key = name
        else:
            continue
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _operator_usage(state: TestBedState) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of the leader operator's process."""
    cpu = rss = 0.0
    for pod in [_operator_pod(state)]:
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


def measure(
    state: TestBedState,
    count: int,
    deadline: int | None = None,
    timeout: float = 900,
    queue: str | None = None,
) -> dict[str, Any]:
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
    calls_before = _operator_metrics(state)
    batch = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [_run(f"run-{count}-{i:04d}", deadline, queue) for i in range(count)],
    }
    started = time.monotonic()
    driver.cli(state, "kubectl", "apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(batch))
    while time.monotonic() - started < timeout:
        jobs = {j["metadata"]["labels"].get("lmmr1.io/run") for j in _trainer_jobs(state)}
        if all(f"run-{count}-{i:04d}" in jobs for i in range(count)):
            break
        time.sleep(2)
    elapsed = time.monotonic() - started
    cpu_after, rss = _operator_usage(state)
    calls = _delta(_operator_metrics(state), calls_before)
    created = {
        r["metadata"]["name"]: _ts(r["metadata"]["creationTimestamp"])
        for r in _items(state, "lmmr1runs")
    }
    first_child: dict[str, float] = {}
    # The first child: a rollout pod, or on the JobSet path (--kueue) the JobSet.
    for child in [*_items(state, "pods"), *(_items(state, "jobsets") if queue else [])]:
        run = child["metadata"].get("labels", {}).get("lmmr1.io/run", "")
        if run in created:
            delay = (_ts(child["metadata"]["creationTimestamp"]) - created[run]).total_seconds()
            first_child[run] = min(first_child.get(run, delay), delay)
    admission = _admission_delays(state) if queue else []
    job_delay = [
        (
            _ts(j["metadata"]["creationTimestamp"])
            - created[j["metadata"]["labels"]["lmmr1.io/run"]]
        ).total_seconds()
        for j in _trainer_jobs(state)
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
        "queued": queue is not None,
        "admitted": len(admission),
        "admission_p50": statistics.median(admission) if admission else float("nan"),
        "admission_p99": pct(admission, 0.99),
        "operator_cpu_s": cpu_after - cpu_before,
        "operator_rss_mib": rss,
        "passes": calls.get("lmmr1_reconcile_duration_seconds_count", 0.0),
        "api_calls": {k[4:]: v for k, v in calls.items() if k.startswith("api_") and v},
    }


def _admission_delays(state: TestBedState) -> list[float]:
    """Seconds from each JobSet's creation to its Workload's Admitted condition."""
    jobsets = {j["metadata"]["uid"]: j for j in _items(state, "jobsets")}
    delays = []
    for workload in _items(state, "workloads.kueue.x-k8s.io"):
        uid = workload["metadata"].get("labels", {}).get("kueue.x-k8s.io/job-uid", "")
        admitted = [
            c
            for c in (workload.get("status") or {}).get("conditions", [])
            if c["type"] == "Admitted" and c["status"] == "True"
        ]
        if uid in jobsets and admitted:
            created = _ts(jobsets[uid]["metadata"]["creationTimestamp"])
            delays.append((_ts(admitted[0]["lastTransitionTime"]) - created).total_seconds())
    return delays


def idle(state: TestBedState, count: int, timeout: float = 1200) -> dict[str, Any]:
    """`count` runs created at once (as `measure`); once each has its trainer Job, all are
    given an `activeDeadlineSeconds` already passed, so the operator fails them
    (DeadlineExceeded) and removes their pods; then the operator at rest with them."""
    row = measure(state, count)
    ended = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [_run(f"run-{count}-{i:04d}", deadline=1) for i in range(count)],
    }
    driver.cli(state, "kubectl", "apply", "-n", NAMESPACE, "-f", "-", stdin=json.dumps(ended))
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        listed = _items(state, "lmmr1runs")
        finished = [r for r in listed if (r.get("status") or {}).get("phase") == "Failed"]
        if len(finished) == count and len(_items(state, "pods")) == 1:
            break  # every run over, and only the operator's pod left
        time.sleep(5)
    row["all_finished_after_s"] = time.monotonic() - started
    reasons = [
        next((c["reason"] for c in r["status"]["conditions"] if c["type"] == "Failed"), None)
        for r in _items(state, "lmmr1runs")
        if (r.get("status") or {}).get("phase") == "Failed"
    ]
    time.sleep(30)  # the last deletions' events
    cpu_before, _ = _operator_usage(state)
    metrics_before = _operator_metrics(state)
    time.sleep(IDLE_S)
    cpu_after, rss = _operator_usage(state)
    calls = _delta(_operator_metrics(state), metrics_before)
    row.update(
        finished=len(reasons),
        unexpected_failures=sum(1 for r in reasons if r != "DeadlineExceeded"),
        idle_cpu_s=cpu_after - cpu_before,
        idle_passes=calls.get("lmmr1_reconcile_duration_seconds_count", 0.0),
        idle_api_calls={k[4:]: v for k, v in calls.items() if k.startswith("api_") and v},
        idle_rss_mib=rss,
    )
    return row


def main(argv: list[str]) -> int:
    options: dict[str, str] = {}
    kueue = "--kueue" in argv
    argv = [a for a in argv if a != "--kueue"]
    for flag in ("--idle", "--qps", "--workers"):
        if flag in argv:
            at = argv.index(flag)
            options[flag] = argv[at + 1]
            argv = argv[:at] + argv[at + 2 :]
    idle_count = int(options.get("--idle", 0))
    tuned: dict[str, Any] = {}  # the chart's defaults unless asked
    if "--qps" in options:
        tuned.update(apiQPS=float(options["--qps"]), apiBurst=2 * int(float(options["--qps"])))
    if "--workers" in options:
        tuned["workers"] = int(options["--workers"])
    counts = [int(a) for a in argv] or [50, 200]
    state = bed.up(with_batch=kueue)
    biggest = max([*counts, idle_count])
    bed.add_kwok_nodes(state, max(len(state.gpu_nodes), -(-2 * biggest // PODS_PER_NODE)))
    driver.install_operator(
        state,
        namespace=NAMESPACE,
        release="scale",
        watch_namespaces=[NAMESPACE],
        fast_clock=False,
        operator_values=tuned,
        chart_values={"kueue": {"enabled": True}} if kueue else None,
    )
    if kueue:
        _queue(state)
    time.sleep(5)  # leader election
    # --kueue: each count without a queue, then with one, against the same operator: the
    # JobSet path's cost next to its peer from the same run.
    queues = [None, QUEUE] if kueue else [None]
    rows = [measure(state, count, queue=queue) for count in counts for queue in queues]
    idle_row = idle(state, idle_count) if idle_count else None
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    argv_text = [
        *map(str, counts),
        *(f"{k} {v}" for k, v in options.items()),
        *(["--kueue"] if kueue else []),
    ]
    lines = [
        f"\n## Operator at scale, {stamp}\n",
        f"Machine: {describe_machine()}. Command: `python -m lmmr1_testbed.bench_operator "
        f"{' '.join(argv_text)}` (part of `make bench`). Runs are applied at once "
        "as one List; latencies use the API's 1-second creation timestamps. API calls are "
        "the operator's own count (`lmmr1_api_requests_total`; list/watch are its "
        "informers')."
        + (
            " Rows marked queued: every run names a Kueue queue, so its first child is its "
            "JobSet, which the real Kueue admits and the JobSet controller turns into Jobs; "
            "the row before each is the same count without a queue, in the same run."
            if kueue
            else ""
        )
        + "\n",
        "| runs | all trainer Jobs created after | run -> first child p50 / p99 | "
        "run -> trainer Job p50 / p99 | runs Failed | operator CPU | operator RSS | "
        "passes | API calls |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [*rows, *([idle_row] if idle_row else [])]:
        queued = " queued (JobSet)" if r.get("queued") else ""
        lines.append(
            f"| {r['runs']}{queued} ({r['runs_with_job']} with a Job) | "
            f"{r['all_jobs_after_s']:.0f} s | {r['child_p50']:.0f} s / "
            f"{r['child_p99']:.0f} s | {r['job_p50']:.0f} s / {r['job_p99']:.0f} s | "
            f"{r['failed_runs']} | {r['operator_cpu_s']:.0f} s | "
            f"{r['operator_rss_mib']:.0f} MiB | {r['passes']:.0f} | {_calls(r['api_calls'])} |"
        )
    if kueue:
        lines.append("")
        lines += [
            f"Kueue admission, {r['runs']} runs: {r['admitted']} admitted, JobSet created -> "
            f"Workload Admitted p50 {r['admission_p50']:.0f} s / p99 {r['admission_p99']:.0f} s."
            for r in rows
            if r["queued"]
        ]
    if idle_row:
        lines += [
            "",
            f"{idle_row['runs']} runs ended by their deadline: all Failed (DeadlineExceeded) "
            f"and their pods gone {idle_row['all_finished_after_s']:.0f} s later. "
            f"At rest with {idle_row['finished']} finished runs ({idle_row['unexpected_failures']}"
            f" ended other than by their deadline), over {IDLE_S} s: operator CPU "
            f"{idle_row['idle_cpu_s']:.1f} s, {idle_row['idle_passes']:.0f} passes, API calls "
            f"{_calls(idle_row['idle_api_calls'])}, RSS {idle_row['idle_rss_mib']:.0f} MiB.",
        ]
    section = "\n".join(lines) + "\n"
    with RESULTS.open("a") as out:
        out.write(section)
    print(section)
    ok = all(r["failed_runs"] == 0 and r["runs_with_job"] == r["runs"] for r in rows)
    if idle_row:
        ok = ok and idle_row["unexpected_failures"] == 0 and idle_row["finished"] == idle_count
    return 0 if ok else 1


def _calls(calls: dict[str, float]) -> str:
    return ", ".join(f"{verb} {n:.0f}" for verb, n in sorted(calls.items())) or "none"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
