"""The `sokoban` verifier gives LMM-R1's numbers on generated levels and random answers.

The reference: TideDra/lmm-r1, `openrlhf/models/remote_rm/sokoban_verifier.py`, which loads a
level saved from gym-sokoban's `room_state` (codes: 0 wall, 1 floor, 2 target, 3 box on
target, 4 box, 5 player) into gym-sokoban's `SokobanEnv` and replays the answer. Below,
`reference_*` re-express its rules on those grid codes with nothing of ours: the response
cut from the query, the format's counts and action words, the action, thinking and
repetition terms, and gym-sokoban's `step` (push, move, the reward's running count of boxes
on targets, the 50-action replay that stops at a win). The level is given to them as the
grid the reference would have saved, so the two implementations share no code, and they
must agree on every case: the verifier's chat-templated queries end to end, through the
engine, with the default (`lmm-r1`) profile.
"""

from __future__ import annotations

import random
import re

import pytest

from lmmr1_trainer.tasks.sokoban.generate import LevelSpec, generate_level
from lmmr1_trainer.verifier.config import VerifierConfig
from lmmr1_trainer.verifier.engine import Verifier

# -- the reference's rules, re-expressed -------------------------------------------------------

_CODES = {"#": 0, " ": 1, ".": 2, "*": 3, "$": 4, "@": 5}
_MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def reference_response(query: str) -> str:
    found = re.search(r"<\|im_start\|>assistant\n", query)
    if found is None:
        return query
    response = query[found.end() :]
    for token in ("<|im_end|>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|endoftext|>"):
        response = response.replace(token, "")
    return response.strip() or query


def reference_format(content: str) -> bool:
    counts = [content.count(t) for t in ("</think>", "</answer>", "<think>", "<answer>")]
    try:
        items = content.split("<answer>")[1].split("</answer>")[0].split(",")
        all_actions = all(i.strip().lower() in _MOVES for i in items)
    except IndexError:
        all_actions = False
    return counts == [1, 1, 1, 1] and all_actions


def reference_repeats(text: str, n: int, max_k: int) -> bool:
    words = re.findall(r"\b\w[\w']*\b", text.lower())
    for k in range(1, max_k + 1):
        seen: dict[tuple[str, ...], tuple[int, int]] = {}
        for i in range(k - 1, len(words)):
            s = i - k + 1
            gram = tuple(words[s : s + k])
            count = seen[gram][1] + 1 if gram in seen and seen[gram][0] == s - k else 1
            seen[gram] = (s, count)
            if count > n:
                return True
    return False


class ReferenceEnv:
    """gym-sokoban's SokobanEnv as the reference's DirectLoadSokobanEnv sets it up."""

    def __init__(self, grid: list[list[int]]) -> None:
        self.state = [row[:] for row in grid]
        self.fixed = [[1 if v in (4, 5) else v for v in row] for row in grid]
        self.player = next(
            (r, c) for r, row in enumerate(grid) for c, v in enumerate(row) if v == 5
        )
        self.num_boxes = sum(row.count(4) for row in grid)
        self.on_target = 0

    def _uncovered_targets(self) -> int:
        return sum(
            1
            for r, row in enumerate(self.state)
            for c, v in enumerate(row)
            if v == 2 or (v == 5 and self.fixed[r][c] == 2)
        )

    def step(self, action: str) -> tuple[float, bool]:
        dr, dc = _MOVES[action]
        (r, c) = self.player
        nr, nc = r + dr, c + dc
        br, bc = nr + dr, nc + dc
        inside = br < len(self.state) and bc < len(self.state[0])
        if inside and self.state[nr][nc] in (3, 4) and self.state[br][bc] in (1, 2):
            self.state[br][bc] = 3 if self.fixed[br][bc] == 2 else 4
            self._walk(nr, nc)
        elif inside and self.state[nr][nc] in (1, 2):
            self._walk(nr, nc)
        reward = -0.1
        boxes_on_target = self.num_boxes - self._uncovered_targets()
        if boxes_on_target > self.on_target:
            reward += 1
        elif boxes_on_target < self.on_target:
            reward += -1
        won = self._uncovered_targets() == 0
        if won:
            reward += 10
        self.on_target = boxes_on_target
        return reward, won

    def _walk(self, nr: int, nc: int) -> None:
        r, c = self.player
        self.state[nr][nc] = 5
        self.state[r][c] = self.fixed[r][c]
        self.player = (nr, nc)


