"""Chaos end to end: runs finish and keep every committed checkpoint while the cluster
misbehaves.

Two real runs (the demo's tiny FRE -> MGT recipe: the real trainer, colocated vLLM and
verifier, on the process node) and twelve simulated ones (kwok pods, separate rollout
servers; this test plays their trainer) run under an operator with two replicas. At random
moments (the seed is printed) the test
- SIGKILLs the operator replica that holds the lease (the process node restarts it);
- evicts trainer pods and rollout pods through the Eviction API, as a node drain or a
  preemption does (the API server marks them `DisruptionTarget`);
- restarts the S3 server (down for a few seconds, same data).

Then every run must be `Succeeded` with no failure counted (`restarts` 0): each eviction is
one disruption, counted in `status.disruptions` alone. Every committed checkpoint left in S3
is whole (each file's size and SHA-256 as its manifest says), each stage's final checkpoint
is among them, and MGT started from FRE's final one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import re
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from lmmr1_testbed import bed, runs
from lmmr1_testbed.demo import driver
from lmmr1_testbed.layout import TestBedState

NAMESPACE = "lmmr1-chaos"
RELEASE = "chaos"
REAL_RUNS = ("real-a", "real-b")
SIMULATED_RUNS = tuple(f"sim-{i}" for i in range(12))
BUCKET = f"lmmr1-chaos-{secrets.token_hex(3)}"  # the simulated runs' (the real: the demo's)
SIM_STEPS = 4  # a simulated stage commits step 2, then its final step 4
# Seconds after its trainer pod starts that a simulated stage commits step 2 and ends: long
# enough for the chaos to find stages to evict while the real runs are still starting.
SIM_MIDDLE_S, SIM_END_S, SIM_HOLD_S = 5, 30, 120
# What the chaos does, in a seeded random order, one every few seconds (the real runs'
# trainers are evicted besides, each once, right after FRE's first checkpoint).
ACTIONS = ["operator"] * 3 + ["s3"] * 2 + ["trainer"] * 6 + ["rollout"] * 4
TERMINAL = ("Succeeded", "Failed")


def kubectl(testbed: TestBedState, *args: str, stdin: str | None = None) -> str:
    return driver.cli(testbed, "kubectl", "-n", NAMESPACE, *args, stdin=stdin).stdout


def items(testbed: TestBedState, kind: str, selector: str = "") -> list[dict[str, Any]]:
    return driver.items(testbed, NAMESPACE, kind, selector)


def live(pod: dict[str, Any]) -> bool:
    """Running and not on its way out."""
    return pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


def attempt_of(pod: dict[str, Any]) -> tuple[str, str, str]:
    labels = pod["metadata"]["labels"]
    return labels["lmmr1.io/run"], labels["lmmr1.io/stage"], labels["lmmr1.io/attempt"]


def simulated_run(name: str) -> dict[str, Any]:
    """A two-stage run on the kwok nodes (CPU-sized: no simulated GPU is needed), with
    separate rollout servers, so there are rollout pods to evict."""
    return runs.run(
        name,
        storage={"uri": f"s3://{BUCKET}/runs", "credentialsSecret": "lmmr1-s3"},
        backoffLimit=2,
        stages=runs.fre_then_mgt(
            f"s3://{BUCKET}/fre.jsonl",
            f"s3://{BUCKET}/mgt.jsonl",
            resources=runs.CPU_SEPARATE_ROLLOUT,
            checkpoint={"everySteps": 2, "keepLast": 2},
        ),
    )


def real_run(name: str) -> dict[str, Any]:
    """The demo's run, shorter: 4 steps a stage, a checkpoint every 2, no held-out
    evaluation (test_two_stage_run covers it; here it would only cost CI minutes)."""
    run = driver.example_run(episodes=4, maxSteps=4)
    run["metadata"]["name"] = name
    for stage in run["spec"]["stages"]:
        stage["checkpoint"] = {"everySteps": 2, "keepLast": 2}
        del stage["evaluation"]
    return run


class SimulatedTrainers:
    """Plays the trainer of the simulated runs: a running trainer pod commits step 2 (a
    real checkpoint: files, then a manifest with their sizes and SHA-256), reports it, then
    commits its final step, reports that and exits 0. A stage attempt is claimed by one of
    the two: this finishes it, or the chaos evicts one of its pods (then this leaves it
    alone), so that every eviction is a disruption and none races a stage's end. While
    evictions are still to come, stages run on (up to SIM_HOLD_S) to give them targets."""

    def __init__(self, testbed: TestBedState, s3: Any) -> None:
        self.testbed = testbed
        self.s3 = s3
        self.lock = threading.Lock()
        self.claimed: set[tuple[str, str, str]] = set()  # (run, stage, attempt)
        self.finishing: set[tuple[str, str, str]] = set()  # claimed by this player
        self.evictions_pending = threading.Event()
        self.evictions_pending.set()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.uids: dict[str, str] = {}

    def claim(self, pod: dict[str, Any]) -> bool:
        """Claim the pod's stage attempt; False if it was claimed already."""
        with self.lock:
            key = attempt_of(pod)
            if key in self.claimed:
                return False
            self.claimed.add(key)
            return True

    def finish(self, pod: dict[str, Any]) -> bool:
        """Whether this player finishes the pod's stage attempt: it claims the attempt, or
        claimed it before and a tick that was finishing it failed (S3 restarting, the API
        server busy): the next tick finishes it then, or the stage would wait forever."""
        with self.lock:
            key = attempt_of(pod)
            if key in self.finishing:
                return True
            if key in self.claimed:
                return False
            self.claimed.add(key)
            self.finishing.add(key)
            return True

    def claimed_already(self, pod: dict[str, Any]) -> bool:
        with self.lock:
            return attempt_of(pod) in self.claimed

    def loop(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.tick()
            except Exception as err:  # a flaky S3 or API call: try again next tick
                self.errors.append(err)

    def tick(self) -> None:
        selector = "lmmr1.io/role=trainer,lmmr1.io/run in (" + ",".join(SIMULATED_RUNS) + ")"
        now = dt.datetime.now(dt.UTC)
        for pod in items(self.testbed, "pods", selector):
            if not live(pod) or "testbed.lmmr1.io/exit-code" in pod["metadata"].get(
                "annotations", {}
            ):
                continue
            started = dt.datetime.fromisoformat(pod["status"]["startTime"])
            age = (now - started).total_seconds()
            labels = pod["metadata"]["labels"]
            run, stage = labels["lmmr1.io/run"], labels["lmmr1.io/stage"]
            if age >= SIM_MIDDLE_S and not self.committed(run, stage, 2):
                middle = self.commit(run, stage, 2, final=False)
                self.report(run, stage, 2, last_checkpoint=middle)
            held = self.evictions_pending.is_set() and age < SIM_HOLD_S
            if age >= SIM_END_S and not held and self.finish(pod):
                final = self.commit(run, stage, SIM_STEPS, final=True)
                self.report(run, stage, SIM_STEPS, last_checkpoint=final, final_checkpoint=final)
                kubectl(
                    self.testbed,
                    "annotate",
                    "pod",
                    pod["metadata"]["name"],
                    "testbed.lmmr1.io/exit-code=0",
                )

    def stage_prefix(self, run: str, stage: str) -> str:
        if run not in self.uids:
            self.uids[run] = kubectl(
                self.testbed, "get", "lmr", run, "-o", "jsonpath={.metadata.uid}"
            )
        return f"runs/{NAMESPACE}/{run}/{self.uids[run]}/{stage}"

    def committed(self, run: str, stage: str, step: int) -> bool:
        key = f"{self.stage_prefix(run, stage)}/step-{step}/manifest.json"
        listed = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=key)
        return bool(listed.get("KeyCount"))

    def commit(self, run: str, stage: str, step: int, *, final: bool) -> str:
        prefix = f"{self.stage_prefix(run, stage)}/step-{step}"
        weights = os.urandom(4096)
        self.s3.put_object(Bucket=BUCKET, Key=f"{prefix}/model.safetensors", Body=weights)
        manifest = {
            "step": step,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "final": final,
            "files": [
                {
                    "path": "model.safetensors",
                    "size": len(weights),
                    "sha256": hashlib.sha256(weights).hexdigest(),
                }
            ],
        }
        self.s3.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json", Body=json.dumps(manifest))
        return f"s3://{BUCKET}/{prefix}"

    def report(self, run: str, stage: str, step: int, **checkpoints: str) -> None:
        progress = {
            "stage": stage,
            "step": step,
            "total_steps": SIM_STEPS,
            "reward": 1.0,
            "accuracy": 0.5,
            "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **checkpoints,
        }
        # As the test's admin identity: the simulated trainers play the pods, and the
        # pods' own permission to write here is test_operator's to check.
        driver.report_progress(self.testbed, NAMESPACE, run, progress, as_pods=False)


