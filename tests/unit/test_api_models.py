"""The LMMR1Run models: examples validate, the invalid table is rejected, the CRD is
structural and matches the committed files byte for byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from tests.invalid_runs import INVALID, Invalid, valid_run

from lmmr1_operator.api import LMMR1RunSpec, LMMR1RunStatus, crd
from lmmr1_operator.api.spec import Algorithm

EXAMPLES = sorted((crd.REPO_ROOT / "manifests" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    run = yaml.safe_load(path.read_text())
    spec = LMMR1RunSpec.model_validate(run["spec"])
    assert [s.name for s in spec.stages] == ["fre", "mgt"]
    assert len(run["metadata"]["name"]) <= crd.MAX_RUN_NAME


def test_defaults_are_the_papers_fre_recipe() -> None:
    algorithm = LMMR1RunSpec.model_validate(valid_run()["spec"]).stages[0].algorithm
    assert algorithm.advantage_estimator == "reinforce_baseline"
    assert (
        algorithm.samples_per_prompt,
        algorithm.rollout_batch_size,
        algorithm.train_batch_size,
    ) == (16, 256, 256)
    assert (algorithm.learning_rate, algorithm.kl_coef, algorithm.clip_range) == (4e-7, 1e-3, 0.2)
    assert (algorithm.warmup_ratio, algorithm.min_lr_ratio) == (0.03, 0.1)


def test_the_reward_defaults_to_the_lmm_r1_reference() -> None:
    reward = LMMR1RunSpec.model_validate(valid_run()["spec"]).stages[0].reward
    assert (reward.profile, reward.verifier) == ("lmm-r1", "math")
    assert (reward.format_weight, reward.accuracy_weight) == (0.5, 1.0)
    # Unset: the profile's rule (lmm-r1: 1.0), not a default that contradicts it.
    assert reward.unparseable_label is None


@pytest.mark.parametrize("case", [c for c in INVALID if c.pydantic], ids=lambda c: c.id)
def test_pydantic_rejects_the_invalid_table(case: Invalid) -> None:
    run = case.run("invalid")
    with pytest.raises(ValidationError) as raised:
        LMMR1RunSpec.model_validate(run["spec"])
    # pydantic names the same field, in camelCase, as a dotted location.
    leaf = case.field.split(".")[-1].split("[")[0]
    assert leaf in str(raised.value), str(raised.value)


def test_uri_rules_say_the_same_in_pydantic_and_cel() -> None:
    """imageRoot takes s3:// or pvc:// only (a bare path means nothing in the pod); a pvc://
    URI's claim must be a claim name, as the pod's volume will need it."""
    from lmmr1_operator.api.spec import Dataset

    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    stage = schema["properties"]["spec"]["properties"]["stages"]["items"]
    image_root = stage["properties"]["dataset"]["properties"]["imageRoot"]
    (rule,) = image_root["x-kubernetes-validations"]
    for good in ("s3://bucket/images", "pvc://images", "pvc://geo-images.v2/set/1"):
        assert Dataset.model_validate({"uri": "s3://b/x.jsonl", "imageRoot": good})
    for bad in ("/data/images", "images/", "hf://org/images", "pvc://Images/x", "pvc://-x"):
        with pytest.raises(ValidationError) as raised:
            Dataset.model_validate({"uri": "s3://b/x.jsonl", "imageRoot": bad})
        assert rule["message"] in str(raised.value), bad
    assert Dataset.model_validate({"uri": "pvc://data/x.jsonl"}).on_bad_row == "fail"


def test_status_round_trips_in_camel_case() -> None:
    status = LMMR1RunStatus.model_validate(
        {
            "phase": "Running",
            "stage": "fre",
            "step": 3,
            "totalSteps": 10,
            "progress": "30%",
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "StageRunning",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        }
    )
    assert status.wire()["totalSteps"] == 10


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for key in ("properties",):
            for name, child in node.get(key, {}).items():
                out += _walk(child, f"{path}.{name}")
        if "items" in node:
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_crd_schema_is_structural() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    nodes = _walk(schema)
    assert len(nodes) > 100
    for path, node in nodes:
        assert "type" in node, f"{path} has no type"
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs"} & set(node), path
        if node["type"] == "string" and path.startswith(".spec.stages"):
            # CEL's cost estimator needs a bound on every string the rules may touch.
            assert "maxLength" in node or "enum" in node or "pattern" in node, path


def test_committed_crds_match_the_models_byte_for_byte() -> None:
    assert crd.MANIFEST.read_text() == crd.render_manifest(), "run `make crds`"
    assert crd.CHART_TEMPLATE.read_text() == crd.render_chart_template(), "run `make crds`"
    assert crd.main(["--check"]) == 0


def test_the_field_reference_lists_every_field_with_its_default_and_rules() -> None:
    from lmmr1_operator.api.reference import render_reference

    text = render_reference(crd.crd())
    assert crd.REFERENCE.read_text() == text, "run `make crds`"
    rows = {line.split("|")[1].strip(" `") for line in text.splitlines() if line.startswith("| `")}
    for field in Algorithm.model_fields.values():
        assert f"spec.stages[].algorithm.{field.alias}" in rows, field.alias
    assert "| `spec.stages[].algorithm.learningRate` | number | `4e-07` | >= 0; <= 1.0 |" in text
    assert "| `spec.stages[].name` | string | required |" in text
    assert "stage names must be unique" in text and "must divide trainBatchSize" in text


# Every flag of the published FRE-Text script (TideDra/lmm-r1,
# examples/scripts/lmm_r1/train_fre_text.sh), as the mapping must cover it.
FRE_TEXT_FLAGS = [
    "--actor_learning_rate",
    "--actor_num_gpus_per_node",
    "--actor_num_nodes",
    "--advantage_estimator",
    "--bf16",
    "--ckpt_path",
    "--colocate_all_models",
    "--critic_num_gpus_per_node",
    "--critic_num_nodes",
    "--enable_prefix_caching",
    "--flash_attn",
    "--gamma",
    "--generate_max_len",
    "--gradient_checkpointing",
    "--init_kl_coef",
    "--input_key",
    "--label_key",
    "--lambd",
    "--load_checkpoint",
    "--max_epochs",
    "--max_samples",
    "--micro_rollout_batch_size",
    "--micro_train_batch_size",
    "--n_samples_per_prompt",
    "--normalize_reward",
    "--num_episodes",
    "--pretrain",
    "--prompt_data",
    "--prompt_max_len",
    "--ref_num_gpus_per_node",
    "--ref_num_nodes",
    "--remote_rm_url",
    "--rollout_batch_size",
    "--save_path",
    "--save_steps",
    "--temperature",
    "--train_batch_size",
    "--use_tensorboard",
    "--use_wandb",
    "--wandb_group",
    "--wandb_run_name",
    "--save_hf_ckpt",
    "--vllm_enable_sleep",
    "--vllm_gpu_memory_utilization",
    "--vllm_num_engines",
    "--vllm_sync_backend",
    "--vllm_tensor_parallel_size",
    "--zero_stage",
]


def test_the_script_flag_map_covers_the_scripts_and_names_real_fields() -> None:
    from lmmr1_operator.api.crd import crd as build_crd
    from lmmr1_operator.api.reference import _walk
    from lmmr1_operator.api.script_flags import SCRIPT_FLAGS

    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    paths = {path for path, _, _ in _walk(schema["properties"]["spec"], "spec", True)}
    mapped = {flag for entry in SCRIPT_FLAGS for flag in entry.flag.split(", ")}
    assert sorted(set(FRE_TEXT_FLAGS) - mapped) == []
    assert [e.field for e in SCRIPT_FLAGS if e.field and e.field not in paths] == []


def test_the_defaults_are_the_fre_scripts() -> None:
    """train_fre_text.sh: 2 episodes, micro-batches of 2, vLLM at 0.5 of the GPU."""
    algorithm = Algorithm()
    assert (algorithm.episodes, algorithm.micro_train_batch_size) == (2, 2)
    assert (algorithm.samples_per_prompt, algorithm.rollout_batch_size) == (16, 256)
    assert (algorithm.train_batch_size, algorithm.learning_rate) == (256, 4e-7)
    assert (algorithm.max_prompt_length, algorithm.max_generation_length) == (4096, 4096)
    from lmmr1_operator.api.spec import RolloutResources

    assert RolloutResources().gpu_memory_utilization == 0.5
