"""Every pod the operator and the chart create passes the `restricted` Pod Security Standard,
has somewhere to write on its read-only root filesystem, and carries a service-account
token only where a container talks to the API server."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.stage_contexts import run_object, stage_context

from lmmr1_operator.children import pods, rollout, trainer

REPO = Path(__file__).resolve().parents[2]
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

# https://kubernetes.io/docs/concepts/security/pod-security-standards/ (v1.36)
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the `restricted` profile (which includes `baseline`) would reject in a pod spec,
    as the PodSecurity admission plugin checks it."""
    out: list[str] = []
    pod_sc = pod.get("securityContext") or {}
    containers = [
        *pod.get("initContainers", []),
        *pod.get("containers", []),
        *pod.get("ephemeralContainers", []),
    ]
    # baseline
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key}=true")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod hostProcess")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            out.append(f"volume {volume['name']}: hostPath")
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {volume['name']}: type {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']}")
    if (pod_sc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
        out.append("pod seLinuxOptions.type")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    # restricted, pod level
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser=0")
    for c in containers:
        name = c["name"]
        sc = c.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: hostProcess")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if (sc.get("seLinuxOptions") or {}).get("type", "") not in SELINUX_TYPES:
            out.append(f"{name}: seLinuxOptions.type")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add {caps['add']}")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser=0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp!r}")
    return out


def gpu_run() -> dict[str, Any]:
    run = run_object()
    run["spec"]["stages"][0]["resources"] = {"trainer": {"nodes": 2, "gpusPerNode": 8}}
    return run


def cpu_run() -> dict[str, Any]:
    run = run_object()
    run["spec"]["stages"][0]["resources"] = {
        "trainer": {"gpusPerNode": 0},
        "rollout": {"gpusPerReplica": 0},
    }
    return run


def workload_pods() -> dict[str, dict[str, Any]]:
    """Every pod spec the operator renders, by a name for the test id."""
    out = {}
    for label, run in (("gpu", gpu_run()), ("cpu", cpu_run())):
        ctx = stage_context(run)
        out[f"rollout-{label}"] = rollout.pod(ctx, 0)["spec"]
        out[f"trainer-{label}"] = trainer.job(ctx)["spec"]["template"]["spec"]
    return out


def operator_pod() -> dict[str, Any]:
    """The chart's Deployment with default values (manifests/20-operator.yaml is rendered
    from the chart and drift-checked against `helm template`)."""
    docs = yaml.safe_load_all((REPO / "manifests" / "20-operator.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    return dict(deployment["spec"]["template"]["spec"])


WORKLOADS = workload_pods()


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_pod_passes_the_restricted_profile(name: str) -> None:
    pod = WORKLOADS[name]
    assert restricted_violations(pod) == []
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for container in containers(pod):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]


def test_the_operator_pod_passes_the_restricted_profile_and_keeps_its_token() -> None:
    pod = operator_pod()
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["runAsUser"] == 65532  # the operator image's user
    assert pod.get("automountServiceAccountToken", True) is True  # it talks to the API
    for container in containers(pod):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_checker_rejects_what_the_admission_plugin_rejects() -> None:
    base = copy.deepcopy(WORKLOADS["trainer-cpu"])
    assert restricted_violations(base) == []
    broken: dict[str, Any] = {
        "root": lambda p: p["securityContext"].update(runAsUser=0),
        "may-be-root": lambda p: p["securityContext"].pop("runAsNonRoot"),
        "no-seccomp": lambda p: p["securityContext"].pop("seccompProfile"),
        "unconfined": lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "escalation": lambda p: p["initContainers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"
        ),
        "capabilities": lambda p: p["containers"][0]["securityContext"].update(
            capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}
        ),
        "privileged": lambda p: p["containers"][0]["securityContext"].update(privileged=True),
        "host-path": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "host-network": lambda p: p.update(hostNetwork=True),
        "host-port": lambda p: p["containers"][0]["ports"][0].update(hostPort=29500),
    }
    for why, mutate in broken.items():
        pod = copy.deepcopy(base)
        mutate(pod)
        assert restricted_violations(pod), why


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_only_the_trainer_container_gets_a_service_account_token(name: str) -> None:
    pod = WORKLOADS[name]
    assert pod["automountServiceAccountToken"] is False
    with_token = [
        c["name"]
        for c in containers(pod)
        if any(m["mountPath"] == TOKEN_DIR for m in c.get("volumeMounts", []))
    ]
    assert with_token == (["trainer"] if name.startswith("trainer") else [])
    if with_token:
        (volume,) = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
        sources = volume["projected"]["sources"]
        assert sources[0]["serviceAccountToken"]["path"] == "token"
        assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
        assert sources[2]["downwardAPI"]["items"][0]["path"] == "namespace"


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_containers_write_only_to_their_emptydirs(name: str) -> None:
    pod = WORKLOADS[name]
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for container in containers(pod):
        writable = {
            m["mountPath"]
            for m in container.get("volumeMounts", [])
            if m["name"] in empty_dirs and not m.get("readOnly")
        }
        assert {pods.SCRATCH_DIR, pods.CACHE_DIR} <= writable, container["name"]
        env = {e["name"]: e.get("value", "") for e in container["env"]}
        for key in (
            "HOME",
            "TMPDIR",
            "XDG_CACHE_HOME",
            "LMMR1_MODEL_CACHE",
            "HF_HOME",
            "TRITON_CACHE_DIR",
            "WANDB_DIR",
            "WANDB_CACHE_DIR",
            "WANDB_CONFIG_DIR",
            "WANDB_DATA_DIR",
            "WANDB_ARTIFACT_DIR",
        ):
            assert any(Path(env[key]).is_relative_to(w) for w in writable), (key, env[key])


def test_the_rollout_token_is_readable_by_the_pods_group_only() -> None:
    for name, pod in WORKLOADS.items():
        (volume,) = [v for v in pod["volumes"] if v["name"] == "rollout-token"]
        assert volume["secret"]["defaultMode"] == 0o440, name
        assert pod["securityContext"]["fsGroup"] == 1000


def test_a_run_names_the_uid_and_gids_its_image_runs_as() -> None:
    run = cpu_run()
    run["spec"]["securityContext"] = {"runAsUser": 2000, "runAsGroup": 0, "fsGroup": 3000}
    ctx = stage_context(run)
    for pod in (rollout.pod(ctx, 0)["spec"], trainer.job(ctx)["spec"]["template"]["spec"]):
        assert restricted_violations(pod) == []
        security = pod["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (
            2000,
            0,
            3000,
        )
    # Root is the run's explicit choice: the pods then fail `restricted` (the namespace's
    # admission decides) instead of claiming runAsNonRoot with uid 0.
    run["spec"]["securityContext"] = {"runAsUser": 0}
    pod = rollout.pod(stage_context(run), 0)["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is False
    assert "pod runAsUser=0" in restricted_violations(pod)
