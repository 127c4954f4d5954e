"""Held-out evaluation of a stage's policy (`stage.evaluation`).

Each evaluation set (the training data's row format, checked before the first step by
`preflight.checked_evaluation_rows`) is sampled by the stage's own engines, as a training
rollout is (`Rollouts.generate`: in colocate mode every rank generates its share, the other
ranks following with `ColocatedRollout.follow_step`), greedy by default, and scored by the
stage's verifier with the stage's reward settings. Every set of one evaluation goes out in
one `generate` call, so the other ranks follow exactly once per evaluation.

When: before the first step (step 0, the stage's starting weights: the baseline), every
`every_steps` steps and after the last step (`due`). Each evaluation is written as JSON to
`<checkpoint.uri>/evaluation/step-<N>.json`, beside the checkpoint it measured; checkpoint
retention only deletes `step-<N>/` folders, so these files stay. A restarted stage reads a
stored result back (`stored`) instead of measuring the same weights again.

The pure part (`pass_at_k`, `summarise`, `tracker_metrics`, `Ledger`) is separate from the
runner (`Evaluator`) so that it is tested without engines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmmr1_trainer.config import (
    DatasetEvaluation,
    EvaluationConfig,
    EvaluationResult,
    RewardConfig,
)
from lmmr1_trainer.data import ImageLoader, PromptRow
from lmmr1_trainer.rollout.protocol import Rollouts, SamplingParams
from lmmr1_trainer.storage import Storage, StorageError

logger = logging.getLogger("lmmr1_trainer.evaluation")
EVALUATION_DIR = "evaluation"
# A sample counts as correct for pass@k when its accuracy reward (over the weight) is at
# least this: the verifiers score 0 or 1, a partial-credit plug-in's half counts as solved.
CORRECT = 0.5


def result_key(step: int) -> str:
    """The result file's key under the stage's checkpoint URI."""
    return f"{EVALUATION_DIR}/step-{step}.json"


def due(step: int, total_steps: int, every_steps: int) -> bool:
    """Whether the weights after `step` are evaluated: every `every_steps`, and the last."""
    return step > 0 and (step == total_steps or step % every_steps == 0)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct:
    1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as a running product (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


@dataclass(frozen=True)
class PromptScores:
    """One prompt's samples: accuracy in [0, 1], whether in format, generated tokens."""

    accuracy: list[float]
    formatted: list[bool]
    lengths: list[int]


def summarise(
    step: int, prompts: Sequence[PromptScores], k: int, format_scored: bool
) -> EvaluationResult:
    """One set's metrics: mean accuracy over all samples, pass@k (k > 1) averaged over the
    prompts, the share of samples in format, the mean response length."""
    samples = [a for p in prompts for a in p.accuracy]
    if not samples:
        raise ValueError("an evaluation set without samples")
    lengths = [n for p in prompts for n in p.lengths]
    formatted = [f for p in prompts for f in p.formatted]
    passed = None
    if k > 1:
        per_prompt = [
            pass_at_k(len(p.accuracy), sum(a >= CORRECT for a in p.accuracy), k) for p in prompts
        ]
        passed = sum(per_prompt) / len(per_prompt)
    return EvaluationResult(
        step=step,
        accuracy=sum(samples) / len(samples),
        pass_at_k=passed,
        k=k,
        format_rate=sum(formatted) / len(formatted) if format_scored else None,
        response_length=sum(lengths) / len(lengths),
        prompts=len(prompts),
    )


def tracker_metrics(results: dict[str, EvaluationResult]) -> dict[str, dict[str, float]]:
    """Per set, the numbers as plain floats (what an experiment tracker logs)."""
    out: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        metrics = {
            "accuracy": result.accuracy,
            "response_length": result.response_length,
            "prompts": float(result.prompts),
        }
        if result.pass_at_k is not None:
            metrics[f"pass_at_{result.k}"] = result.pass_at_k
        if result.format_rate is not None:
            metrics["format_rate"] = result.format_rate
        out[name] = metrics
    return out


class Ledger:
    """Each set's baseline, latest and final result: what the progress report carries."""

    def __init__(self) -> None:
        self.sets: dict[str, DatasetEvaluation] = {}

    def record(self, results: dict[str, EvaluationResult], total_steps: int) -> None:
        for name, result in results.items():
            entry = self.sets.get(name, DatasetEvaluation())
            update: dict[str, EvaluationResult] = {}
            if result.step == 0:
                update["baseline"] = result
            if entry.latest is None or result.step >= entry.latest.step:
                update["latest"] = result
            if result.step == total_steps and total_steps > 0:
                update["final"] = result
            self.sets[name] = entry.model_copy(update=update)

    def report(self) -> dict[str, DatasetEvaluation] | None:
        return dict(self.sets) or None


