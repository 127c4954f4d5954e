"""The first-GPU-run smoke test (bench/gpu-smoke.sh) on CPU: the same launches, kill, resume
and checks on two gloo ranks with vLLM's CPU build; its sanity checks fail on bad numbers;
and without CUDA the GPU path refuses in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmmr1_bench.gpu_smoke import record_problems

ROOT = Path(__file__).resolve().parents[2]


def _smoke(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu-smoke.sh"), *args, "--out", str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_smoke_kills_resumes_and_passes_its_checks_on_cpu(tmp_path: Path) -> None:
    run = _smoke("--cpu", out=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads((tmp_path / "gpu-smoke.json").read_text())
    assert report["passed"] and report["ranks"] == 2
    first, resumed = report["launches"]
    assert first["killed"] and first["committed_at_end"] >= 2
    assert [r["step"] for r in resumed["records"]][-1] == 3
    assert set(report["checks"].values()) == {"ok"}, report["checks"]
    assert "PASSED" in (tmp_path / "gpu-smoke.md").read_text()


def test_the_sanity_checks_catch_what_a_broken_gpu_run_logs() -> None:
    good = {"step": 1, "reward": 0.5, "policy_loss": 0.1, "kl": 0.0, "lr": 1e-6,
            "response_length": 12.0, "seconds": 3.0}  # fmt: skip
    assert record_problems([good]) == []
    assert record_problems([{**good, "policy_loss": float("nan")}]) == [
        "step 1: policy_loss is nan"
    ]
    assert record_problems([{**good, "reward": 7.0}]) == ["step 1: reward 7.0 outside [0, 1.5]"]
    assert record_problems([{**good, "response_length": 0}]) == ["step 1: empty responses"]
    assert record_problems([{k: v for k, v in good.items() if k != "kl"}]) == ["step 1: kl is None"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_without_cuda_the_gpu_path_refuses_in_one_line(tmp_path: Path) -> None:
    run = _smoke(out=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "gpu-smoke: no CUDA device is visible (use --cpu for the CPU path)"
    ]
