"""The TRL side of `python -m lmmr1_bench.trainer`: GRPOTrainer on a bench config, timed.

TRL (the `bench` extra) trains the same tiny model on the same rows with the bench's batch
settings; its reward function is our rule-based `Verifier`, in-process. Step time is wall
clock from `on_step_begin` to `on_step_end` (generation, scoring, every micro-batch and the
optimizer step); generation is TRL's `_generate` (tokenising the prompts, `generate`,
decoding), reward is our function; the rest of the step is counted as update.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lmmr1_bench.trainer import (
    WARMUP_STEPS,
    BenchCase,
    BenchSettings,
    RunResult,
    StepTiming,
)
from lmmr1_trainer.config import DatasetConfig
from lmmr1_trainer.data import ChatMessage, ImageLoader, PromptRow, decode_images, load_dataset
from lmmr1_trainer.verifier.config import PoolSettings, VerifierConfig
from lmmr1_trainer.verifier.engine import Sample, Verifier


class StepClock(TrainerCallback):
    """Per optimizer step: wall clock, and the generation and reward seconds inside it."""

    def __init__(self) -> None:
        self.steps: list[StepTiming] = []
        self.generate = 0.0
        self.reward = 0.0
        self.response_length = 0.0
        self._started = 0.0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self._started = time.perf_counter()
        self.generate = self.reward = 0.0

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        seconds = time.perf_counter() - self._started
        update = seconds - self.generate - self.reward
        self.steps.append(
            StepTiming(seconds, self.generate, self.reward, update, 0.0, self.response_length)
        )

    def timing_generation(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(generate)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.generate += time.perf_counter() - started

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


def _config(settings: BenchSettings, output_dir: Path) -> Any:
    from trl.trainer.grpo_config import GRPOConfig

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
    )


def run_trl(case: BenchCase, settings: BenchSettings, workdir: Path) -> RunResult:
    """GRPOTrainer for `settings.steps` steps; a failure is reported, not raised."""
    try:
        return _train(case, settings, workdir)
    except Exception as err:  # the table says why TRL could not run this config
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        return RunResult(error=f"{type(err).__name__}: {first_line}")


def _train(case: BenchCase, settings: BenchSettings, workdir: Path) -> RunResult:
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
            args=_config(settings, workdir),
            train_dataset=dataset,
            processing_class=encoder.processor or encoder.tokenizer,
            callbacks=[clock],
        )
        # TRL's generation (tokenise the prompts, generate, decode), timed in place.
        setattr(trainer, "_generate", clock.timing_generation(trainer._generate))  # noqa: B010
        trainer.train()
    return RunResult(clock.steps[WARMUP_STEPS:])
