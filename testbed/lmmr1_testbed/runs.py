"""LMMR1Run manifests for the test bed's benches and tests.

Each of them used to spell a run out as a dict of its own; building them here makes an API
change (a field renamed, a new required one) one edit instead of one per copy, and
tests/unit/test_testbed_runs.py holds these shapes to the operator's own spec model.

    run("r", storage={"uri": "s3://b/runs"}, stages=fre_then_mgt("s3://b/f", "s3://b/m"))
"""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "lmmr1.io/v1alpha1"
MODEL_URI = "hf://Qwen/Qwen2.5-VL-3B-Instruct"

# Fits the kwok nodes with no simulated GPU at all, and gives a run the most children it
# can have: a trainer without GPUs and rollout servers in their own pods.
CPU_SEPARATE_ROLLOUT: dict[str, Any] = {
    "trainer": {"gpusPerNode": 0, "shmSize": "64Mi"},
    "rollout": {"mode": "separate", "gpusPerReplica": 0},
}


def stage(name: str, kind: str, dataset_uri: str, **fields: Any) -> dict[str, Any]:
    """One entry of spec.stages; `kind` is its `type` (text, multimodal); `fields` are the
    stage's other fields in the API's camelCase (resources=, checkpoint=, algorithm=...).
    They are copied, so stages built from one dict (or a constant above) never share it."""
    return {"name": name, "type": kind, "dataset": {"uri": dataset_uri}, **copy.deepcopy(fields)}


def fre_then_mgt(fre_uri: str, mgt_uri: str, **fields: Any) -> list[dict[str, Any]]:
    """The paper's two stages, FRE (text) then MGT (multimodal), both with `fields`."""
    return [stage("fre", "text", fre_uri, **fields), stage("mgt", "multimodal", mgt_uri, **fields)]


def run(
    name: str, *, storage: dict[str, Any], stages: list[dict[str, Any]], **spec_fields: Any
) -> dict[str, Any]:
    """An LMMR1Run of MODEL_URI; `spec_fields` are the spec's other fields in camelCase
    (backoffLimit=, activeDeadlineSeconds=...; model= replaces the model)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "LMMR1Run",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": MODEL_URI},
            "storage": storage,
            **spec_fields,
            "stages": stages,
        },
    }
