"""The demo's summary prints each stage's held-out results: baseline, final, gain."""

from __future__ import annotations

from lmmr1_testbed.demo.__main__ import evaluation_table


def test_the_table_has_a_row_per_set_with_baseline_final_and_gain() -> None:
    record = {
        "name": "fre",
        "evaluation": [
            {
                "dataset": "arithmetic",
                "baseline": {"step": 0, "accuracy": 0.125},
                "latest": {"step": 24, "accuracy": 0.5},
                "final": {"step": 24, "accuracy": 0.5},
                "gain": 0.375,
            },
            {"dataset": "late", "latest": {"step": 8, "accuracy": 0.25}},
        ],
    }
    header, first, second = evaluation_table(record)
    assert header.split() == ["held-out", "set", "baseline", "final", "gain"]
    assert first.split() == [
        "arithmetic",
        "0.125",
        "(step",
        "0)",
        "0.500",
        "(step",
        "24)",
        "+0.375",
    ]
    # No baseline (beforeTraining false), not finished: the latest result, no gain.
    assert second.split() == ["late", "-", "0.250", "(step", "8)", "-"]
    assert evaluation_table({"name": "mgt"}) == []
