"""What goes to the trackers: the step record's numbers under grouped names, and the rows of
the sampled-responses table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Fields of the step record that are bookkeeping, not measurements.
_NOT_METRICS = frozenset({"step", "total_steps", "rows", "weight_version"})
SAMPLE_COLUMNS = ("step", "prompt", "response", "reward", "accuracy")
# A table cell is for reading, not for the whole context: long prompts are cut.
MAX_CELL_CHARS = 2000


@dataclass(frozen=True)
class Sample:
    prompt: str
    response: str
    reward: float
    accuracy: float


def step_metrics(record: dict[str, Any], accuracy_weight: float | None = None) -> dict[str, float]:
    """The step record's numbers: phase timings (`*seconds`) as `time/<name>`, the rest as
    `train/<name>`. With the reward's `accuracy_weight`, the accuracy part of the reward
    (`train/accuracy_reward`) beside its format part (`train/format_reward`)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        group = "time" if key.endswith("seconds") else "train"
        out[f"{group}/{key}"] = float(value)
    accuracy = record.get("accuracy")
    if accuracy_weight is not None and isinstance(accuracy, int | float):
        out["train/accuracy_reward"] = float(accuracy) * accuracy_weight
    return out


def evaluation_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """`{dataset: {metric: value}}` as `eval/<dataset>/<metric>`."""
    return {
        f"eval/{dataset}/{metric}": float(value)
        for dataset, metrics in results.items()
        for metric, value in metrics.items()
    }


def _cell(text: str) -> str:
    return text if len(text) <= MAX_CELL_CHARS else text[: MAX_CELL_CHARS - 1] + "…"


def sample_rows(step: int, samples: Sequence[Sample]) -> list[list[Any]]:
    """The table's rows, in SAMPLE_COLUMNS order."""
    return [
        [step, _cell(s.prompt), _cell(s.response), round(s.reward, 4), round(s.accuracy, 4)]
        for s in samples
    ]


def rollout_samples(
    encoder: Any, rows: Sequence[Any], samples: Sequence[Any], limit: int
) -> list[Sample]:
    """Up to `limit` of a step's samples, spread over its prompts, as text. `rows` are the
    step's `PromptRow`s, `samples` its `ScoredSample`s (each row's samples in a run) and
    `encoder` the `ChatEncoder`; only the chosen ones are decoded."""
    if not samples or not rows:
        return []
    per_row = max(1, len(samples) // len(rows))
    stride = max(1, len(samples) // limit)
    chosen = list(range(0, len(samples), stride))[:limit]
    return [
        Sample(
            prompt=encoder.prompt_text(rows[min(i // per_row, len(rows) - 1)].messages),
            response=encoder.decode(samples[i].response),
            reward=float(samples[i].reward),
            accuracy=float(samples[i].accuracy),
        )
        for i in chosen
    ]
