"""Running the real trainer (`python -m lmmr1_trainer.train`) as a subprocess in tests: the
stage config a test starts from, the process with CPU settings (one rank, or two under
`lmmr1_trainer.launch` as the operator runs them), its step log, its rollout servers, and a
proxy in front of the verifier that records what the trainer asked it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from lmmr1_testbed.layout import REPO_ROOT, cache_dir
from lmmr1_trainer.localrun import CPU_ENV, Service, start_rollout
from lmmr1_trainer.train import step_records

TRAIN_MODULE = ["-m", "lmmr1_trainer.train"]
# The trainer with the sign of every advantage flipped: the negative control of the
# learning test (`python tests/flipped_advantages.py --config …`).
FLIPPED_TRAINER = [str(Path(__file__).with_name("flipped_advantages.py"))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def two_ranks() -> list[str]:
    """The trainer on two CPU ranks (gloo), launched as the operator launches a multi-rank
    trainer: `lmmr1_trainer.launch` (torchrun) on a free rendezvous port."""
    return [
        "-m", "lmmr1_trainer.launch", "--nproc-per-node=2", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", *TRAIN_MODULE,
    ]  # fmt: skip


def stage_config(
    *,
    init_from: str,
    dataset: dict[str, Any],
    checkpoint_uri: str,
    rollout_urls: list[str],
    reward_url: str,
    token_file: Path,
    s3_endpoint: str | None = None,
    stage: str = "mgt",
    rollout_backend: str = "vllm",
    **algorithm: Any,
) -> dict[str, Any]:
    """A small CPU stage (ZeRO-2, fp32) generating with vLLM: colocated with the trainer
    without `rollout_urls`, on those rollout servers with them; `algorithm` overrides."""
    return {
        "run": {"namespace": "ns", "name": "tiny", "stage": stage, "stage_index": 1},
        "init_from": init_from,
        "dataset": dataset,
        "algorithm": {
            "samples_per_prompt": 4,
            "rollout_batch_size": 2,
            "train_batch_size": 4,
            "micro_train_batch_size": 2,
            "epochs_per_rollout": 1,
            "learning_rate": 1e-3,
            "max_generation_length": 24,
            "zero_stage": 2,
            "bf16": False,
            "gradient_checkpointing": True,
            "kl_coef": 0.001,
            **algorithm,
        },
        "reward": {"url": reward_url},
        "rollout": {
            "mode": "separate" if rollout_urls else "colocate",
            "urls": rollout_urls,
            "backend": rollout_backend,
            "token_file": str(token_file),
        },
        "trainer": {"nodes": 1, "gpus_per_node": 0},
        "checkpoint": {"uri": checkpoint_uri, "every_steps": 1, "keep_last": 2},
        "progress": {"configmap": "tiny-progress", "namespace": "ns"},
        "s3": {"endpoint": s3_endpoint},
    }


# What a built tiny model depends on: its builder, the warm start's data and the pinned
# torch and transformers. A change to any of them builds it again.
_MODEL_BUILDER = [
    "trainer_image/lmmr1_trainer/tiny_model.py",
    "trainer_image/lmmr1_trainer/synthetic.py",
    "trainer_image/lmmr1_trainer/tasks/sokoban/*.py",
    "requirements/trainer-cpu.txt",
]


def _model_builder_digest() -> str:
    digest = hashlib.sha256()
    for pattern in _MODEL_BUILDER:
        for path in sorted(REPO_ROOT.glob(pattern)):
            digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_tiny_model(
    out: Path, warm_start_steps: int = 0, warm_start_task: str = "arithmetic"
) -> Path:
    """The tiny Qwen2.5-VL in `out`, as `python -m lmmr1_trainer.tiny_model` builds it (CPU
    settings). Built once per builder digest into the test bed's cache and copied from there:
    the warm-started ones take minutes of SFT on 2 cores (300 steps: 104 s)."""
    name = f"tiny-vl-{warm_start_task}-{warm_start_steps}-{_model_builder_digest()}"
    cached = cache_dir() / "test-models" / name
    if not (cached / ".complete").exists():
        partial = cached.with_name(f"{name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "lmmr1_trainer.tiny_model", str(partial),
             "--warm-start-steps", str(warm_start_steps), "--warm-start-task", warm_start_task],
            check=True, env={**os.environ, **CPU_ENV}, capture_output=True,
        )  # fmt: skip
        (partial / ".complete").write_text(name + "\n")
        shutil.rmtree(cached, ignore_errors=True)
        partial.rename(cached)
        for stale in cached.parent.glob(f"tiny-vl-{warm_start_task}-{warm_start_steps}-*"):
            if stale != cached and ".partial-" not in stale.name:
                shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(cached, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
    return out


def synthetic_dataset(out: Path, task: str, count: int) -> Path:
    """A local synthetic dataset (`python -m lmmr1_trainer.synthetic`); its train.jsonl."""
    subprocess.run(
        [sys.executable, "-m", "lmmr1_trainer.synthetic", "--task", task, "--count", str(count),
         "--out", str(out)],
        check=True, env={**os.environ, **CPU_ENV}, capture_output=True,
    )  # fmt: skip
    return out / "train.jsonl"


def write_token(directory: Path) -> Path:
    """The rollout servers' weight-update token, as the operator mounts it."""
    token = directory / "token"
    token.write_text("t0ken\n")
    return token


