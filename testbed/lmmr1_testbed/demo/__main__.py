"""The README's first command: the whole product, end to end, on this machine.

    make demo            # or: python -m lmmr1_testbed.demo [--keep]
    KEEP=1 make demo     # leave the test bed running afterwards

Starts the test bed (control plane, process node, S3), seeds S3 with a tiny
Qwen2.5-VL-architecture model and synthetic data, installs the operator with the project's
Helm chart, applies manifests/examples/run-tiny.yaml with kubectl (with TensorBoard and the
test bed's MLflow server as its experiment tracking), follows the run through FRE and MGT
until it ends, and says where its tracking data went. The pods are the operator's real pods,
run by the process node with the same trainer code a GPU cluster runs, on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmmr1_testbed import bed
from lmmr1_testbed.demo import driver, plot, seed
from lmmr1_testbed.demo.tracking import tracking_spec, tracking_summary
from lmmr1_testbed.layout import REPO_ROOT, TestBedState

NAMESPACE = "lmmr1-demo"
OUTPUT = REPO_ROOT / "demo-output"
WINDOW = 4  # steps averaged for "reward before/after"


def say(message: str) -> None:
    print(message, flush=True)


def bar(step: int, total: int, width: int = 24) -> str:
    done = int(width * step / total) if total else 0
    return "#" * done + "-" * (width - done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmmr1_testbed.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        default=bool(os.environ.get("KEEP")),
        help="leave the test bed running (KEEP=1)",
    )
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--warm-start-steps", type=int, default=100)
    args = parser.parse_args(argv)
    started = time.monotonic()
    say("== 1/5 test bed: Kubernetes control plane, process node, S3 (versitygw)")
    state = bed.up()
    try:
        return _demo(state, args, started)
    finally:
        if args.keep:
            say(f"KEEP=1: test bed left running; export KUBECONFIG={state.kubeconfig}")
        else:
            bed.down(quiet=True)
            say("test bed stopped (KEEP=1 keeps it)")


def _demo(state: TestBedState, args: argparse.Namespace, started: float) -> int:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=state.s3_endpoint,
        aws_access_key_id=state.s3_access_key,
        aws_secret_access_key=state.s3_secret_key,
        region_name=state.s3_region,
    )
    run = driver.example_run()
    run["spec"]["tracking"] = tracking_spec(state)  # TensorBoard and the test bed's MLflow
    driver.delete_run(state, NAMESPACE, run["metadata"]["name"])
    say("== 2/5 seeding S3: tiny Qwen2.5-VL model, synthetic FRE (text) and MGT (image) data")
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, **state.s3_env(), "DS_ACCELERATOR": "cpu"}
        uris = seed.seed(s3, env, Path(work), warm_start_steps=args.warm_start_steps)
    for what, uri in uris.items():
        say(f"   {what:6} {uri}")
    say(f"== 3/5 helm install charts/lmmr1 into {driver.OPERATOR_NAMESPACE}")
    driver.install_operator(state, watch_namespaces=[NAMESPACE])
    driver.prepare_namespace(state, NAMESPACE)
    say(f"== 4/5 kubectl apply -f manifests/examples/run-tiny.yaml -n {NAMESPACE}")
    name = driver.apply_run(state, NAMESPACE, run)
    total = {s["name"]: s["algorithm"].get("maxSteps", 0) for s in run["spec"]["stages"]}

    def show(watch: driver.Watch) -> None:
        table = driver.cli(
            state, "kubectl", "get", "lmmr1runs", "-n", NAMESPACE, check=False
        ).stdout.rstrip()
        say(table)
        for stage, points in watch.history.items():
            step, reward, accuracy = points[-1]
            steps = watch.status.get("totalSteps") or total.get(stage) or step
            say(
                f"   {stage:4} [{bar(step, steps)}] step {step}/{steps} reward {reward:.3f} "
                f"accuracy {accuracy:.3f}"
            )

    say("== 5/5 following the run (kubectl get lmmr1runs)")
    watch = driver.follow(state, NAMESPACE, name, timeout=args.timeout, on_change=show)
    code = summarise(state, name, watch, started)
    tracking_summary(state, s3, run, NAMESPACE, say)
    return code


def window_mean(points: list[tuple[int, float, float]]) -> float:
    """Mean reward over a few steps: one step's 32 samples are too noisy to compare."""
    return sum(reward for _, reward, _ in points) / len(points) if points else float("nan")


def _accuracy(point: dict[str, Any] | None) -> str:
    return "-" if not point else f"{point['accuracy']:.3f} (step {point['step']})"


def evaluation_table(record: dict[str, Any]) -> list[str]:
    """A stage's held-out results (status.stages[].evaluation): baseline, final and the gain
    over the stage's starting weights, one row per evaluation dataset."""
    entries = record.get("evaluation") or []
    if not entries:
        return []
    lines = [f"        {'held-out set':16} {'baseline':>18} {'final':>18} {'gain':>8}"]
    for entry in entries:
        gain = entry.get("gain")
        lines.append(
            f"        {entry['dataset']:16} {_accuracy(entry.get('baseline')):>18} "
            f"{_accuracy(entry.get('final') or entry.get('latest')):>18} "
            f"{'-' if gain is None else f'{gain:+.3f}':>8}"
        )
    return lines


def summarise(state: TestBedState, name: str, watch: driver.Watch, started: float) -> int:
    status = watch.status
    say("")
    say(
        f"== run {NAMESPACE}/{name}: {status.get('phase')} in {watch.seconds:.0f}s "
        f"(demo total {time.monotonic() - started:.0f}s)"
    )
    OUTPUT.mkdir(exist_ok=True)
    ok = status.get("phase") == "Succeeded"
    for record in status.get("stages", []):
        stage = record["name"]
        points = watch.history.get(stage, [])
        first, last = window_mean(points[:WINDOW]), window_mean(points[-WINDOW:])
        png = OUTPUT / f"reward-{stage}.png"
        plot.reward_curve([(s, r) for s, r, _ in points], f"{name} / {stage}: mean reward", png)
        say(
            f"   {stage}: {record.get('phase')}, {record.get('step')} steps, mean reward of the "
            f"first {WINDOW} steps {first:.3f} -> last {WINDOW} {last:.3f}, "
            f"restarts {record.get('restarts', 0)}"
        )
        say(
            f"        generated by {record.get('rolloutEngine') or 'an unreported engine'} "
            f"(rollout mode {record.get('rolloutMode')})"
        )
        say(f"        final checkpoint {record.get('finalCheckpoint')}")
        say(f"        reward curve {png.relative_to(REPO_ROOT)}")
        for line in evaluation_table(record):
            say(line)
    if not ok:
        failed = [c for c in status.get("conditions", []) if c["type"] == "Failed"]
        say(f"   failed: {failed[0]['message'] if failed else 'timed out'}")
        say(driver.trainer_logs(state, NAMESPACE, name)[-3000:])
    say(
        "inspect: kubectl describe lmmr1run -n lmmr1-demo tiny; "
        "aws s3 ls --recursive s3://lmmr1-demo/checkpoints/ (source .testbed/s3.env)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
