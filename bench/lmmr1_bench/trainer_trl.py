"""python -c 'import sys, lmmr1_bench.trainer_trl as t; sys.exit(t.main())' WORKDIR

The TRL side of the trainer benchmark (`python -m lmmr1_bench.trainer` starts it with that
command): GRPOTrainer on a bench config, timed, in its own process (vLLM's engine and
process-wide settings do not outlive a run). `run_trl` writes the request
(`WORKDIR/request.json`: the case, the settings, whether to generate with vLLM) and reads the
steps back from `WORKDIR/result.json`. Not `python -m`: the verifier pool's workers start
from a forkserver that re-imports the `__main__` module, and this one imports transformers
and torch, more address space than a worker's 2 GiB limit (they died, and every reward
waited for a restart: 15-70 s a step).

TRL (the `bench` extra) trains the same tiny model on the same rows with the bench's batch
settings; its reward function is our rule-based `Verifier`, in-process. It generates with
the policy itself (`model.generate`) or, with `use_vllm`, on its own colocated vLLM engine
(`vllm_mode="colocate"`). Step time is wall clock from `on_step_begin` to `on_step_end`
(generation, scoring, every micro-batch and the optimizer step); generation is TRL's
`_generate` (tokenising the prompts, `generate`, decoding) less the weight sync inside it
(vLLM only: `sync_weights`), reward is our function; the rest of the step is counted as
update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lmmr1_bench.trainer import (
    KV_CACHE_GIB,
    TORCH_THREADS,
    WARMUP_STEPS,
    BenchCase,
    BenchSettings,
    RunResult,
    StepTiming,
)
from lmmr1_trainer.config import DatasetConfig
from lmmr1_trainer.data import ChatMessage, ImageLoader, PromptRow, decode_images, load_dataset
from lmmr1_trainer.localrun import CPU_ENV
from lmmr1_trainer.verifier.config import PoolSettings, VerifierConfig
from lmmr1_trainer.verifier.engine import Sample, Verifier


class StepClock(TrainerCallback):
    """Per optimizer step: wall clock, and the generation and reward seconds inside it."""

    def __init__(self) -> None:
        self.steps: list[StepTiming] = []
        self.generate = 0.0
        self.reward = 0.0
        self.sync = 0.0  # inside `generate`
        self.response_length = 0.0
        self._started = 0.0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._started = time.perf_counter()
        self.generate = self.reward = self.sync = 0.0

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        seconds = time.perf_counter() - self._started
        generate = self.generate - self.sync
        update = seconds - self.generate - self.reward
        self.steps.append(
            StepTiming(seconds, generate, self.reward, update, self.sync, self.response_length)
        )

    def timing(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """`function`, its seconds added to `phase` ("generate" or "sync")."""

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                setattr(self, phase, getattr(self, phase) + time.perf_counter() - started)

        return timed


class VerifierReward:
    """A TRL reward function: our `Verifier` (format 0.5 + accuracy 1.0) on each completion."""

    def __init__(self, verifier: Verifier, clock: StepClock) -> None:
        self.__name__ = "lmmr1_verifier"  # TRL names the reward's metrics after it
        self.verifier = verifier
        self.clock = clock

    def __call__(
        self,
        completions: list[Any],
        answer: list[str],
        completion_ids: list[list[int]],
        **_: Any,
    ) -> list[float | None]:
        started = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        samples = [Sample(text, label) for text, label in zip(texts, answer, strict=True)]
        rewards: list[float | None] = [result.reward for result in self.verifier.score(samples)]
        self.clock.reward += time.perf_counter() - started
        self.clock.response_length = statistics.mean(len(ids) for ids in completion_ids)
        return rewards


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if item.get("type") == "text")


def trl_example(row: PromptRow, images: ImageLoader) -> dict[str, Any]:
    """Our row as a TRL conversational example: string contents (TRL puts the images before
    the first user turn's text, as our chats have them) and the PIL images in `images`."""
    prompt: list[ChatMessage] = [
        {"role": message["role"], "content": _text(message["content"])} for message in row.messages
    ]
    example: dict[str, Any] = {"prompt": prompt, "answer": row.label}
    pictures = decode_images(row.messages, images)
    if pictures:
        example["images"] = pictures
    return example


def _config(settings: BenchSettings, output_dir: Path, use_vllm: bool) -> Any:
    from trl.trainer.grpo_config import GRPOConfig

    vllm: dict[str, Any] = {}
    if use_vllm:
        vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": False}
    return GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=settings.seed,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.micro_batch,
        gradient_accumulation_steps=settings.samples_per_step // settings.micro_batch,
        num_generations=settings.samples_per_prompt,
        max_completion_length=settings.generation_length,
        temperature=1.0,
        top_p=1.0,
        learning_rate=settings.learning_rate,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=settings.kl_coef,
        epsilon=settings.clip_range,
        num_iterations=1,
        scale_rewards="group",
        gradient_checkpointing=False,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        **vllm,
    )


