"""Waits on other processes end the attempt instead of hanging it: `deadline.within`, the
HTTP weight push against a real rollout server that never finishes loading, and the
trainer's exit (1, the reason in the termination message) past a thread stuck for good."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tests.scripted_rollout import TOKEN, ScriptedBackend, serving

from lmmr1_trainer.deadline import AttemptFailed, within
from lmmr1_trainer.launch import TERMINATION_LOG_ENV
from lmmr1_trainer.rollout.client import RolloutClient
from lmmr1_trainer.rollout.protocol import Sample
from lmmr1_trainer.weight_sync import WEIGHT_SYNC_TIMEOUT, HttpWeightSync


def test_within_returns_raises_and_times_out() -> None:
    assert within(5, "Slow", "adding", lambda: 1 + 1) == 2
    with pytest.raises(KeyError, match="missing"):
        within(5, "Slow", "looking up", lambda: {}["missing"])
    release = threading.Event()  # set only after the deadline has passed
    with pytest.raises(AttemptFailed) as err:
        within(0.2, "Slow", "waiting", release.wait)
    assert (err.value.reason, str(err.value)) == (
        "Slow",
        "Slow: waiting did not finish within 0.2 s",
    )
    release.set()


@dataclass
class StuckLoading(ScriptedBackend):
    """A rollout server whose engine never finishes taking new weights until released."""

    release: threading.Event = field(default_factory=threading.Event)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> int:
        self.release.wait()
        return len(tensors)


def test_a_weight_push_that_never_finishes_fails_the_attempt() -> None:
    backend = StuckLoading(lambda chat, k, seed: Sample(text="", token_ids=[1], logprobs=[0.0]))
    with serving(backend) as servers:
        client = RolloutClient([s.url for s in servers], TOKEN)  # its own timeout: 30 min
        sync = HttpWeightSync(client, timeout_s=0.5)
        weights = {"w": torch.ones(4)}
        with ThreadPoolExecutor(1) as pool:  # the guard: a hang fails here, not the session
            pushed = pool.submit(sync.push, weights, 3)
            with pytest.raises(AttemptFailed) as err:
                pushed.result(timeout=30)
        assert err.value.reason == WEIGHT_SYNC_TIMEOUT
        assert str(err.value) == (
            f"{WEIGHT_SYNC_TIMEOUT}: pushing weights v3 to 1 rollout server(s) "
            "did not finish within 0.5 s"
        )
        backend.release.set()  # the server recovers: the next push goes through
        HttpWeightSync(client, timeout_s=30).push(weights, version=4)
        assert servers[0].weight_version == 4


STUCK_TRAINER = """
import threading
from lmmr1_trainer import train
from lmmr1_trainer.deadline import AttemptFailed

def run(self):
    # A thread stuck for good (as in an NCCL call whose peer died): not a daemon, so a
    # normal interpreter exit would wait for it forever.
    threading.Thread(target=threading.Event().wait).start()
    raise AttemptFailed("WeightSyncTimeout", "broadcasting weights v2 did not finish within 1 s")

train.StageTrainer.run = run
raise SystemExit(train.main(["--config", {config!r}]))
"""


def test_the_trainer_exits_1_with_the_reason_past_a_stuck_thread(tmp_path: Path) -> None:
    config = tmp_path / "stage.yaml"
    config.write_text(
        textwrap.dedent("""\
            run: {namespace: ns, name: r, stage: fre, stage_index: 0}
            init_from: /nonexistent/model
            dataset: {uri: /nonexistent/train.jsonl, type: text}
            reward: {url: "http://127.0.0.1:1"}
            trainer: {gpus_per_node: 0}
            checkpoint: {uri: /nonexistent/ckpt}
            progress: {configmap: c, namespace: ns}
        """)
    )
    log = tmp_path / "termination-log"
    log.write_text("")
    script = STUCK_TRAINER.format(config=str(config))
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, TERMINATION_LOG_ENV: str(log)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert log.read_text() == (
        "WeightSyncTimeout: broadcasting weights v2 did not finish within 1 s"
    )
    assert "this attempt fails: WeightSyncTimeout" in result.stderr
