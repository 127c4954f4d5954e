"""One example manifest per published LMM-R1 script (manifests/examples/recipes/): each carries
its script's values (`script_flags.SCRIPT_VALUES`, read from the scripts) and the operator
renders it into a stage's children that the trainer accepts. (The API server's half, that
each is admitted, is tests/integration/test_api_server.py.)"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml

from lmmr1_operator.api import LMMR1RunSpec, crd
from lmmr1_operator.api.reference import _walk
from lmmr1_operator.api.script_flags import SCRIPT_VALUES, SCRIPTS
from lmmr1_operator.reconcile import Observed, decide
from lmmr1_operator.settings import OperatorSettings
from lmmr1_trainer.config import StageConfig
from lmmr1_trainer.verifier.rewards import load_verifiers, registered_tasks

RECIPES = crd.REPO_ROOT / "manifests" / "examples" / "recipes"
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def manifest(script: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((RECIPES / f"{script}.yaml").read_text())
    return loaded


def lookup(tree: dict[str, Any], field: str) -> Any:
    """`spec.stages[].a.b` in a one-stage run."""
    node: Any = tree
    for part in field.removeprefix("spec.stages[].").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def test_every_script_has_exactly_one_manifest() -> None:
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(SCRIPTS)


def test_the_value_table_names_real_fields_and_every_script() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    paths = {path for path, _, _ in _walk(schema["properties"]["spec"], "spec", True)}
    assert [row.field for row in SCRIPT_VALUES if row.field not in paths] == []
    assert {len(row.values) for row in SCRIPT_VALUES} == {len(SCRIPTS)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_manifest_carries_its_scripts_values(script: str) -> None:
    run = manifest(script)
    assert len(run["metadata"]["name"]) <= crd.MAX_RUN_NAME
    spec = LMMR1RunSpec.model_validate(run["spec"])
    assert len(spec.stages) == 1, "one script, one stage"
    raw = run["spec"]["stages"][0]
    resolved = spec.stages[0].model_dump(by_alias=True, mode="json")
    column = SCRIPTS.index(script)
    wrong = []
    for row in SCRIPT_VALUES:
        expected = row.values[column]
        if expected is None:  # the script leaves it to OpenRLHF: so does the manifest
            if lookup(raw, row.field) is not None:
                wrong.append(f"{row.flag}: the script does not set it, the manifest does")
        elif lookup(resolved, row.field) != expected:
            wrong.append(
                f"{row.flag}: script {expected!r}, manifest {lookup(resolved, row.field)!r}"
            )
    assert wrong == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_operator_renders_the_manifest_into_a_stage_the_trainer_accepts(script: str) -> None:
    run = manifest(script)
    run["metadata"].update(namespace="default", uid="uid-1", generation=1)
    settings = OperatorSettings(trainer_image="trainer:1", rollout_image="rollout:1")
    plan = decide(Observed(run=run, now=NOW, token="tok", service_account="default"), settings)
    kinds = sorted({o["kind"] for o in plan.ensure + plan.replace})
    assert {"Job", "ConfigMap", "NetworkPolicy", "Service"} <= set(kinds), kinds
    job = next(o for o in plan.ensure if o["kind"] == "Job")
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "8"
    config = next(o for o in plan.replace if o["kind"] == "ConfigMap")
    stage = StageConfig.model_validate(yaml.safe_load(config["data"]["stage.yaml"]))
    spec_stage = run["spec"]["stages"][0]
    assert stage.algorithm.advantage_estimator == spec_stage["algorithm"]["advantageEstimator"]
    assert stage.algorithm.learning_rate == spec_stage["algorithm"]["learningRate"]
    assert stage.dataset.uri == spec_stage["dataset"]["uri"]
    assert stage.init_from == spec_stage.get("initFrom", run["spec"]["model"]["uri"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_verifier_a_manifest_names_is_built_into_the_image(script: str) -> None:
    """No plug-in is needed: the sidecar's `--default-task` names a built-in verifier (a
    task it does not know stops the sidecar with exit 78)."""
    run = manifest(script)
    spec = LMMR1RunSpec.model_validate(run["spec"])
    load_verifiers()
    verifier = spec.stages[0].reward.verifier
    assert verifier in registered_tasks()
    run["metadata"].update(namespace="default", uid="uid-1", generation=1)
    settings = OperatorSettings(trainer_image="trainer:1", rollout_image="rollout:1")
    plan = decide(Observed(run=run, now=NOW, token="tok", service_account="default"), settings)
    job = next(o for o in plan.ensure if o["kind"] == "Job")
    [sidecar] = job["spec"]["template"]["spec"]["initContainers"]
    command = sidecar["command"]
    assert command[command.index("--default-task") + 1] == verifier
    assert (script == "train_sokoban") == (verifier == "sokoban")
