"""The operator's pure builders: what a stage's pods look like."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from tests.stage_contexts import run_object, stage_context

from lmmr1_operator import naming
from lmmr1_operator.api import crd
from lmmr1_operator.api.spec import MAX_STAGE_NAME, LMMR1RunSpec, resolved_rollout_mode
from lmmr1_operator.children import access, rollout, stage_config, trainer
from lmmr1_operator.children.context import init_weights
from lmmr1_trainer.config import StageConfig
from lmmr1_trainer.verifier.__main__ import build_parser, config_from_args
from lmmr1_trainer.verifier.config import VerifierConfig


def _sidecar_config(run: dict[str, Any]) -> VerifierConfig:
    """The verifier sidecar's settings, parsed by the verifier's own command line."""
    pod = trainer.job(stage_context(run))["spec"]["template"]["spec"]
    (verifier,) = pod["initContainers"]
    command = verifier["command"]
    assert command[:3] == ["python", "-m", "lmmr1_trainer.verifier"]
    return config_from_args(build_parser().parse_args(command[3:]))


def test_the_verifier_sidecar_scores_with_the_reward_profile() -> None:
    default = _sidecar_config(run_object())
    assert (default.profile, default.unparseable_label_policy) == ("lmm-r1", "one")
    assert (default.accuracy.answer_source, default.accuracy.verify_order) == (
        "full_response",
        "answer_first",
    )
    assert default.accuracy.default_task == "math" and default.weights.format == 0.5

    strict = run_object()
    strict["spec"]["stages"][0]["reward"] = {"profile": "strict"}
    config = _sidecar_config(strict)
    assert (config.profile, config.unparseable_label_policy) == ("strict", "zero")
    assert config.accuracy.verify_order == "gold_first"

    overridden = run_object()
    overridden["spec"]["stages"][0]["reward"] = {"profile": "lenient", "unparseableLabel": "one"}
    config = _sidecar_config(overridden)
    assert (config.profile, config.unparseable_label_policy) == ("lenient", "one")
    assert config.accuracy.answer_source == "answer_block"
    rendered = stage_config.render(stage_context(overridden), []).reward
    assert (rendered.profile, rendered.unparseable_label) == ("lenient", "one")


def test_stages_start_from_the_model_then_the_previous_final_checkpoint() -> None:
    spec = LMMR1RunSpec.model_validate(run_object()["spec"])
    assert init_weights(spec, 0, []) == "hf://Qwen/Qwen2.5-VL-3B-Instruct"
    assert init_weights(spec, 1, ["s3://b/ns/r/fre/step-40"]) == "s3://b/ns/r/fre/step-40"
    explicit = copy.deepcopy(run_object())
    explicit["spec"]["stages"][1]["initFrom"] = "s3://elsewhere/ckpt"
    spec = LMMR1RunSpec.model_validate(explicit["spec"])
    assert init_weights(spec, 1, [None]) == "s3://elsewhere/ckpt"


def test_trainer_job_is_indexed_with_gpus_sidecar_and_references_only() -> None:
    run = run_object(
        queueName="team-q",
        priorityClassName="high",
        nodeSelector={"pool": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}],
        serviceAccountName="irsa",
        images={"pullSecrets": ["regcred"]},
    )
    run["spec"]["stages"][0]["resources"] = {"trainer": {"nodes": 2, "gpusPerNode": 8}}
    job = trainer.job(stage_context(run))
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 0
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job["metadata"]["labels"][naming.KUEUE_QUEUE] == "team-q"
    pod = spec["template"]["spec"]
    assert pod["priorityClassName"] == "high" and pod["nodeSelector"] == {"pool": "h100"}
    assert pod["serviceAccountName"] == "irsa"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    (verifier,) = pod["initContainers"]
    assert verifier["restartPolicy"] == "Always"  # a native sidecar
    assert "$(POD_IP)" in verifier["command"]
    main = pod["containers"][0]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # torchrun through the launcher that keeps a rank's exit 78 (torchrun alone exits 1).
    assert main["command"][:3] == ["python", "-m", "lmmr1_trainer.launch"]
    assert "--nproc-per-node=8" in main["command"] and "--nnodes=2" in main["command"]
    assert main["command"][-4:] == [
        "-m",
        "lmmr1_trainer.train",
        "--config",
        "/etc/lmmr1/stage.yaml",
    ]
    env = {e["name"]: e for e in main["env"]}
    assert env["MASTER_ADDR"]["value"] == "r-fre-t0-0.r-fre-trainer.ns.svc"
    assert env["WORLD_SIZE"]["value"] == "16"
    # Credentials by reference only.
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]


def test_a_disrupted_trainer_pod_fails_its_job_at_once_saying_so() -> None:
    """The Job does not replace a disrupted rank itself (`Ignore`): the operator restarts
    every rank together. Its pod failure policy names the disruption in the Job's
    condition, which the operator reads as one (reconcile tests)."""
    spec = trainer.job(stage_context(run_object()))["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["podFailurePolicy"] == {
        "rules": [
            {
                "action": "FailJob",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
        ]
    }
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # the policy requires it


def test_a_cpu_stage_runs_one_plain_process_with_deepspeed_on_cpu() -> None:
    run = run_object()
    run["spec"]["stages"][0]["resources"] = {
        "trainer": {"gpusPerNode": 0},
        "rollout": {"gpusPerReplica": 0},
    }
    pod = trainer.job(stage_context(run))["spec"]["template"]["spec"]
    main = pod["containers"][0]
    assert main["command"][:3] == ["python", "-m", "lmmr1_trainer.train"]
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in main["env"]
    assert "resources" not in main or "limits" not in main["resources"]
    # The colocated engine (vLLM's CPU build) writes only where the trainer already may.
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    assert {"/tmp", "/var/cache/lmmr1", "/dev/shm"} <= mounts
    config = stage_config.render(stage_context(run), [])
    assert (config.rollout.mode, config.rollout.backend) == ("colocate", "vllm")


def test_the_rollout_mode_defaults_to_colocate_on_one_trainer_node() -> None:
    def mode(resources: dict[str, Any]) -> str:
        run = run_object()
        run["spec"]["stages"][0]["resources"] = resources
        return resolved_rollout_mode(stage_context(run).stage.resources)

    assert mode({}) == "colocate"
    assert mode({"trainer": {"nodes": 2}}) == "separate"
    assert mode({"rollout": {"mode": "separate"}}) == "separate"
    assert mode({"trainer": {"nodes": 2}, "rollout": {"mode": "colocate"}}) == "colocate"
    # Tensor-parallel rollout servers are valid where they exist.
    tensor_parallel = {"gpusPerReplica": 2, "tensorParallelSize": 2}
    assert mode({"rollout": {"mode": "separate", **tensor_parallel}}) == "separate"
    assert mode({"trainer": {"nodes": 2}, "rollout": tensor_parallel}) == "separate"


def test_a_colocated_stage_config_is_complete_at_once_without_urls() -> None:
    run = run_object()
    run["spec"]["stages"][0]["resources"] = {"rollout": {"gpuMemoryUtilization": 0.4}}
    configmap = stage_config.configmap(stage_context(run), None)
    assert set(configmap["data"]) == {"stage.yaml"}
    loaded = StageConfig.model_validate(yaml.safe_load(configmap["data"]["stage.yaml"]))
    assert (loaded.rollout.mode, loaded.rollout.urls) == ("colocate", [])
    assert (loaded.rollout.backend, loaded.rollout.gpu_memory_utilization) == ("vllm", 0.4)


def test_separate_mode_renders_vllm_unless_transformers_is_asked_for() -> None:
    run = run_object()
    rollout_spec: dict[str, Any] = {"mode": "separate", "gpusPerReplica": 0}
    run["spec"]["stages"][0]["resources"] = {"rollout": rollout_spec}
    urls = ["http://127.101.0.1:8000"]
    config = stage_config.render(stage_context(run), urls)
    assert (config.rollout.mode, config.rollout.backend, config.rollout.urls) == (
        "separate",
        "vllm",
        urls,
    )
    rollout_spec["backend"] = "transformers"
    assert stage_config.render(stage_context(run), urls).rollout.backend == "transformers"


def test_rollout_pods_and_service() -> None:
    ctx = stage_context(run_object())
    pod = rollout.pod(ctx, 1)
    assert pod["metadata"]["name"] == "r-fre-r0-1"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["containers"][0]["image"] == "rollout:1"
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    service = rollout.service(ctx)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["labels"]["lmmr1.io/attempt"] == "0"


def test_stage_config_round_trips_through_the_trainers_model() -> None:
    run = run_object()
    run["spec"]["stages"][1]["resources"] = {"rollout": {"mode": "separate"}}
    run["spec"]["stages"][1]["algorithm"] = {"freezePrefix": ["visual", "model.layers.0"]}
    ctx = stage_context(run, index=1, finals=["s3://bucket/ckpt/ns/r/uid-1/fre/step-20"])
    configmap = stage_config.configmap(ctx, ["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
    loaded = StageConfig.model_validate(yaml.safe_load(configmap["data"]["stage.yaml"]))
    assert loaded.init_from == "s3://bucket/ckpt/ns/r/uid-1/fre/step-20"
    assert loaded.run.stage == "mgt" and loaded.dataset.type == "multimodal"
    assert loaded.checkpoint.uri == "s3://bucket/ckpt/ns/r/uid-1/mgt"
    assert loaded.rollout.urls == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert loaded.rollout.mode == "separate"
    assert loaded.progress.configmap == "r-progress"
    assert loaded.algorithm.samples_per_prompt == 16
    assert loaded.algorithm.freeze_prefix == ["visual", "model.layers.0"]
    # Before the rollout servers are up only their own config exists.
    early = stage_config.configmap(ctx, None)
    assert set(early["data"]) == {"rollout.yaml"}


def test_pods_may_write_their_progress_configmap_and_nothing_else() -> None:
    run = run_object()
    (rule,) = access.progress_role(run)["rules"]
    assert rule == {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["r-progress"],
        "verbs": ["get", "patch", "update"],
    }
    binding = access.progress_binding(run, "default")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default", "namespace": "ns"}]


def test_child_names_fit_dns_labels_at_the_longest_names() -> None:
    run = run_object()
    run["metadata"]["name"] = "r" * crd.MAX_RUN_NAME
    run["spec"]["stages"][0]["name"] = "s" * MAX_STAGE_NAME
    ctx = stage_context(run, attempt=999)
    for name in (
        rollout.pod(ctx, 999)["metadata"]["name"],
        trainer.job(ctx)["metadata"]["name"] + "-999",  # an indexed pod's hostname
        rollout.service(ctx)["metadata"]["name"],
        trainer.service(ctx)["metadata"]["name"],
        stage_config.configmap(ctx, None)["metadata"]["name"],
    ):
        assert len(name) <= 63, name


def test_each_attempts_workload_children_have_names_of_their_own_that_fit() -> None:
    """A restarted stage's Job and rollout pods never take the names of the last attempt's,
    which may still be terminating; the attempt in a name is its last three digits, so the
    longest run and stage names with attempt 999 and index 999 still make DNS labels."""
    run = run_object()
    run["metadata"]["name"] = "r" * crd.MAX_RUN_NAME
    run["spec"]["stages"][0]["name"] = "s" * MAX_STAGE_NAME
    first, fourth, last = (stage_context(run, attempt=a) for a in (0, 3, 999))
    assert trainer.job(first)["metadata"]["name"] != trainer.job(fourth)["metadata"]["name"]
    assert rollout.pod(first, 0)["metadata"]["name"] != rollout.pod(fourth, 0)["metadata"]["name"]
    prefix = f"{'r' * crd.MAX_RUN_NAME}-{'s' * MAX_STAGE_NAME}"
    assert trainer.job(fourth)["metadata"]["name"] == f"{prefix}-t3"
    assert rollout.pod(fourth, 1)["metadata"]["name"] == f"{prefix}-r3-1"
    job = trainer.job(last)["metadata"]["name"]
    for name in (job, f"{job}-999", rollout.pod(last, 999)["metadata"]["name"]):
        assert len(name) <= 63, name
    assert trainer.job(stage_context(run, attempt=1003))["metadata"]["name"] == f"{prefix}-t3"
    # Every attempt's children share the stage's Services (their DNS names stay put).
    assert trainer.service(first) == trainer.service(fourth)
    assert rollout.service(first) == rollout.service(fourth)


def test_the_trainers_ranks_find_rank_zero_through_the_stages_service() -> None:
    """Rank 0's pod is `<job>-0` under the subdomain of the trainer's headless Service: the
    Service's name is the pods' subdomain and MASTER_ADDR, and it selects the attempt's
    pods whatever their Job's name."""
    run = run_object()
    run["spec"]["stages"][0]["resources"] = {"trainer": {"nodes": 2}}
    ctx = stage_context(run, attempt=3)
    job, service = trainer.job(ctx), trainer.service(ctx)
    name = service["metadata"]["name"]
    assert name == "r-fre-trainer" and job["metadata"]["name"] == "r-fre-t3"
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == name
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "r-fre-t3-0.r-fre-trainer.ns.svc"
    assert env["MASTER_ADDR"].split(".")[:2] == [f"{job['metadata']['name']}-0", name]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["clusterIP"] == "None"