def document(
    step: int,
    measured: str,
    checkpoint: str | None,
    config: EvaluationConfig,
    results: dict[str, EvaluationResult],
    rows: dict[str, int],
    skipped: dict[str, int],
    seconds: float,
) -> dict[str, Any]:
    """The result file: what was measured (weights, checkpoint), on what, how, the numbers."""
    datasets = {
        d.name: {
            "uri": d.uri,
            "type": d.type,
            "rows": rows.get(d.name, 0),
            "skipped_rows": skipped.get(d.name, 0),
            "metrics": results[d.name].model_dump(),
        }
        for d in config.datasets
        if d.name in results
    }
    return {
        "step": step,
        "weights": measured,
        "checkpoint": checkpoint,
        "settings": {
            "samples_per_prompt": config.samples_per_prompt,
            "temperature": config.temperature,
            "top_p": config.top_p,
        },
        "datasets": datasets,
        "seconds": round(seconds, 3),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def stored(storage: Storage, step: int) -> dict[str, EvaluationResult] | None:
    """A result file written by an earlier attempt, or None."""
    key = result_key(step)
    try:
        if not storage.exists(key):
            return None
        raw = json.loads(storage.get_bytes(key))
        return {
            name: EvaluationResult.model_validate(entry["metrics"])
            for name, entry in raw["datasets"].items()
        }
    except (StorageError, ValueError, KeyError, TypeError) as err:
        logger.warning("evaluation: ignoring unreadable %s: %s", key, err)
        return None


def stored_steps(storage: Storage) -> list[int]:
    """Steps with a result file, oldest first."""
    steps = []
    for info in storage.list(EVALUATION_DIR + "/"):
        name = info.key.rsplit("/", 1)[-1]
        if name.startswith("step-") and name.endswith(".json"):
            number = name.removeprefix("step-").removesuffix(".json")
            if number.isdigit():
                steps.append(int(number))
    return sorted(steps)


class Evaluator:
    """Rank 0's runner: generate every set's answers in one call, score them, store them."""

    def __init__(
        self,
        config: EvaluationConfig,
        sets: dict[str, list[PromptRow]],
        skipped: dict[str, int],
        rollouts: Rollouts,
        verifier: Any,  # rollout.client.RewardClient
        encoder: Any,  # models.ChatEncoder
        images: ImageLoader,
        reward: RewardConfig,
        storage: Storage,
        max_tokens: int,
        seed: int,
    ) -> None:
        self.config = config
        self.sets = sets
        self.skipped = skipped
        self.rollouts = rollouts
        self.verifier = verifier
        self.encoder = encoder
        self.images = images
        self.reward = reward
        self.storage = storage
        self.max_tokens = max_tokens
        self.seed = seed

    def evaluate(
        self, step: int, measured: str, checkpoint: str | None
    ) -> tuple[dict[str, EvaluationResult], float]:
        """Measure the engines' current weights; write and return the results."""
        started = time.monotonic()
        results = self._measure(step)
        seconds = time.monotonic() - started
        rows = {name: len(rows) for name, rows in self.sets.items()}
        body = document(
            step, measured, checkpoint, self.config, results, rows, self.skipped, seconds
        )
        self.storage.put_bytes(result_key(step), json.dumps(body, indent=1).encode())
        logger.info("evaluation at step %d (%.1fs): %s", step, seconds, tracker_metrics(results))
        return results, seconds

    def _measure(self, step: int) -> dict[str, EvaluationResult]:
        from lmmr1_trainer.data import decode_images
        from lmmr1_trainer.experience import truncate_at

        names = list(self.sets)
        rows = [row for name in names for row in self.sets[name]]
        n = self.config.samples_per_prompt
        sampling = SamplingParams(
            n=n,
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            max_tokens=self.max_tokens,
            seed=self.seed,
        )
        generated, _ = self.rollouts.generate(
            [self.images.inline(r.messages) for r in rows], sampling
        )
        forbidden = set(self.encoder.vision_token_ids)
        queries: list[str] = []
        prompts: list[str] = []
        labels: list[str] = []
        lengths: list[int] = []
        for row, result in zip(rows, generated, strict=True):
            encoded = self.encoder.encode(row.messages, decode_images(row.messages, self.images))
            prompt_ids = encoded["input_ids"][0].tolist()
            prompt_text = self.encoder.prompt_text(row.messages)
            for sample in result.samples:
                response = truncate_at(sample.token_ids, forbidden)
                queries.append(self.encoder.decode(prompt_ids + response))
                prompts.append(prompt_text)
                labels.append(row.label)
                lengths.append(len(response))
        scores = self.verifier.score(queries, prompts, labels)
        accuracy = [a / self.reward.accuracy_weight for a in scores["acc_rewards"]]
        formatted = [f > 0 for f in scores["format_rewards"]]
        results: dict[str, EvaluationResult] = {}
        at = 0
        for name in names:
            per_prompt = []
            for _ in self.sets[name]:
                span = slice(at, at + n)
                per_prompt.append(PromptScores(accuracy[span], formatted[span], lengths[span]))
                at += n
            results[name] = summarise(step, per_prompt, n, self.reward.format_weight > 0)
        return results
