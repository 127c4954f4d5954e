"""`python -m lmmr1_trainer.launch`: torchrun that keeps a rank's configuration error (exit
78 and its message) instead of turning it into exit 1. Here its decisions and the ranks'
reports; tests/integration/test_trainer_torchrun_exit.py runs it with real torchrun ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmmr1_trainer.config import EXIT_CONFIG_ERROR
from lmmr1_trainer.launch import (
    EXIT_DIR_ENV,
    TERMINATION_LOG_ENV,
    RankExit,
    config_error,
    outcome,
    reported,
)


def test_the_launchers_decision() -> None:
    """Pure: what the launcher exits with, given torchrun's status and the ranks' reports."""
    config = RankExit(2, EXIT_CONFIG_ERROR, "algorithm.train_batch_size: not a multiple")
    assert outcome(0, {}, [config]) == (0, "")  # torchrun succeeded: nothing failed
    assert outcome(1, {0: -15, 2: 78}, [config]) == (
        78,
        "rank 2: algorithm.train_batch_size: not a multiple",
    )
    assert outcome(1, {1: 78, 0: -15}, []) == (
        78,
        "rank 1 exited 78 (configuration error); see its log",
    )
    assert outcome(1, {0: 1}, []) == (1, "")
    assert outcome(143, {}, []) == (143, "")  # SIGTERM: the pod is going away


def test_a_rank_reports_to_the_launcher_else_to_the_termination_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(log))
    monkeypatch.delenv(EXIT_DIR_ENV, raising=False)
    assert config_error("rollout config: no such model") == EXIT_CONFIG_ERROR
    assert log.read_text() == "rollout config: no such model"
    log.write_text("")
    exits = tmp_path / "exits"
    exits.mkdir()
    monkeypatch.setenv(EXIT_DIR_ENV, str(exits))
    for rank in (3, 1):
        monkeypatch.setenv("RANK", str(rank))
        config_error(f"bad on {rank}")
    assert reported(exits) == [
        RankExit(1, EXIT_CONFIG_ERROR, "bad on 1"),
        RankExit(3, EXIT_CONFIG_ERROR, "bad on 3"),
    ]
    assert log.read_text() == ""  # the launcher writes it once every rank has stopped


def test_outside_a_pod_nothing_appears_in_dev(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmmr1_trainer.launch import termination_log, write_termination_message

    monkeypatch.delenv(TERMINATION_LOG_ENV, raising=False)
    if termination_log().exists():
        pytest.skip("running in a container with a termination log")
    assert write_termination_message("x") is False
    assert not termination_log().exists()