def _labels(stage: str, role: str) -> dict[str, str]:
    return {
        "lmmr1.io/run": "r",
        "app.kubernetes.io/managed-by": "lmmr1-operator",
        "lmmr1.io/stage": stage,
        "lmmr1.io/role": role,
    }


def _peers(policy: dict[str, Any]) -> list[dict[str, Any]]:
    (rule,) = policy["spec"]["ingress"]
    assert set(rule) == {"from"}  # no `ports`: NCCL picks its own
    return list(rule["from"])


def test_network_policies_admit_exactly_the_stages_own_nccl_and_rollout_traffic() -> None:
    """Trainer pods accept the stage's trainer pods (ranks, rendezvous) and rollout servers
    (NCCL weight sync into rank 0); rollout servers accept the stage's trainer pods and each
    other (the weight-sync group's NCCL ring). Ingress only: egress (S3, DNS, the hub) stays
    open. Pod selectors alone: nothing from another namespace, run or stage."""
    run = run_object()
    run["spec"]["stages"][0]["resources"] = {"rollout": {"mode": "separate"}}
    ctx = stage_context(run)
    trainer_policy = access.trainer_network_policy(ctx)
    rollout_policy = access.rollout_network_policy(ctx)
    for policy, role in ((trainer_policy, "trainer"), (rollout_policy, "rollout")):
        assert policy["metadata"]["name"] == f"r-fre-{role}"
        assert policy["metadata"]["namespace"] == "ns"
        assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert policy["spec"]["podSelector"] == {"matchLabels": _labels("fre", role)}
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert "egress" not in policy["spec"]
    trainer_peers = [{"podSelector": {"matchLabels": _labels("fre", "trainer")}}]
    rollout_peers = [{"podSelector": {"matchLabels": _labels("fre", "rollout")}}]
    assert _peers(trainer_policy) == trainer_peers + rollout_peers
    assert _peers(rollout_policy) == trainer_peers + rollout_peers
    # The selectors match the pods the builders make, whatever the attempt or queue.
    run["spec"]["queueName"] = "q"
    pod_labels = rollout.pod(stage_context(run), 0)["metadata"]["labels"]
    assert _labels("fre", "rollout").items() <= pod_labels.items()
    trainer_labels = trainer.job(stage_context(run))["spec"]["template"]["metadata"]["labels"]
    assert _labels("fre", "trainer").items() <= trainer_labels.items()


