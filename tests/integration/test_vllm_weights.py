"""vLLM (the CPU build, as CI and the CPU image run it) serves the trainer's weights exactly,
colocated and in a rollout server: after an update, its log-probs for a text prompt and an
image prompt equal the trainer's forward pass with the new weights, and not with the old.

The check itself is tests/vllm_weight_parity.py, in its own process (a colocated engine
lives in its caller's process, as in a trainer rank). Tolerance: fp32 on CPU, the same
kernels up to summation order; measured 2.4e-6. Wrong names (transformers 5's
`model.language_model.*`), a missing tied `lm_head` (measured: -46.8 against -43.5) or a
stale encoder cache are off by far more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.trainer_harness import (
    build_tiny_model,
    rollout_server,
    stage_config,
    synthetic_dataset,
    write_token,
)

from lmmr1_trainer.localrun import CPU_ENV

PARITY = str(Path(__file__).parents[1] / "vllm_weight_parity.py")
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vl"))


@pytest.fixture(scope="module")
def counting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_dataset(tmp_path_factory.mktemp("counting"), "counting", 2)


def _parity(tiny_model: Path, counting: Path, out: Path, *server: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, PARITY, str(tiny_model), str(counting), str(out), *server],
        env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, float] = json.loads(out.read_text())
    print(report)
    return report


def _assert_exact_after_update(report: dict[str, float]) -> None:
    assert report["tokens"] > 0 and report["image_prompt_tokens"] > 20  # the image is in it
    assert report["before"] <= ATOL, report
    assert report["after"] <= ATOL, report
    # The update really reached the engine: the old weights explain its samples far worse.
    assert report["after_vs_old_weights"] > 100 * ATOL, report


def test_a_colocated_engine_takes_the_policys_weights_exactly(
    tiny_model: Path, counting: Path, tmp_path: Path
) -> None:
    report = _parity(tiny_model, counting, tmp_path / "report.json")
    _assert_exact_after_update(report)
    assert report["big_step_samples"] == 16 * 3


def test_a_rollout_server_takes_the_pushed_weights_exactly(
    tiny_model: Path, counting: Path, tmp_path: Path
) -> None:
    token = write_token(tmp_path)
    stage = stage_config(
        init_from=str(tiny_model),
        dataset={"uri": str(counting), "type": "multimodal"},
        checkpoint_uri=str(tmp_path / "checkpoints"),
        rollout_urls=[],
        reward_url="http://127.0.0.1:1",
        token_file=token,
        max_prompt_length=1024,
        max_generation_length=64,
    )
    with rollout_server(stage, tmp_path) as server:
        report = _parity(
            tiny_model, counting, tmp_path / "report.json",
            "--server", server.url, "--token-file", str(token),
        )  # fmt: skip
    _assert_exact_after_update(report)