def write_stage(path: Path, stage: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(stage))
    return path


@contextmanager
def rollout_servers(
    stage: dict[str, Any], workdir: Path, count: int, env: dict[str, str] | None = None
) -> Iterator[list[Service]]:
    """`count` rollout servers (the stage's back end, vLLM by default) serving `stage`'s
    `init_from` (started together), stopped on exit. Every trainer pushes its weights when it
    starts, so consecutive runs can share them."""
    config = write_stage(workdir / "rollout-stage.yaml", stage)
    token = Path(stage["rollout"]["token_file"])
    server_env = {**(env or {}), "LMMR1_MODEL_CACHE": str(workdir / "rollout-models")}
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start_rollout, config, token, env=server_env) for _ in range(count)]
    services = [f.result() for f in futures if f.exception() is None]
    try:
        for future in futures:
            future.result()  # the first failure to start, once the others are stopped
        yield services
    finally:
        for service in services:
            service.stop()


@contextmanager
def rollout_server(
    stage: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
) -> Iterator[Service]:
    """One rollout server (see `rollout_servers`)."""
    with rollout_servers(stage, workdir, 1, env) as services:
        yield services[0]


@dataclass
class RewardCall:
    """One `/get_reward` the trainer made: what it sent and what the verifier answered."""

    queries: list[str]
    prompts: list[str]
    labels: list[str]
    scores: dict[str, list[float]]


@contextmanager
def recording_verifier(url: str) -> Iterator[tuple[str, list[RewardCall]]]:
    """A proxy in front of the verifier at `url`: its own URL, and every call it forwarded."""
    calls: list[RewardCall] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            forward = urllib.request.Request(
                url.rstrip("/") + self.path,
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(forward, timeout=180) as response:
                status, answer = response.status, response.read()
            if self.path == "/get_reward" and status == 200:
                sent = json.loads(body)
                with lock:
                    calls.append(
                        RewardCall(
                            sent["query"], sent["prompts"], sent["labels"], json.loads(answer)
                        )
                    )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()


def trainer_env(workdir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        **CPU_ENV,
        **(env or {}),
        "LMMR1_TORCH_THREADS": "1",
        "LMMR1_PROGRESS_FILE": str(workdir / "progress.json"),
        "LMMR1_TERMINATION_LOG": str(workdir / "termination-log"),
        "LMMR1_MODEL_CACHE": str(workdir / "models"),
        "LMMR1_WORKDIR": str(workdir),
    }


def start_trainer(
    config: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    program: list[str] = TRAIN_MODULE,
) -> subprocess.Popen[str]:
    """The trainer in a session of its own, so that a kill reaches every rank."""
    return subprocess.Popen(
        [sys.executable, *program, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=trainer_env(workdir, env),
        start_new_session=True,
    )


def run_trainer_output(
    config: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    program: list[str] = TRAIN_MODULE,
    timeout_s: float = 400,
) -> list[str]:
    """Run the stage to the end; its output lines. Fails with the log's tail otherwise."""
    process = start_trainer(config, workdir, env, program)
    out, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, out[-4000:]
    return out.splitlines()


def run_trainer(
    config: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    program: list[str] = TRAIN_MODULE,
    timeout_s: float = 400,
) -> list[dict[str, Any]]:
    """Run the stage to the end; its step records. Fails with the log's tail otherwise."""
    return step_records(run_trainer_output(config, workdir, env, program, timeout_s))


def run_until_killed(
    config: Path,
    workdir: Path,
    kill_after_step: int,
    env: dict[str, str] | None = None,
    program: list[str] = TRAIN_MODULE,
) -> list[str]:
    """Run the stage and SIGKILL every process of it (no clean-up, as when its pod dies) once
    step `kill_after_step` is logged, i.e. after that step's checkpoint, when it has one, is
    committed. Its output lines."""
    process = start_trainer(config, workdir, env, program)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        records = step_records([line])
        if records and records[0]["step"] == kill_after_step:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "".join(lines[-30:])
    return lines