class Chaos:
    """The faults, and what was done (to check the runs' counts against)."""

    def __init__(self, testbed: TestBedState, trainers: SimulatedTrainers, seed: int) -> None:
        self.testbed = testbed
        self.trainers = trainers
        self.rng = random.Random(seed)
        self.evicted: Counter[str] = Counter()  # run -> evictions that landed
        self.done: list[str] = []

    def evict(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": NAMESPACE},
        }
        kubectl(
            self.testbed,
            "create",
            "--raw",
            f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/eviction",
            "-f",
            "-",
            stdin=json.dumps(eviction),
        )
        self.evicted[attempt_of(pod)[0]] += 1
        self.done.append(f"evict {name}")

    def target(self, role: str, runs: tuple[str, ...], statuses: dict[str, Any]) -> Any:
        """A live pod of `role` whose stage attempt nobody claimed yet, of a run whose
        earlier evictions the operator has all counted (each eviction is one disruption)."""
        selector = f"lmmr1.io/role={role},lmmr1.io/run in ({','.join(runs)})"
        candidates = []
        for pod in items(self.testbed, "pods", selector):
            run = attempt_of(pod)[0]
            counted = (statuses.get(run) or {}).get("disruptions") or 0
            claimed = self.trainers.claimed_already(pod)
            if live(pod) and not claimed and counted == self.evicted[run]:
                candidates.append(pod)
        return self.rng.choice(candidates) if candidates else None

    def kill_leader(self) -> bool:
        leases = items(self.testbed, "leases")
        holders = {(lease["spec"] or {}).get("holderIdentity") for lease in leases}
        for pod in items(self.testbed, "pods", "app.kubernetes.io/component=operator"):
            if pod["metadata"]["name"] in holders and live(pod):
                (container,) = pod["status"]["containerStatuses"]
                os.kill(int(container["containerID"].removeprefix("process://")), signal.SIGKILL)
                self.done.append(f"SIGKILL leader {pod['metadata']['name']}")
                return True
        return False

    def act(self, action: str, statuses: dict[str, Any]) -> bool:
        """Do `action` now; False when it has no target yet (try again later)."""
        if action == "operator":
            return self.kill_leader()
        if action == "s3":
            bed.restart_s3(self.testbed, down_seconds=3)
            self.done.append("restart S3")
            return True
        pod = self.target(action, SIMULATED_RUNS, statuses)
        if pod is None or not self.trainers.claim(pod):
            return False
        self.evict(pod)
        return True


