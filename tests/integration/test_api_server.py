"""The LMMR1Run API as the real API server serves it: printer columns, defaults, and the
invalid table rejected with messages that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tests.invalid_runs import IMMUTABLE, INVALID, ImmutableChange, Invalid, valid_run

from lmmr1_testbed.pytest_plugin import Cli

pytestmark = pytest.mark.usefixtures("installed_manifests")


def test_examples_apply_and_kubectl_get_prints_the_columns(
    kubectl: Cli, installed_manifests: Path
) -> None:
    examples = installed_manifests / "examples"
    for example in sorted([*examples.glob("*.yaml"), *(examples / "recipes").glob("*.yaml")]):
        kubectl("apply", "-f", str(example))
    name = yaml.safe_load((installed_manifests / "examples" / "run.yaml").read_text())["metadata"][
        "name"
    ]
    kubectl(
        "patch",
        "lmmr1run",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "status": {
                    "phase": "Running",
                    "stage": "fre",
                    "step": 12,
                    "totalSteps": 40,
                    "progress": "30%",
                    "reward": 0.75,
                    "accuracy": 0.5,
                    "restarts": 1,
                    "lastCheckpoint": "s3://b/c/fre/step-10",
                    "evalAccuracy": 0.625,
                    "evalGain": 0.125,
                }
            }
        ),
    )
    table = kubectl("get", "lmmr1runs").stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "STAGE", "STEP", "PROGRESS", "REWARD", "AGE"]
    row = next(line.split() for line in table if line.startswith(name))
    assert row[1:6] == ["Running", "fre", "12", "30%", "0.75"]
    wide = kubectl("get", "lmr", "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-6:] == [
        "TOTAL",
        "ACCURACY",
        "CHECKPOINT",
        "RESTARTS",
        "EVAL",
        "EVAL-GAIN",
    ]
    assert next(line for line in wide if line.startswith(name)).split()[-6:] == [
        "40",
        "0.5",
        "s3://b/c/fre/step-10",
        "1",
        "0.625",
        "0.125",
    ]


def test_the_api_server_fills_in_the_papers_defaults(kubectl: Cli) -> None:
    kubectl("apply", "-f", "-", stdin=json.dumps(valid_run("defaults")))
    spec = json.loads(kubectl("get", "lmr", "defaults", "-o", "json").stdout)["spec"]
    algorithm = spec["stages"][1]["algorithm"]
    assert algorithm["advantageEstimator"] == "reinforce_baseline"
    assert (algorithm["samplesPerPrompt"], algorithm["klCoef"], algorithm["learningRate"]) == (
        16,
        0.001,
        4e-7,
    )
    assert spec["stages"][0]["checkpoint"] == {"everySteps": 20, "keepLast": 3}
    assert spec["stages"][0]["reward"]["formatWeight"] == 0.5
    assert spec["backoffLimit"] == 3 and spec["suspend"] is False


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_the_api_server_rejects_the_invalid_table(kubectl: Cli, case: Invalid) -> None:
    run = case.run(f"bad-{case.id}"[:36])
    result = kubectl("apply", "-f", "-", stdin=json.dumps(run), check=False)
    assert result.returncode != 0, f"{case.id} was accepted"
    assert case.says in result.stderr, result.stderr
    assert case.field in result.stderr, result.stderr
    assert kubectl("get", "lmr", run["metadata"]["name"], check=False).returncode != 0


@pytest.mark.parametrize("case", IMMUTABLE, ids=lambda c: c.id)
def test_fields_that_must_not_change_mid_run_are_immutable(
    kubectl: Cli, case: ImmutableChange
) -> None:
    run = valid_run("immutable")
    kubectl("apply", "-f", "-", stdin=json.dumps(run))
    case.mutate(run)
    result = kubectl("apply", "-f", "-", stdin=json.dumps(run), check=False)
    assert result.returncode != 0, f"{case.id} was accepted"
    assert f"{case.field}: Invalid value" in result.stderr, result.stderr
    assert case.says in result.stderr, result.stderr
    # ...while suspend, the knob meant for running runs, can change.
    kubectl("patch", "lmr", "immutable", "--type=merge", "-p", '{"spec": {"suspend": true}}')
