"""`make test` runs the unit tests first, then integration, then end to end, then the tests
against Kueue and JobSet (marked `batch`), and marks everything under integration/ and e2e/
as `integration`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import pytest_collection_modifyitems

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakeItem:
    fspath: Path
    markers: list[str] = field(default_factory=list)

    def add_marker(self, marker: Any) -> None:
        self.markers.append(marker.name)

    def get_closest_marker(self, name: str) -> str | None:
        return name if name in self.markers else None


def test_unit_tests_run_first_then_integration_then_e2e() -> None:
    # pytest collects directories alphabetically: e2e, integration, unit.
    names = [
        "e2e/test_two_stage_run.py",
        "integration/test_chart.py",
        "integration/test_operator_gang_admission.py",
        "integration/test_trainer_stage.py",
        "unit/test_api_models.py",
        "unit/test_trainer_data.py",
        "unit/test_api_models.py",
    ]
    items = [FakeItem(ROOT / name) for name in names]
    items[2].markers.append("batch")  # as its `pytestmark` does
    pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    assert [str(i.fspath.relative_to(ROOT)) for i in items] == [
        "unit/test_api_models.py",
        "unit/test_trainer_data.py",
        "unit/test_api_models.py",  # the order within a part is kept
        "integration/test_chart.py",
        "integration/test_trainer_stage.py",
        "e2e/test_two_stage_run.py",
        # Last: on a cold machine Kueue and JobSet build while everything else runs.
        "integration/test_operator_gang_admission.py",
    ]
    assert [bool(i.markers) for i in items] == [False] * 3 + [True] * 4
    assert all("integration" in m for m in (i.markers for i in items[3:]))
