"""The `sokoban` verifier: LMM-R1's Sokoban reward (its `sokoban_verifier.py`), rule for rule.

The label is the level in XSB text (`lmmr1_trainer.tasks.sokoban.level`); the response is
the model's text as extracted from the query. With the default weights (format 0.5,
accuracy 1.0) the reward is the reference's number:

- **format** (score 1 or 0, weighted 0.5): `<think>`, `</think>`, `<answer>` and
  `</answer>` each occur exactly once, and every comma-separated item of the answer (the text
  after `<answer>` up to the next `</answer>`, or to the end), stripped and lower-cased, is
  `left`, `right`, `up` or `down`. Order and surrounding text are not checked (as in the
  reference); an empty answer is one empty item, so it fails.
- **task reward** (the accuracy score, weighted 1.0), only when the format holds; else 0:
  - *environment*: the first 50 actions are played from the level's start (gym-sokoban's
    rules, `tasks.sokoban.game`) until the level is solved; the highest running total of the
    step rewards, and 0 if it never rises above 0;
  - *actions*: n actions (all of them, not only the 50 played) earn 0.05 each below 20,
    else `1.0 - ((n - 20) / 30) ** 2 * 0.2` (it turns negative past 87 actions);
  - *repetition*: a k-gram of actions (k = 1…5) repeated back to back more than 7 times
    (8 `Up` in a row, 8 `Up, Down` pairs…) turns the action term into `min(0, term - 0.2)`;
  - *thinking*: 0.001 per word of the thinking (the text after `<think>` up to `</think>`,
    stripped, split on single spaces, words of 2 characters or more), at most 200 words.

Differences from the reference: the level comes from the label, not from looking the
prompt up in the dataset (with a Levenshtein fallback); responses over
`limits.max_response_chars` score 0 (the service's limit for every task).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmmr1_trainer.tasks.sokoban.game import Direction, Game
from lmmr1_trainer.tasks.sokoban.level import Level, LevelError
from lmmr1_trainer.verifier.config import AccuracySettings
from lmmr1_trainer.verifier.rewards import (
    AccuracyOutcome,
    AccuracyRequest,
    AccuracyStatus,
    register_verifier,
)

TASK = "sokoban"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
ACTION_WORDS = frozenset(direction.value for direction in Direction)
MAX_REPLAYED_ACTIONS = 50
ACTION_REWARD = 0.05
ACTIONS_REWARDED = 20
ACTION_OVERSHOOT_SCALE = 30
ACTION_OVERSHOOT_WEIGHT = 0.2
THINKING_WORD_REWARD = 0.001
THINKING_WORDS_REWARDED = 200
REPETITION_PENALTY = 0.2
MAX_BACK_TO_BACK = 7  # a k-gram may follow itself this often
LONGEST_REPEATED_GRAM = 5
_PREVIEW_CHARS = 200


def block(text: str, open_tag: str, close_tag: str) -> str | None:
    """The text after the first `open_tag` up to the next `close_tag` (or to the end)."""
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    return text[start:] if end < 0 else text[start:end]


def answer_actions(response: str) -> list[str] | None:
    """The answer's comma-separated items, stripped and lower-cased; None without `<answer>`."""
    answer = block(response, ANSWER_OPEN, ANSWER_CLOSE)
    if answer is None:
        return None
    return [item.strip().lower() for item in answer.split(",")]


def well_formed(response: str) -> bool:
    """Each of the four tags once, and an answer made only of the four action words."""
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    if any(response.count(tag) != 1 for tag in tags):
        return False
    actions = answer_actions(response)
    return actions is not None and all(action in ACTION_WORDS for action in actions)


def has_back_to_back_repeats(
    words: list[str], max_repeats: int = MAX_BACK_TO_BACK, longest: int = LONGEST_REPEATED_GRAM
) -> bool:
    """True when some k-gram (k ≤ `longest`) occurs more than `max_repeats` times in a row.

    An occurrence extends a run only when the previous occurrence of the same k-gram starts
    exactly k words earlier; an overlapping occurrence in between starts the run again (so
    `up up up …` repeats the 1-gram `up`, not the 2-gram `up up`), as in the reference.
    """
    for k in range(1, longest + 1):
        last: dict[tuple[str, ...], tuple[int, int]] = {}  # gram -> (start, run length)
        for start in range(len(words) - k + 1):
            gram = tuple(words[start : start + k])
            previous = last.get(gram)
            run = previous[1] + 1 if previous is not None and previous[0] == start - k else 1
            if run > max_repeats:
                return True
            last[gram] = (start, run)
    return False


