"""The verifier as a library: samples in, weighted rewards out.

`Verifier` wires the pieces: response extraction (templates), the format reward (here, cheap),
task routing, the accuracy verifiers (in the worker pool, or inline when `pool.workers` is 0)
and the weighting/policy (rewards). The HTTP server is a thin layer over `Verifier.score`.

Inline mode runs math-verify in the calling thread: its own timeouts work only in the main
thread and nothing bounds the wall-clock time, so use it for tests and tools, not the service.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from lmmr1_trainer.verifier.choice import is_single_choice_label
from lmmr1_trainer.verifier.config import AnswerSource, PromptTemplate, VerifierConfig
from lmmr1_trainer.verifier.format import answer_block
from lmmr1_trainer.verifier.pool import VerifierPool
from lmmr1_trainer.verifier.rewards import (
    AUTO_TASK,
    AccuracyOutcome,
    AccuracyRequest,
    AccuracyReward,
    AccuracyStatus,
    FormatReward,
    SampleResult,
    UnknownTaskError,
    combine,
    get_verifier,
    load_verifiers,
    run_verification,
    verifier_traits,
)
from lmmr1_trainer.verifier.templates import ExtractedResponse, extract_response

NO_RESPONSE_MARKER = "no_response_marker"


@dataclass(frozen=True)
class Sample:
    """One response to score. `task` None means the configured default task."""

    response: str
    label: str | None
    task: str | None = None
    marker_found: bool = True


class Verifier:
    """Scores batches of samples; thread-safe once started."""

    def __init__(
        self, config: VerifierConfig, on_restart: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        load_verifiers(config.plugins)
        self.default_task = config.accuracy.default_task
        self.check_task(self.default_task)
        self.format_reward = FormatReward(
            config.weights.format,
            config.format.rule,
            config.format.allow_whitespace_between_blocks,
        )
        self.accuracy_reward = AccuracyReward(
            config.weights.accuracy, config.unparseable_label_policy
        )
        self.pool: VerifierPool | None = None
        if config.pool.workers > 0:
            self.pool = VerifierPool(
                config.pool.workers,
                config.accuracy,
                plugins=config.plugins,
                memory_mb=config.pool.worker_memory_mb,
                start_timeout_s=config.pool.start_timeout_s,
                on_restart=on_restart,
            )

    def start(self) -> Verifier:
        if self.pool is not None:
            self.pool.start()
        return self

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> Verifier:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def workers_alive(self) -> int:
        return self.pool.alive() if self.pool is not None else 0

    @staticmethod
    def check_task(task: str) -> None:
        """Raise UnknownTaskError unless `task` is `auto` or a registered verifier."""
        if task != AUTO_TASK:
            get_verifier(task)

    def resolve_task(self, task: str | None, label: str | None) -> str:
        chosen = task or self.default_task
        if chosen != AUTO_TASK:
            return chosen
        return "choice" if is_single_choice_label(label) else "math"

    def extract(self, query: str, template: PromptTemplate | None = None) -> ExtractedResponse:
        """The response in a chat-templated query, the profile's way (`response_extraction`)."""
        chosen = template or self.config.prompt_template
        return extract_response(query, chosen, self.config.response_extraction)

    def samples_from_queries(
        self, queries: Sequence[str], labels: Sequence[str | None]
    ) -> list[Sample]:
        """`/get_reward` input: find each response in its chat-templated query."""
        samples = []
        for query, label in zip(queries, labels, strict=True):
            extracted = self.extract(query)
            samples.append(Sample(extracted.text, label, marker_found=extracted.marker_found))
        return samples

    def _accuracy_request(self, sample: Sample, task: str) -> AccuracyRequest:
        reads_answer_block = self.config.accuracy.answer_source is AnswerSource.ANSWER_BLOCK
        if reads_answer_block and not verifier_traits(task).owns_format:
            block = answer_block(sample.response)
            if block is not None:
                return AccuracyRequest(task, block, sample.label, from_answer_block=True)
        return AccuracyRequest(task, sample.response, sample.label, from_answer_block=False)

    def score(self, samples: Sequence[Sample]) -> list[SampleResult]:
        """Rewards for every sample, in order; a bad sample scores 0 and is flagged."""
        limits = self.config.limits
        outcomes: list[AccuracyOutcome | None] = [None] * len(samples)
        tasks: list[str] = []
        unique: dict[AccuracyRequest, list[int]] = {}
        for index, sample in enumerate(samples):
            task = self.resolve_task(sample.task, sample.label)
            tasks.append(task)
            if len(sample.response) > limits.max_response_chars:
                outcomes[index] = AccuracyOutcome(
                    0.0,
                    AccuracyStatus.RESPONSE_TOO_LONG,
                    detail=f"over {limits.max_response_chars} characters",
                )
                continue
            try:
                self.check_task(task)
            except UnknownTaskError as exc:
                outcomes[index] = AccuracyOutcome(0.0, AccuracyStatus.ERROR, detail=str(exc))
                continue
            # Samples of one prompt often give the same answer: verify it once.
            unique.setdefault(self._accuracy_request(sample, task), []).append(index)
        requests = list(unique)
        if self.pool is not None:
            computed = self.pool.run(requests, limits.sample_timeout_s, limits.request_deadline_s)
        else:
            computed = [run_verification(request, self.config.accuracy) for request in requests]
        for request, outcome in zip(requests, computed, strict=True):
            for index in unique[request]:
                outcomes[index] = outcome
        results = []
        for sample, task, maybe_outcome in zip(samples, tasks, outcomes, strict=True):
            assert maybe_outcome is not None
            too_long = maybe_outcome.status is AccuracyStatus.RESPONSE_TOO_LONG
            if too_long:
                format_raw = 0.0
            elif verifier_traits(task).owns_format:  # its own rule; 0 on a timeout or error
                format_raw = maybe_outcome.format_score or 0.0
            else:
                format_raw = self.format_reward.score(sample.response)
            flags = () if sample.marker_found else (NO_RESPONSE_MARKER,)
            results.append(
                combine(
                    self.format_reward, self.accuracy_reward, format_raw, maybe_outcome, task, flags
                )
            )
        return results