def test_a_colocated_stages_trainer_accepts_only_its_own_ranks() -> None:
    """No rollout pods in colocate mode: the trainer's policy admits its own ranks alone,
    and a multi-node colocated trainer's ranks reach each other."""
    run = run_object()
    run["spec"]["stages"][1]["resources"] = {
        "trainer": {"nodes": 2},
        "rollout": {"mode": "colocate"},
    }
    for index in (0, 1):
        ctx = stage_context(run, index=index, finals=["s3://b/fre/step-4"])
        policy = access.trainer_network_policy(ctx)
        stage = ctx.stage.name
        assert policy["spec"]["podSelector"] == {"matchLabels": _labels(stage, "trainer")}
        assert _peers(policy) == [{"podSelector": {"matchLabels": _labels(stage, "trainer")}}]


def test_every_claim_the_stage_reads_is_mounted_read_only_where_the_trainer_looks() -> None:
    """`pvc://claim/path` in the model, dataset, imageRoot or initFrom: each distinct claim
    becomes one read-only volume, mounted at /mnt/pvc/<claim> (the trainer's default
    LMMR1_PVC_ROOT) in the trainer; rollout servers get the claim of the weights they
    serve. s3:// and hf:// sources mount nothing."""
    from lmmr1_trainer.config import DEFAULT_PVC_ROOT
    from lmmr1_trainer.storage import local_path

    run = run_object(model={"uri": "pvc://models/qwen2.5-vl-3b"})
    run["spec"]["stages"][0]["dataset"] = {
        "uri": "pvc://datasets/fre/train.jsonl",
        "imageRoot": "pvc://datasets/images",  # the same claim: mounted once
    }
    run["spec"]["stages"][1]["dataset"] = {
        "uri": "s3://bucket/mgt.jsonl",
        "imageRoot": "pvc://geo-images.v2",
    }
    run["spec"]["stages"][1]["resources"] = {"rollout": {"mode": "separate"}}

    def claims(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        volumes = {
            v["name"]: v["persistentVolumeClaim"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounted: dict[str, str] = {}
        for mount in container["volumeMounts"]:
            if mount["name"] in volumes:
                source = volumes[mount["name"]]
                assert source["readOnly"] and mount["readOnly"]
                mounted[source["claimName"]] = mount["mountPath"]
        assert len(mounted) == len(volumes)  # every claim volume is mounted
        return mounted

    fre = trainer.job(stage_context(run))["spec"]["template"]["spec"]
    assert claims(fre, fre["containers"][0]) == {
        "datasets": f"{DEFAULT_PVC_ROOT}/datasets",
        "models": f"{DEFAULT_PVC_ROOT}/models",
    }
    assert local_path("pvc://models/qwen2.5-vl-3b").parent == Path(f"{DEFAULT_PVC_ROOT}/models")
    # The second stage starts from the first one's checkpoint (s3://), not the model.
    finals: list[str | None] = ["s3://bucket/ckpt/ns/r/uid-1/fre/step-9"]
    mgt = trainer.job(stage_context(run, 1, finals))["spec"]["template"]["spec"]
    assert claims(mgt, mgt["containers"][0]) == {"geo-images.v2": "/mnt/pvc/geo-images.v2"}
    server = rollout.pod(stage_context(run, 1, finals), 0)["spec"]
    assert claims(server, server["containers"][0]) == {}
    run["spec"]["stages"][1]["initFrom"] = "pvc://models/sft"
    server = rollout.pod(stage_context(run, 1, finals), 0)["spec"]
    assert claims(server, server["containers"][0]) == {"models": "/mnt/pvc/models"}
    # Nothing to mount for the default run (hf:// model, s3:// data).
    plain = trainer.job(stage_context(run_object()))["spec"]["template"]["spec"]
    assert claims(plain, plain["containers"][0]) == {}


def test_a_gae_stage_gets_its_critic_with_defaults_and_the_trainer_gets_it_too() -> None:
    """gae without a critic section: the script defaults (9e-6, clip 0.2, gamma = lambda = 1)
    reach the trainer's stage config; set values go through unchanged; other estimators
    render no critic."""
    run = run_object()
    run["spec"]["stages"][0]["algorithm"] = {"advantageEstimator": "gae", "samplesPerPrompt": 1}
    run["spec"]["stages"][1]["algorithm"] = {"advantageEstimator": "gae"}
    run["spec"]["stages"][1]["critic"] = {"learningRate": 5e-6, "warmupRatio": 0.1}
    fre = stage_context(run)
    assert fre.stage.critic is not None and fre.stage.critic.learning_rate == 9e-6
    configmap = stage_config.configmap(fre, [])
    loaded = StageConfig.model_validate(yaml.safe_load(configmap["data"]["stage.yaml"]))
    assert loaded.critic is not None
    assert (loaded.critic.learning_rate, loaded.critic.warmup_ratio) == (9e-6, None)
    assert (loaded.critic.value_clip, loaded.critic.gamma, loaded.critic.gae_lambda) == (
        0.2,
        1.0,
        1.0,
    )
    mgt = stage_config.render(stage_context(run, index=1, finals=["s3://b/ns/r/fre/step-2"]), [])
    assert mgt.critic is not None
    assert (mgt.critic.learning_rate, mgt.critic.warmup_ratio) == (5e-6, 0.1)
    assert stage_config.render(stage_context(run_object()), []).critic is None