def action_term(count: int, repeated: bool) -> float:
    """The reward for answering `count` actions (see the module docstring)."""
    if count < ACTIONS_REWARDED:
        term = count * ACTION_REWARD
    else:
        overshoot = (count - ACTIONS_REWARDED) / ACTION_OVERSHOOT_SCALE
        term = ACTIONS_REWARDED * ACTION_REWARD - overshoot**2 * ACTION_OVERSHOOT_WEIGHT
    if repeated:
        term = min(0.0, term - REPETITION_PENALTY)
    return term


def thinking_words(response: str) -> int:
    thinking = block(response, THINK_OPEN, THINK_CLOSE) or ""
    return sum(1 for word in thinking.strip().split(" ") if len(word) > 1)


def thinking_term(words: int) -> float:
    return min(words, THINKING_WORDS_REWARDED) * THINKING_WORD_REWARD


@dataclass(frozen=True)
class Replay:
    best_return: float  # the highest running total of step rewards, at least 0
    played: int
    solved: bool


def replay(level: Level, actions: list[Direction]) -> Replay:
    """Play at most `MAX_REPLAYED_ACTIONS` actions; stop once the level is solved."""
    game = Game(level)
    total = best = 0.0
    played = 0
    for action in actions[:MAX_REPLAYED_ACTIONS]:
        total += game.step(action)
        played += 1
        best = max(best, total)
        if game.solved:
            break
    return Replay(best, played, game.solved)


@dataclass(frozen=True)
class SokobanScore:
    well_formed: bool
    actions: int = 0
    environment: float = 0.0
    action_term: float = 0.0
    thinking_words: int = 0
    thinking_term: float = 0.0
    played: int = 0
    solved: bool = False

    @property
    def task_reward(self) -> float:
        """The reward beside the format's: 0 unless the response is well formed."""
        if not self.well_formed:
            return 0.0
        return self.environment + self.action_term + self.thinking_term


def score_response(response: str, level: Level) -> SokobanScore:
    """Every part of the reward for one response on one level."""
    if not well_formed(response):
        return SokobanScore(well_formed=False)
    words = answer_actions(response)
    assert words is not None  # well formed
    actions = [Direction(word) for word in words]
    played = replay(level, actions)
    thinking = thinking_words(response)
    return SokobanScore(
        well_formed=True,
        actions=len(actions),
        environment=played.best_return,
        action_term=action_term(len(actions), has_back_to_back_repeats(words)),
        thinking_words=thinking,
        thinking_term=thinking_term(thinking),
        played=played.played,
        solved=played.solved,
    )


@register_verifier(TASK, owns_format=True, bounded=False)
def sokoban_reward(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """The format score and the task reward of one response (see the module docstring)."""
    format_score = 1.0 if well_formed(request.text) else 0.0
    try:
        level = Level.parse(request.label or "")
    except LevelError as exc:
        detail = f"the label is not a Sokoban level: {exc}"
        return AccuracyOutcome(
            0.0, AccuracyStatus.LABEL_UNPARSEABLE, detail=detail, format_score=format_score
        )
    score = score_response(request.text, level)
    if not score.well_formed:
        return AccuracyOutcome(0.0, AccuracyStatus.NO_ANSWER, format_score=0.0)
    words = answer_actions(request.text) or []
    detail = (
        f"environment {score.environment:.2f} ({score.played} played, solved: {score.solved}), "
        f"{score.actions} actions {score.action_term:+.3f}, "
        f"{score.thinking_words} thinking words {score.thinking_term:+.3f}"
    )
    return AccuracyOutcome(
        score.task_reward,
        AccuracyStatus.OK,
        extracted=", ".join(words)[:_PREVIEW_CHARS],
        detail=detail,
        format_score=1.0,
    )
