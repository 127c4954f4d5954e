"""The test bed's run builder (lmmr1_testbed.runs) makes runs the operator's own spec model
accepts, so the benches and tests that build their runs there cannot drift from the API."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmmr1_operator.api import GROUP, KIND, VERSION, LMMR1RunSpec
from lmmr1_operator.api.spec import resolved_rollout_mode
from lmmr1_testbed import runs


def test_a_cpu_sized_run_with_separate_rollout_servers_is_a_valid_spec() -> None:
    run = runs.run(
        "sim-0",
        storage={"uri": "s3://bucket/runs", "credentialsSecret": "s3"},
        stages=runs.fre_then_mgt(
            "s3://bucket/fre.jsonl",
            "s3://bucket/mgt.jsonl",
            resources=runs.CPU_SEPARATE_ROLLOUT,
            checkpoint={"everySteps": 2, "keepLast": 2},
        ),
        backoffLimit=2,
        activeDeadlineSeconds=60,
    )
    assert (run["apiVersion"], run["kind"]) == (f"{GROUP}/{VERSION}", KIND)
    spec = LMMR1RunSpec.model_validate(run["spec"])
    assert spec.model.uri == runs.MODEL_URI
    assert [(s.name, s.type) for s in spec.stages] == [("fre", "text"), ("mgt", "multimodal")]
    for stage in spec.stages:
        assert resolved_rollout_mode(stage.resources) == "separate"
        assert stage.resources.trainer.gpus_per_node == 0
        assert stage.resources.rollout.gpus_per_replica == 0
        assert stage.checkpoint.every_steps == 2
    assert (spec.backoff_limit, spec.active_deadline_seconds) == (2, 60)


def test_a_stage_with_its_own_fields_is_a_valid_spec() -> None:
    """The integration tests' shape: GPU stages, each with its own resources and algorithm."""
    gpus = {"trainer": {"gpusPerNode": 4}, "rollout": {"replicas": 1, "gpusPerReplica": 1}}
    algorithm = {"learningRate": 1e-6}
    stage = runs.stage("mgt", "multimodal", "s3://d/mgt.jsonl", resources=gpus, algorithm=algorithm)
    spec = LMMR1RunSpec.model_validate(
        runs.run("r", storage={"uri": "s3://b/runs"}, stages=[stage])["spec"]
    )
    assert spec.stages[0].algorithm.learning_rate == 1e-6
    assert resolved_rollout_mode(spec.stages[0].resources) == "colocate"


def test_a_misspelt_field_is_refused_by_the_spec_model() -> None:
    """What keeps the builder honest: the model forbids fields it does not know."""
    run = runs.run(
        "r", storage={"uri": "s3://b/runs"}, stages=runs.fre_then_mgt("s3://b/f", "s3://b/m")
    )
    run["spec"]["backofLimit"] = 2
    with pytest.raises(ValidationError, match="backofLimit"):
        LMMR1RunSpec.model_validate(run["spec"])


def test_stages_built_from_one_dict_do_not_share_it() -> None:
    fre, mgt = runs.fre_then_mgt("s3://b/f", "s3://b/m", resources=runs.CPU_SEPARATE_ROLLOUT)
    fre["resources"]["trainer"]["gpusPerNode"] = 8
    assert mgt["resources"]["trainer"]["gpusPerNode"] == 0
    assert runs.CPU_SEPARATE_ROLLOUT["trainer"]["gpusPerNode"] == 0
