"""The GPU benchmark (bench/gpu.sh) on CPU: `--tiny` end to end through the same phases and
processes as on a GPU, the 3B architecture's size, the plain-torch fallback without
DeepSpeed, and the one-line refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lmmr1_bench import gpu as gpubench
from lmmr1_bench.gpu_phases import BenchSettings, Recorder, phase_update

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("gpubench")
    env = {**os.environ, "PYTHON": sys.executable, "LMMR1_GPUBENCH_WHEELS": "0"}
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads((out / "gpubench.json").read_text()), out


def test_tiny_run_measures_every_phase(tiny_run: tuple[dict[str, Any], Path]) -> None:
    report, out = tiny_run
    phases = report["phases"]
    assert {name: p["status"] for name, p in phases.items()} == {
        "rollout": "ok",
        "update": "ok",
        "sync": "ok",
    }
    rollout = phases["rollout"]
    assert rollout["tokens_per_second"] > 0 and "NOT the vLLM figure" in rollout["backend"]
    assert all(r["generated_tokens"] > 0 for r in rollout["requests"])
    update = phases["update"]
    assert update["engine"].startswith("DeepSpeed") and "ZeRO-2" in update["engine"]
    assert len(update["steps"]) == 3 and update["steps"][0]["warm_up"]
    assert update["median_step_s"] > 0 and update["tokens_per_step"] > 0
    sync = phases["sync"]
    assert sync["verified"] is True and len(sync["pushes"]) == 2
    assert sync["median_push_s"] > 0 and "not measured" in sync["nccl"]
    assert report["device"]["name"].startswith("CPU")
    markdown = (out / "gpubench.md").read_text()
    assert "| update |" in markdown and "s per optimizer step" in markdown
    assert {p.name for p in out.glob("phase-*.log")} == {
        "phase-rollout.log",
        "phase-update.log",
        "phase-sync.log",
    }


def _tiny_settings(tmp_path: Path, *flags: str) -> BenchSettings:
    model_dir = tmp_path / "model"
    gpubench.write_model_dir(model_dir, tiny=True, image_side=112)
    args = gpubench.build_parser().parse_args(["--tiny", *flags])
    return gpubench.settings_for(args, model_dir)


def test_without_deepspeed_the_update_is_plain_torch_adamw(tmp_path: Path) -> None:
    settings = _tiny_settings(tmp_path, "--no-deepspeed", "--seq-len", "270")
    record = Recorder(tmp_path / "update.json")
    phase_update(settings, record, deadline=time.monotonic() + 120)
    assert record.data["engine"].startswith("plain torch AdamW (--no-deepspeed")
    assert len(record.data["steps"]) == 3 and record.data["median_step_s"] > 0
    assert json.loads((tmp_path / "update.json").read_text())["seq_len"] == 270


def test_the_3b_config_has_qwen25_vl_3b_parameter_count() -> None:
    from transformers import AutoModelForImageTextToText

    from lmmr1_trainer.tiny_model import build_tokenizer

    config = gpubench.qwen25vl_3b_config(build_tokenizer())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976  # 3.75 B, tied head
    assert model.config.vision_config.depth == 32 and model.config.text_config.hidden_size == 2048


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_without_cuda_the_full_run_refuses_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpubench.main([]) == gpubench.EXIT_NO_GPU
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tiny" in err


def test_an_update_whose_zero_state_cannot_fit_is_not_retried() -> None:
    settings = gpubench.settings_for(gpubench.build_parser().parse_args([]), Path("unused"))
    later = time.monotonic() + 600
    state = {"zero_state_gib": 83.9, "parameters": 3_754_622_976, "error": "CUDA out of memory"}
    on_h100 = {"status": "oom", **state, "device": {"memory_gib": 79.2}}
    assert not gpubench.smaller_batch_may_fit(on_h100, settings, later)
    assert "H200" in gpubench.summarise("update", on_h100)
    on_h200 = {**on_h100, "device": {"memory_gib": 139.8}}
    assert gpubench.smaller_batch_may_fit(on_h200, settings, later)
    assert not gpubench.smaller_batch_may_fit(on_h200, settings, time.monotonic() + 5)