# vLLM on CPU as our colocated engine sets it up for itself: the engine core in this process,
# the same KV cache, one thread that vLLM neither pins nor caps.
VLLM_CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


CHILD_COMMAND = "import sys, lmmr1_bench.trainer_trl as t; sys.exit(t.main())"


def run_trl(
    case: BenchCase, settings: BenchSettings, workdir: Path, use_vllm: bool = False
) -> RunResult:
    """GRPOTrainer for `settings.steps` steps in its own process; a failure is reported, not
    raised."""
    workdir.mkdir(parents=True)
    request = {
        "case": {"name": case.name, "model_dir": str(case.model_dir), "uri": case.dataset_uri},
        "settings": dataclasses.asdict(settings),
        "use_vllm": use_vllm,
    }
    (workdir / "request.json").write_text(json.dumps(request))
    env = {**os.environ, **CPU_ENV, **(VLLM_CPU_ENV if use_vllm else {})}
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD_COMMAND, str(workdir)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return RunResult(error="timed out after 600 s")
    (workdir / "output.log").write_text(done.stdout + done.stderr)
    result_file = workdir / "result.json"
    if not result_file.exists():
        tail = " / ".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        return RunResult(error=f"exited {done.returncode}: {tail}")
    result = json.loads(result_file.read_text())
    steps = [StepTiming(**step) for step in result["steps"]]
    return RunResult(steps, error=result["error"])


def main(argv: Sequence[str] | None = None) -> int:
    (workdir,) = argv if argv is not None else sys.argv[1:]
    request = json.loads((Path(workdir) / "request.json").read_text())
    case = BenchCase(
        request["case"]["name"], Path(request["case"]["model_dir"]), request["case"]["uri"]
    )
    settings = BenchSettings(**request["settings"])
    import torch

    torch.set_num_threads(TORCH_THREADS)
    try:
        result = _train(case, settings, Path(workdir), request["use_vllm"])
    except Exception as err:  # the table says why TRL could not run this config
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        _write_result(Path(workdir), RunResult(error=f"{type(err).__name__}: {first_line}"))
        raise  # the traceback, for whoever reads the run's output
    _write_result(Path(workdir), result)
    return 0


def _write_result(workdir: Path, result: RunResult) -> None:
    steps = [dataclasses.asdict(step) for step in result.steps]
    (workdir / "result.json").write_text(json.dumps({"steps": steps, "error": result.error}))


def _train(case: BenchCase, settings: BenchSettings, workdir: Path, use_vllm: bool) -> RunResult:
    from datasets import Dataset
    from trl.trainer.grpo_trainer import GRPOTrainer

    from lmmr1_trainer.models import ChatEncoder, load_model

    loader = ImageLoader()
    rows = load_dataset(DatasetConfig(uri=case.dataset_uri, type=case.dataset_type))
    dataset = Dataset.from_list([trl_example(row, loader) for row in rows])
    encoder = ChatEncoder.load(case.model_dir)
    clock = StepClock()
    with Verifier(VerifierConfig(pool=PoolSettings(workers=1))) as verifier:
        trainer = GRPOTrainer(
            model=load_model(case.model_dir),
            reward_funcs=VerifierReward(verifier, clock),
            args=_config(settings, workdir / "out", use_vllm),
            train_dataset=dataset,
            processing_class=encoder.processor or encoder.tokenizer,
            callbacks=[clock],
        )
        # TRL's generation (tokenise the prompts, [load weights into vLLM,] generate, decode),
        # timed in place.
        setattr(trainer, "_generate", clock.timing("generate", trainer._generate))  # noqa: B010
        if use_vllm:
            vllm = trainer.vllm_generation
            setattr(vllm, "sync_weights", clock.timing("sync", vllm.sync_weights))  # noqa: B010
        trainer.train()
    return RunResult(clock.steps[WARMUP_STEPS:])