def statuses_now(testbed: TestBedState) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r.get("status") or {} for r in items(testbed, "lmr")}


@pytest.fixture
def chaos_namespace(testbed: TestBedState, s3_client: Any) -> Iterator[None]:
    s3_client.create_bucket(Bucket=BUCKET)
    driver.install_operator(
        testbed, namespace=NAMESPACE, release=RELEASE, watch_namespaces=[NAMESPACE], replicas=2
    )
    driver.prepare_namespace(testbed, NAMESPACE)
    try:
        yield
    finally:  # pass or fail: stop the runs' pods and the operators, which load the machine
        kubectl(testbed, "delete", "lmr", "--all", "--wait=true", "--timeout=180s")
        driver.cli(testbed, "helm", "uninstall", RELEASE, "-n", NAMESPACE, check=False)


# Two real runs of two 4-step stages on a 2-core machine, each restarted once (a vLLM
# engine start of 30-40 s), beside twelve simulated runs.
@pytest.mark.timeout(1500)
def test_runs_survive_killed_operators_evicted_pods_and_an_s3_restart(
    testbed: TestBedState, s3_client: Any, seeded: dict[str, str], chaos_namespace: None
) -> None:
    seed = int(os.environ.get("LMMR1_CHAOS_SEED") or random.randrange(2**31))
    print(f"chaos seed {seed} (LMMR1_CHAOS_SEED={seed} replays the order)")
    for run in [*(real_run(n) for n in REAL_RUNS), *(simulated_run(n) for n in SIMULATED_RUNS)]:
        driver.apply_run(testbed, NAMESPACE, run)

    trainers = SimulatedTrainers(testbed, s3_client)
    chaos = Chaos(testbed, trainers, seed)
    player = threading.Thread(target=trainers.loop, daemon=True)
    player.start()
    plan = list(ACTIONS)
    chaos.rng.shuffle(plan)
    deadline = time.monotonic() + 1300
    next_at = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            statuses = statuses_now(testbed)
            if len(statuses) == len(REAL_RUNS) + len(SIMULATED_RUNS) and all(
                s.get("phase") in TERMINAL for s in statuses.values()
            ):
                break
            for name in REAL_RUNS:  # each real trainer once, after FRE's first checkpoint
                status = statuses.get(name) or {}
                if chaos.evicted[name] == 0 and "/fre/step-" in str(status.get("lastCheckpoint")):
                    pod = chaos.target("trainer", (name,), statuses)
                    if pod is not None and trainers.claim(pod):
                        chaos.evict(pod)
            if plan and time.monotonic() >= next_at:
                # The next action that can be done now (an eviction may have no target yet).
                done = next((a for a in reversed(plan) if chaos.act(a, statuses)), None)
                if done is not None:
                    plan.remove(done)
                if not {"trainer", "rollout"} & set(plan):
                    trainers.evictions_pending.clear()
                next_at = time.monotonic() + chaos.rng.uniform(2, 8)
            time.sleep(1)
    finally:
        trainers.stop.set()
        player.join(timeout=30)
    print("chaos:", *chaos.done, sep="\n  ")
    print(f"simulated trainer ticks retried: {len(trainers.errors)}", *trainers.errors[:5])

    statuses = statuses_now(testbed)
    summary = {
        name: (s.get("phase"), s.get("restarts"), s.get("disruptions"), chaos.evicted[name])
        for name, s in statuses.items()
    }
    assert not plan, f"chaos left undone: {plan} ({summary})"
    assert all(chaos.evicted[name] == 1 for name in REAL_RUNS), summary
    for name, status in statuses.items():
        assert status.get("phase") == "Succeeded", (name, json.dumps(status, indent=1))
        # Kubernetes ended those pods: not one failure is counted against backoffLimit.
        assert (status.get("restarts") or 0) == 0, (name, summary)
        assert all((s.get("restarts") or 0) == 0 for s in status["stages"]), (name, status)
        assert (status.get("disruptions") or 0) == chaos.evicted[name], (name, summary)
    operators = items(testbed, "pods", "app.kubernetes.io/component=operator")
    kills = sum(line.startswith("SIGKILL") for line in chaos.done)
    restarts = sum(c["restartCount"] for p in operators for c in p["status"]["containerStatuses"])
    assert restarts >= kills == 3

    for name, status in statuses.items():
        fre, mgt = status["stages"]
        assert mgt["initCheckpoint"] == fre["finalCheckpoint"], (name, status["stages"])
        for record in (fre, mgt):
            verify_committed_checkpoints(s3_client, name, record["finalCheckpoint"])


def verify_committed_checkpoints(s3: Any, run: str, final: str) -> None:
    """Every committed checkpoint beside the stage's final one is whole: each file its
    manifest lists is there with that size and SHA-256; the final one is committed."""
    bucket, _, final_prefix = final.removeprefix("s3://").partition("/")
    stage_prefix = final_prefix.rsplit("/step-", 1)[0]
    keys: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{stage_prefix}/step-"
    ):
        keys.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    manifests = sorted(k for k in keys if re.fullmatch(r".*/step-\d+/manifest\.json", k))
    assert f"{final_prefix}/manifest.json" in manifests, (run, final, manifests)
    for key in manifests:
        step_prefix = key.rsplit("/", 1)[0]
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert manifest["files"], (run, key)
        for entry in manifest["files"]:
            object_key = f"{step_prefix}/{entry['path']}"
            assert keys.get(object_key) == entry["size"], (run, object_key, entry)
            body = s3.get_object(Bucket=bucket, Key=object_key)["Body"].read()
            assert hashlib.sha256(body).hexdigest() == entry["sha256"], (run, object_key)