def reference_reward(query: str, grid: list[list[int]]) -> float:
    response = reference_response(query)
    if not reference_format(response):
        return 0.0
    acts_text = response.split("<answer>")[1].split("</answer>")[0].strip()
    acts = [a.strip().lower() for a in acts_text.split(",")]
    action_term = len(acts) * 0.05 if len(acts) < 20 else 1.0 - ((len(acts) - 20) / 30) ** 2 * 0.2
    thinking = response.split("<think>")[1].split("</think>")[0].strip()
    words = [w for w in thinking.split(" ") if len(w) > 1]
    thinking_term = min(len(words), 200) * 0.001
    if reference_repeats(acts_text, 7, 5):
        action_term = min(0, action_term - 0.2)
    env = ReferenceEnv(grid)
    total = best = 0.0
    for act in acts[:50]:
        reward, won = env.step(act)
        total += reward
        best = max(best, total)
        if won or reward > 3:
            break
    return best + 0.5 + action_term + thinking_term


# -- random cases ----------------------------------------------------------------------------

_WORDS = ["Left", "Right", "Up", "Down", "left", " UP ", "down "]


def _answer(rng: random.Random, solution: list[str]) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        actions = solution + rng.choices(_WORDS, k=rng.randrange(4))
    elif kind == 1:
        actions = rng.choices(_WORDS, k=rng.randrange(1, 70))
    elif kind == 2:
        actions = [rng.choice(_WORDS)] * rng.randrange(1, 12)
    elif kind == 3:
        actions = rng.choices(_WORDS, k=rng.randrange(1, 4)) * rng.randrange(1, 12)
    elif kind == 4:
        actions = solution[: rng.randrange(len(solution) + 1)] or ["Up"]
    else:
        actions = rng.choices([*_WORDS, "Jump", "", "up down"], k=rng.randrange(1, 8))
    thinking = " ".join(
        rng.choices(["a", "box", "push", "up", " ", "the\nwall"], k=rng.randrange(300))
    )
    text = (
        f"<think>{thinking}</think><answer>{(',' + rng.choice(['', ' '])).join(actions)}</answer>"
    )
    if rng.random() < 0.1:
        text = rng.choice([text.replace("</think>", ""), text + "<answer>", " " + text + "\n"])
    return text


def _cases(count: int, seed: int) -> list[tuple[str, str, list[list[int]]]]:
    rng = random.Random(seed)
    cases = []
    for index in range(count):
        generated = generate_level(rng, LevelSpec(boxes=2 + index % 2))
        label = generated.level.to_text()
        grid = [[_CODES[ch] for ch in row] for row in label.split("\n")]
        solution = [move.word for move in generated.solution]
        query = (
            "<|im_start|>system\nplay<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
            "<|vision_end|>go<|im_end|>\n<|im_start|>assistant\n"
            + _answer(rng, solution)
            + "<|im_end|>"
        )
        cases.append((query, label, grid))
    return cases


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rewards_match_the_reference_on_generated_levels(seed: int) -> None:
    verifier = Verifier(
        VerifierConfig.model_validate(
            {"pool": {"workers": 0}, "accuracy": {"default_task": "sokoban"}}
        )
    )
    cases = _cases(150, seed)
    results = verifier.score(
        verifier.samples_from_queries([c[0] for c in cases], [c[1] for c in cases])
    )
    expected = [reference_reward(query, grid) for query, _, grid in cases]
    got = [r.reward for r in results]
    assert got == pytest.approx(expected, abs=1e-9)
    # The cases reach every part of the reward: wins, malformed answers, penalised repeats.
    assert any(r > 10 for r in expected) and any(r == 0.0 for r in expected)
    responses = [reference_response(query) for query, _, _ in cases]
    penalised = [
        reference_format(r) and reference_repeats(r.split("<answer>")[1], 7, 5) for r in responses
    ]
    assert any(penalised) and not all(penalised)
