"""Bad input does not slow other runs: stage hand-over latency with and without a run whose
S3 endpoint hangs (part of `make bench`).

    python -m lmmr1_testbed.bench_bad_input 20

N two-stage runs on the kwok nodes (colocated rollouts: one trainer pod each). The bench
plays their trainers: each commits its final FRE checkpoint in the test bed's S3 server,
reports it in its progress ConfigMap (as the pods' service account) and ends its pod with
exit 0. The operator must confirm the checkpoint in S3 before stage MGT starts; the
latency measured is from a run's pod ending to its status showing stage mgt.

Round 1 finishes N good runs at once. Round 2 first finishes one more run whose
`spec.storage.endpoint` accepts connections and never answers (its check hangs for the
S3 client's timeouts), then the N good runs. The ratio of round 2 to round 1 is what the
hanging endpoint costs the others; the bad run itself must end Blocked with
CheckpointUnverified naming its endpoint.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import statistics
import sys
import time
from typing import Any

from lmmr1_testbed import bed, runs
from lmmr1_testbed.bench import RESULTS
from lmmr1_testbed.demo import driver
from lmmr1_testbed.faults import endpoint_that_hangs
from lmmr1_testbed.layout import TestBedState
from lmmr1_trainer.machine import describe_machine

NAMESPACE = "lmmr1-badinput"
BUCKET = "bench-bad-input"


class Trainers:
    """Plays the trainers of the bench's runs."""

    def __init__(self, state: TestBedState) -> None:
        import boto3
        from botocore.config import Config

        self.state = state
        self.s3 = boto3.client(
            "s3",
            endpoint_url=state.s3_endpoint,
            aws_access_key_id=state.s3_access_key,
            aws_secret_access_key=state.s3_secret_key,
            region_name=state.s3_region,
            config=Config(s3={"addressing_style": "path"}),
        )

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return driver.cli(self.state, "kubectl", "-n", NAMESPACE, *args, stdin=stdin).stdout

    def apply(self, name: str, endpoint: str) -> None:
        run = runs.run(
            name,
            storage={"uri": f"s3://{BUCKET}/runs", "endpoint": endpoint, "credentialsSecret": "s3"},
            stages=runs.fre_then_mgt(
                "s3://d/f.jsonl", "s3://d/m.jsonl", resources={"trainer": {"gpusPerNode": 1}}
            ),
        )
        self.kubectl("apply", "-f", "-", stdin=json.dumps(run))

    def runs(self) -> dict[str, dict[str, Any]]:
        return {r["metadata"]["name"]: r for r in driver.items(self.state, NAMESPACE, "lmr")}

    def running_trainers(self) -> dict[str, str]:
        pods = driver.items(self.state, NAMESPACE, "pods", "lmmr1.io/role=trainer")
        return {
            p["metadata"]["labels"]["lmmr1.io/run"]: p["metadata"]["name"]
            for p in pods
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        }

    def finish(self, run: dict[str, Any], pod: str, commit: bool = True) -> float:
        """Commit, report and end the run's FRE trainer; when its pod was ended."""
        name, uid = run["metadata"]["name"], run["metadata"]["uid"]
        prefix = f"runs/{NAMESPACE}/{name}/{uid}/fre/step-4"
        if commit:
            self.s3.put_object(Bucket=BUCKET, Key=f"{prefix}/model.safetensors", Body=b"w")
            self.s3.put_object(Bucket=BUCKET, Key=f"{prefix}/manifest.json", Body=b"{}")
        final = f"s3://{BUCKET}/{prefix}"
        report = {
            "stage": "fre",
            "step": 4,
            "total_steps": 4,
            "last_checkpoint": final,
            "final_checkpoint": final,
            "updated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        driver.report_progress(self.state, NAMESPACE, name, report)
        self.kubectl("annotate", "pod", pod, "testbed.lmmr1.io/exit-code=0")
        return time.monotonic()


def _wait(what: str, check: Any, timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def round_of(
    trainers: Trainers, names: list[str], endpoint: str, bad: tuple[str, str] | None
) -> list[float]:
    """Apply `names` (and the bad run), wait for their trainers, end the bad one first,
    then all good ones; seconds from each good pod's end to its run showing stage mgt."""
    everyone = [*names, *([bad[0]] if bad else [])]
    for name in names:
        trainers.apply(name, endpoint)
    if bad:
        trainers.apply(bad[0], bad[1])
    pods = _wait(
        "every trainer Running",
        lambda: (p := trainers.running_trainers()) and all(n in p for n in everyone) and p,
    )
    runs = trainers.runs()
    if bad:
        trainers.finish(runs[bad[0]], pods[bad[0]], commit=False)
    ended = {name: trainers.finish(runs[name], pods[name]) for name in names}
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while len(seen) < len(names) and time.monotonic() < deadline:
        now = time.monotonic()
        for name, run in trainers.runs().items():
            if (
                name in ended
                and name not in seen
                and (run.get("status") or {}).get("stage") == "mgt"
            ):
                seen[name] = now - ended[name]
        time.sleep(0.25)
    if len(seen) < len(names):
        raise TimeoutError(f"runs never reached stage mgt: {sorted(set(names) - set(seen))}")
    return list(seen.values())


def clear(trainers: Trainers) -> None:
    """Delete every run and wait for their pods: the kwok nodes' GPUs are for the next round."""
    trainers.kubectl("delete", "lmr", "--all", "--wait=true", "--timeout=300s")
    _wait("the runs' pods gone", lambda: not trainers.running_trainers(), 300)


def bad_run_condition(trainers: Trainers, name: str) -> str:
    def blocked() -> str | None:
        status = trainers.runs()[name].get("status") or {}
        for c in status.get("conditions", []):
            if c["type"] == "Blocked" and c["status"] == "True":
                return f"{c['reason']}: {c['message']}"
        return None

    return str(_wait("the bad run Blocked", blocked, 120))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 20
    state = bed.up()
    driver.install_operator(
        state,
        namespace=NAMESPACE,
        release="badinput",
        watch_namespaces=[NAMESPACE],
        fast_clock=False,
    )
    trainers = Trainers(state)
    with contextlib.suppress(Exception):
        trainers.s3.create_bucket(Bucket=BUCKET)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3"},
        "data": bed.encode_secret(
            {
                "AWS_ACCESS_KEY_ID": state.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": state.s3_secret_key,
            }
        ),
    }
    trainers.kubectl("apply", "-f", "-", stdin=json.dumps(secret))
    time.sleep(5)  # leader election
    calm = round_of(trainers, [f"calm-{i:02d}" for i in range(count)], state.s3_endpoint, None)
    clear(trainers)
    with endpoint_that_hangs() as hanging:
        loaded = round_of(
            trainers,
            [f"beside-{i:02d}" for i in range(count)],
            state.s3_endpoint,
            ("hangs", hanging),
        )
        condition = bad_run_condition(trainers, "hangs")
        clear(trainers)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ratio50 = statistics.median(loaded) / statistics.median(calm)
    ratio99 = pct(loaded, 0.99) / pct(calm, 0.99)
    section = "\n".join(
        [
            f"\n## A run whose S3 endpoint hangs, beside {count} others, {stamp}\n",
            f"Machine: {describe_machine()}. Command: `python -m lmmr1_testbed.bench_bad_input "
            f"{count}` (part of `make bench`). Seconds from a run's FRE trainer pod ending "
            "(checkpoint committed and reported) to the run showing stage mgt, which needs "
            "the operator's S3 check of the final checkpoint.\n",
            "| round | runs | p50 | p99 |",
            "|---|---|---|---|",
            f"| alone | {count} | {statistics.median(calm):.1f} s | {pct(calm, 0.99):.1f} s |",
            f"| beside a run whose endpoint hangs | {count} | {statistics.median(loaded):.1f} s "
            f"| {pct(loaded, 0.99):.1f} s |",
            "",
            f"Ratio beside / alone: p50 {ratio50:.2f}, p99 {ratio99:.2f}. The hanging run: "
            f"`{condition[:200]}`.",
            "",
        ]
    )
    with RESULTS.open("a") as out:
        out.write(section)
    print(section)
    return 0 if "CheckpointUnverified" in condition else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
