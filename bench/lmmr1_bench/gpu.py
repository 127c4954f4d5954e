"""bash bench/gpu.sh [--tiny] [--out DIR] [--phases rollout,update,sync] [...]

(= `python -m lmmr1_bench.gpu ...` with `trainer_image` and `bench` on PYTHONPATH.) The
trainer's three hot paths on Qwen2.5-VL-3B-Instruct's architecture with random bf16 weights built on
the GPU (nothing is downloaded): rollout tokens/s (vLLM if it imports, else the transformers
back end, labelled so), DeepSpeed update seconds per optimizer step (ZeRO-2, bf16, gradient
checkpointing, 8 x 1024-token micro-batches; plain torch AdamW if deepspeed is absent), and
weight-sync seconds for the full state dict (HTTP safetensors push to a local rollout
server; NCCL needs vLLM and two GPUs). Each phase runs in its own process under a time cap,
so one that crashes, runs out of memory or overruns leaves the others' numbers; the update
phase retries with half the micro-batch after an out-of-memory error. `--phases colocate`
(not in the defaults; `lmmr1_bench.gpu_colocate`) measures the colocated engine instead:
`VllmEngine.generate` tokens/s against bare `vllm.LLM.generate` and `update_weights` seconds.

Writes `gpubench.json` and `gpubench.md` (card, versions, numbers) plus one log per phase
to `--out` (default `$OUT`, else `./bench-gpu-out`). The defaults finish in about 7 minutes
on one H100 (`--budget-s 420`). `--tiny`: the same code with the tiny Qwen2.5-VL on CPU (the
test that keeps this script from rotting). Without CUDA and without `--tiny` it exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any

from lmmr1_bench.gpu_colocate import phase_colocate
from lmmr1_bench.gpu_phases import PHASES, BenchSettings, PhaseFunction

EXIT_NO_GPU = 2
OUT_ENV = "OUT"
DEFAULT_OUT = Path("bench-gpu-out")
# Seconds each phase may take, its process's start and model build included. Full size:
# 130 + 160 + 130 = 420 s, inside gpu.sh's 8 minutes with room for the wheels' install.
PHASE_CAPS = {"rollout": 130.0, "update": 160.0, "sync": 130.0, "colocate": 240.0}
# `colocate` (the colocated vLLM engine against bare vLLM, and its weight updates) runs only
# when asked for: `--phases colocate`.
ALL_PHASES: dict[str, PhaseFunction] = {**PHASES, "colocate": phase_colocate}
TINY_CAP = 240.0  # a cold DeepSpeed CPU start JIT-builds its shm op (~1 min)
MIN_PHASE_S = 30.0  # a phase given less than this is skipped, not started

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (3.75 B parameters, embeddings tied).
QWEN25VL_3B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 70,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": [16, 24, 24],
    },
}
QWEN25VL_3B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "hidden_act": "silu",
}


def qwen25vl_3b_config(tokenizer: Any) -> Any:
    """Qwen2.5-VL-3B-Instruct's architecture, with `tokenizer`'s special-token ids."""
    from lmmr1_trainer.tiny_model import EOS_TOKEN, PAD_TOKEN, qwen25vl_config

    ids = tokenizer.convert_tokens_to_ids
    special = {"bos_token_id": ids(PAD_TOKEN), "eos_token_id": ids(EOS_TOKEN)}
    text = {**QWEN25VL_3B_TEXT, **special, "pad_token_id": ids(PAD_TOKEN)}
    return qwen25vl_config(tokenizer, text, dict(QWEN25VL_3B_VISION))


def write_model_dir(path: Path, tiny: bool, image_side: int) -> None:
    """Config, tokenizer and processor, no weights: each phase builds random ones itself
    (vLLM with `load_format="dummy"`)."""
    from lmmr1_trainer.tiny_model import build_processor, build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer) if tiny else qwen25vl_3b_config(tokenizer)
    config.save_pretrained(path)
    build_processor(tokenizer, max_pixels=image_side * image_side).save_pretrained(path)


def settings_for(args: argparse.Namespace, model_dir: Path) -> BenchSettings:
    tiny = bool(args.tiny)
    return BenchSettings(
        tiny=tiny,
        device="cpu" if tiny else "cuda",
        dtype="float32" if tiny else "bfloat16",
        model_dir=str(model_dir),
        rollout_backend=args.rollout_backend,
        samples_per_prompt=args.samples or (2 if tiny else 16),
        max_tokens=args.max_tokens or (8 if tiny else 256),
        image_side=112 if tiny else 448,  # 448 px: 256 image tokens per prompt
        max_requests=2 if tiny else 8,
        vllm_prompts_per_request=64,
        gpu_memory_utilization=0.6,
        micro_batch=args.micro_batch or (1 if tiny else 8),
        seq_len=args.seq_len or (288 if tiny else 1024),
        accumulation=2 if tiny else 4,
        zero_stage=args.zero_stage,
        deepspeed=not args.no_deepspeed,
        max_update_steps=2 if tiny else 8,
        sync_repeats=2 if tiny else 3,
    )


def _package_versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "deepspeed", "vllm", "pydantic", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "absent"
    return found


def run_phase(name: str, settings: BenchSettings, cap_s: float, result: Path) -> int:
    """The child side: one phase, its numbers in `result`; exit 3 on out-of-memory."""
    import traceback

    import torch

    from lmmr1_bench.gpu_phases import PhaseSkipped, Recorder, device_info

    started = time.monotonic()
    record = Recorder(result)
    record.set(device=device_info(settings.device))
    # Stop measuring with a tenth of the cap left: the process still has to exit.
    deadline = started + cap_s * 0.9
    try:
        ALL_PHASES[name](settings, record, deadline)
    except PhaseSkipped as skipped:
        record.set(status="skipped", reason=str(skipped))
        return 0
    except torch.OutOfMemoryError as err:
        record.set(status="oom", error=str(err).splitlines()[0])
        return 3
    except Exception as err:
        traceback.print_exc()
        record.set(status="error", error=f"{type(err).__name__}: {err}"[:500])
        return 1
    record.set(status="ok", seconds=round(time.monotonic() - started, 1))
    return 0


def _run_child(
    name: str, settings: BenchSettings, cap_s: float, workdir: Path, out: Path
) -> dict[str, Any]:
    """One phase in its own process group, killed at `cap_s`; its result, however it ended."""
    settings_file = workdir / f"{name}-settings.json"
    settings_file.write_text(json.dumps(dataclasses.asdict(settings)))
    result_file = workdir / f"{name}-result.json"
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "lmmr1_bench.gpu",
        "--phase",
        name,
        "--settings",
        str(settings_file),
        "--cap-s",
        str(cap_s),
        "--result",
        str(result_file),
    ]
    # The phase process imports this package by name, wherever the parent found it.
    here = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "PYTHONPATH": f"{here}{os.pathsep}{path}" if path else here,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu" if settings.device == "cpu" else "cuda",
    }
    started = time.monotonic()
    timed_out = False
    with (out / f"phase-{name}.log").open("a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        child = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = child.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            code = None
        finally:
            if child.poll() is None:  # timed out, or this process is being stopped
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    result: dict[str, Any] = {"status": "error", "error": "the phase wrote no result"}
    if result_file.is_file():
        result = json.loads(result_file.read_text())
    if timed_out:
        result.update(status="timed out", error=f"killed at its {cap_s:.0f} s cap")
    elif code not in (0, 3) and result.get("status") in ("running", "ok"):
        result.update(status="error", error=f"exit code {code}: see phase-{name}.log")
    result.update(wall_s=round(time.monotonic() - started, 1), exit_code=code)
    return result


def _measure(
    name: str, settings: BenchSettings, cap: float, deadline: float, workdir: Path, out: Path
) -> dict[str, Any]:
    """One phase; an update that ran out of memory again with half the micro-batch (the
    same samples per optimizer step) while that may help and time is left."""
    result = _run_child(name, settings, cap, workdir, out)
    while name == "update" and result.get("status") == "oom":
        if not smaller_batch_may_fit(result, settings, deadline):
            break
        settings = dataclasses.replace(
            settings, micro_batch=settings.micro_batch // 2, accumulation=settings.accumulation * 2
        )
        print(f"gpubench: update ran out of memory; micro-batch {settings.micro_batch}")
        cap = min(PHASE_CAPS[name], deadline - time.monotonic())
        result = {**_run_child(name, settings, cap, workdir, out), "after_oom": True}
    return result


def smaller_batch_may_fit(result: dict[str, Any], settings: BenchSettings, deadline: float) -> bool:
    """After an out-of-memory update: retry with half the micro-batch only if activations
    can be what did not fit (not the ZeRO state itself) and there is time for it."""
    if settings.micro_batch == 1 or deadline - time.monotonic() < MIN_PHASE_S:
        return False
    state, memory = result.get("zero_state_gib"), (result.get("device") or {}).get("memory_gib")
    return state is None or memory is None or state < 0.9 * memory


def summarise(name: str, result: dict[str, Any]) -> str:
    status = result.get("status")
    if status == "oom" and "zero_state_gib" in result:
        return (
            f"out of memory: {result.get('error', '')} (one unpartitioned GPU holds "
            f"~{result['zero_state_gib']} GiB of ZeRO state for {result['parameters']:,} "
            "parameters; use a card with more memory, e.g. an H200)"
        )
    if status != "ok":
        return f"{status}: {result.get('reason') or result.get('error', '')}"
    if name == "rollout":
        return f"{result.get('tokens_per_second')} tokens/s generated ({result['backend']})"
    if name == "colocate":
        return (
            f"VllmEngine.generate {result.get('ours_tokens_per_second')} tokens/s = "
            f"{result.get('tokens_per_second_ratio')}x bare vllm.LLM.generate "
            f"({result.get('bare_tokens_per_second')}); update_weights "
            f"{result.get('median_update_s')} s ({result.get('engine')})"
        )
    if name == "update":
        return (
            f"{result.get('median_step_s')} s per optimizer step, "
            f"{result.get('train_tokens_per_second')} tokens/s ({result['engine']})"
        )
    return (
        f"full state dict {result.get('state_dict_gib')} GiB: gather "
        f"{result.get('median_gather_s')} s + HTTP push {result.get('median_push_s')} s; "
        f"NCCL {result.get('nccl')}"
    )


def render_markdown(report: dict[str, Any]) -> str:
    device = report.get("device") or {}
    lines = [
        f"# GPU benchmark ({report['mode']}), {report['started_at']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Device: **{device.get('name', 'unknown')}**"
        + (f", {device['memory_gib']} GiB" if "memory_gib" in device else "")
        + f"; host {report['host']['cores']} cores, Python {report['host']['python']}  ",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + f"; CUDA {report['cuda']}  ",
        f"Model: {report['model']}  ",
        f"Total: {report['total_s']} s",
        "",
        "| phase | result | wall |",
        "|---|---|---:|",
    ]
    for name, result in report["phases"].items():
        wall = f"{result['wall_s']} s" if "wall_s" in result else ""
        lines.append(f"| {name} | {summarise(name, result)} | {wall} |")
    settings = report["settings"]
    update = {**settings, **report["phases"].get("update", {})}  # a retry's smaller batch
    lines += [
        "",
        f"Rollout: {settings['samples_per_prompt']} samples x {settings['max_tokens']} new "
        f"tokens per prompt, {settings['image_side']} px image, temperature 1 (random weights "
        "rarely stop early). Update: micro-batch "
        f"{update['micro_batch']} x {update['seq_len']} tokens, {update['accumulation']} "
        "micro-batches per optimizer step, PPO-clip loss; the first step is a warm-up and not "
        "counted. Sync: gather = GPU -> CPU copy of every weight; push = "
        "`HttpWeightSync.push` (safetensors, POST, the server loads it).",
        "",
    ]
    return "\n".join(lines)


def _write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "gpubench.json").write_text(json.dumps(report, indent=1))
    (out / "gpubench.md").write_text(render_markdown(report))


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"gpubench: stopped by signal {signum}")


def orchestrate(args: argparse.Namespace) -> int:
    import torch

    started = time.monotonic()
    deadline = started + args.budget_s
    out = Path(args.out or os.environ.get(OUT_ENV) or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _stop)
    workdir = Path(tempfile.mkdtemp(prefix="lmmr1-gpubench-"))
    try:
        settings = settings_for(args, workdir / "model")
        write_model_dir(Path(settings.model_dir), settings.tiny, settings.image_side)
        report: dict[str, Any] = {
            "mode": "tiny (CPU smoke test)" if settings.tiny else "Qwen2.5-VL-3B, random weights",
            "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["bash bench/gpu.sh", *args.argv]),
            "device": None,
            "host": {"cores": os.cpu_count(), "python": platform.python_version()},
            "versions": _package_versions(),
            "cuda": torch.version.cuda,
            "model": "tiny Qwen2.5-VL" if settings.tiny else "Qwen2.5-VL-3B-Instruct architecture",
            "settings": dataclasses.asdict(settings),
            "phases": {},
        }
        failed = False
        for name in args.phases.split(","):
            cap = min(TINY_CAP if settings.tiny else PHASE_CAPS[name], deadline - time.monotonic())
            result: dict[str, Any] = {"status": "stopped", "error": "gpubench was stopped"}
            try:
                if cap < (5.0 if settings.tiny else MIN_PHASE_S):
                    result = {"status": "skipped", "reason": "out of time budget"}
                else:
                    print(f"gpubench: {name} (cap {cap:.0f} s)", flush=True)
                    result = _measure(name, settings, cap, deadline, workdir, out)
            finally:  # also when SIGTERM (gpu.sh's time limit) stops the run
                report["phases"][name] = result
                report["device"] = report["device"] or result.get("device")
                report["total_s"] = round(time.monotonic() - started, 1)
                _write_report(out, report)
            failed = failed or result.get("status") not in ("ok", "skipped")
            print(f"gpubench: {name}: {summarise(name, result)}", flush=True)
        print(f"gpubench: report in {out}/gpubench.md", flush=True)
        return 1 if failed else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bash bench/gpu.sh", description=__doc__.split("\n\n")[1] if __doc__ else None
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    parser.add_argument("--out", default=None, help="default: $OUT, else ./bench-gpu-out")
    parser.add_argument("--phases", default="rollout,update,sync")
    parser.add_argument("--budget-s", type=float, default=420.0, help="all phases together")
    parser.add_argument(
        "--rollout-backend", choices=["auto", "vllm", "transformers"], default="auto"
    )
    parser.add_argument("--no-deepspeed", action="store_true", help="plain torch AdamW")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per trained sequence")
    parser.add_argument("--samples", type=int, default=None, help="rollout samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=None, help="rollout tokens per sample")
    # The child side (one phase), started by the parent.
    parser.add_argument("--phase", choices=sorted(ALL_PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cap-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.phase:
        settings = BenchSettings(**json.loads(args.settings.read_text()))
        code = run_phase(args.phase, settings, args.cap_s, args.result)
        # The numbers are on disk. Skip the interpreter's teardown: after the rollout phase
        # it sometimes aborts in native code ("terminate called without an active
        # exception", SIGABRT), which would turn a finished measurement into an error.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    unknown = set(args.phases.split(",")) - set(ALL_PHASES)
    if unknown:
        parser.error(f"--phases: unknown {sorted(unknown)}; choose from {sorted(ALL_PHASES)}")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print(
            f"gpubench: no CUDA device visible (torch {torch.__version__}): run bench/gpu.sh "
            "on a GPU machine, or add --tiny for the CPU smoke test",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
