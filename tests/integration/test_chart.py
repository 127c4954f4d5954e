"""The Helm chart: renders what users expect (helm template), installs, upgrades and
uninstalls on the test bed, and grants the operator exactly what it needs."""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmmr1_testbed.layout import REPO_ROOT, TestBedState
from lmmr1_testbed.pytest_plugin import Cli, WaitFor

CHART = str(REPO_ROOT / "charts" / "lmmr1")


def template(helm: Cli, *args: str, check: bool = True) -> list[dict[str, Any]]:
    result = helm("template", "rel", CHART, "--namespace", "ops", *args, check=check)
    if not check and result.returncode != 0:
        raise RuntimeError(result.stderr)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def test_helm_lint_passes(helm: Cli) -> None:
    helm("lint", "--strict", CHART)
    helm("lint", "--strict", CHART, "--set", "watchNamespace=team-a")


def test_default_render_is_cluster_wide_hardened_and_complete(helm: Cli) -> None:
    docs = template(helm)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "CustomResourceDefinition",
        ]
    )
    pod = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    assert "--all-namespaces" in container["command"]
    crds = {doc["metadata"]["name"]: doc for doc in by_kind(docs, "CustomResourceDefinition")}
    assert crds["lmmr1runs.lmmr1.io"]["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep"
    }


def test_the_chart_crd_is_the_generated_crd(helm: Cli) -> None:
    docs = template(helm, "--show-only", "templates/crd-lmmr1runs.yaml")
    committed = yaml.safe_load((REPO_ROOT / "manifests" / "10-crd-lmmr1runs.yaml").read_text())
    assert docs[0]["spec"] == committed["spec"]


def test_watch_namespace_gives_a_namespaced_role(helm: Cli) -> None:
    docs = template(helm, "--set", "watchNamespace=team-a")
    # Only kopf's read-only discovery is cluster-wide.
    (cluster_role,) = by_kind(docs, "ClusterRole")
    assert {verb for rule in cluster_role["rules"] for verb in rule["verbs"]} == {
        "get",
        "list",
        "watch",
    }
    roles = {r["metadata"]["namespace"]: r for r in by_kind(docs, "Role")}
    assert set(roles) == {"team-a", "ops"}  # runs' namespace; the Lease in the release's
    assert {"leases"} == {res for rule in roles["ops"]["rules"] for res in rule["resources"]}
    command = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--namespace=team-a" in command


def test_metrics_and_service_monitor_toggle(helm: Cli) -> None:
    assert not by_kind(template(helm, "--set", "metrics.enabled=false"), "Service")
    monitored = template(helm, "--set", "metrics.serviceMonitor.enabled=true")
    assert by_kind(monitored, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] == "metrics"


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (
            ["--set", "metrics.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"],
            "metrics.serviceMonitor.enabled=true needs metrics.enabled=true",
        ),
        (["--set", "replicaCount=two"], "replicaCount"),
        (["--set", "operator.logLevel=loud"], "logLevel"),
        (["--set", "watchNamespace=Team_A"], "watchNamespace"),
        (["--set", "imageTypo=x"], "imageTypo"),
        (["--set", "health.port=9090"], "health.port and metrics.port must differ"),
    ],
)
def test_bad_values_fail_with_a_message_naming_them(
    helm: Cli, values: list[str], says: str
) -> None:
    with pytest.raises(RuntimeError, match=says.replace(".", r"\.")):
        template(helm, *values, check=False)


def test_long_release_names_stay_within_63_characters(helm: Cli) -> None:
    result = helm("template", "r" * 53, CHART)
    for doc in yaml.safe_load_all(result.stdout):
        if doc:
            assert len(doc["metadata"]["name"]) <= 63
            for value in doc["metadata"].get("labels", {}).values():
                assert len(value) <= 63


def test_rendered_chart_passes_server_side_dry_run(helm: Cli, kubectl: Cli, namespace: str) -> None:
    rendered = helm(
        "template", "dry", CHART, "--namespace", namespace, "--set", "crds.enabled=false"
    ).stdout
    kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered)
    with_crds = helm(
        "template",
        "dry",
        CHART,
        "--namespace",
        namespace,
        "--show-only",
        "templates/crd-lmmr1runs.yaml",
    ).stdout
    kubectl(
        "apply",
        "--dry-run=server",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        stdin=with_crds,
    )


def test_install_upgrade_uninstall(
    helm: Cli, kubectl: Cli, namespace: str, wait: WaitFor, installed_manifests: Path
) -> None:
    release = f"r{secrets.token_hex(3)}"
    # The CRDs already exist (installed from manifests/): the chart adopts them.
    helm(
        "install",
        release,
        CHART,
        "--take-ownership",
        "--force-conflicts",
        "--wait",
        "--timeout",
        "90s",
    )
    deployment = f"{release}-lmmr1-operator"
    wait(
        "operator pod Ready",
        lambda: (
            kubectl(
                "get", "deployment", deployment, "-o", "jsonpath={.status.readyReplicas}"
            ).stdout
            == "1"
        ),
    )
    assert "get lmmr1runs -w" in helm("get", "notes", release).stdout

    helm(
        "upgrade",
        release,
        CHART,
        "--reuse-values",
        "--set",
        "operator.logLevel=debug",
        "--wait",
        "--timeout",
        "90s",
    )
    command = json.loads(kubectl("get", "deployment", deployment, "-o", "json").stdout)["spec"][
        "template"
    ]["spec"]["containers"][0]["command"]
    assert "--debug" in command
    assert helm("history", release, "-o", "json").stdout.count('"revision"') == 2

    helm("uninstall", release, "--wait", "--timeout", "90s")
    assert kubectl("get", "deployment", deployment, check=False).returncode != 0
    assert kubectl("get", "clusterrole", deployment, check=False).returncode != 0
    # crds.keep: the CRD, and so every run, survives an uninstall.
    kubectl("get", "crd", "lmmr1runs.lmmr1.io")


ALLOWED = [
    ("watch", "lmmr1runs.lmmr1.io"),
    ("patch", "lmmr1runs.lmmr1.io"),
    ("delete", "lmmr1runs.lmmr1.io"),
    ("patch", "lmmr1runs.lmmr1.io/status"),
    ("update", "lmmr1runs.lmmr1.io/finalizers"),
    ("create", "jobs.batch"),
    ("delete", "jobs.batch"),
    ("create", "pods"),
    ("delete", "pods"),
    ("watch", "pods"),
    ("create", "services"),
    ("create", "configmaps"),
    ("patch", "configmaps"),
    ("get", "secrets"),
    ("create", "secrets"),
    ("create", "networkpolicies.networking.k8s.io"),
    ("create", "events"),
    ("create", "events.events.k8s.io"),
    ("list", "events"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
]
DENIED = [
    ("list", "secrets"),
    ("watch", "secrets"),
    ("update", "secrets"),
    ("create", "pods/exec"),
    ("deletecollection", "lmmr1runs.lmmr1.io"),
    ("create", "lmmr1runs.lmmr1.io"),
    ("create", "deployments.apps"),
    ("escalate", "roles.rbac.authorization.k8s.io"),
    ("bind", "roles.rbac.authorization.k8s.io"),
    ("update", "roles.rbac.authorization.k8s.io"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("get", "nodes"),
    ("create", "serviceaccounts/token"),
    ("update", "pods"),
    ("patch", "jobs.batch"),
    ("delete", "namespaces"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
]


def can_i(kubectl: Cli, who: str, verb: str, resource: str, namespace: str) -> bool:
    resource, _, subresource = resource.partition("/")  # "pods/exec" would name a pod
    extra = [f"--subresource={subresource}"] if subresource else []
    result = kubectl(
        "auth", "can-i", verb, resource, *extra, f"--as={who}", "-n", namespace, check=False
    )
    return result.stdout.strip() == "yes"


@pytest.mark.parametrize("watch_namespace", [False, True], ids=["cluster-wide", "namespaced"])
def test_operator_rbac_is_least_privilege(
    helm: Cli, kubectl: Cli, namespace: str, testbed: TestBedState, watch_namespace: bool
) -> None:
    release = f"r{secrets.token_hex(3)}"
    watched = f"{namespace}-runs"[:63]
    kubectl("create", "namespace", watched)
    args = ["--set", "crds.enabled=false", "--set", "metrics.service.enabled=false"]
    if watch_namespace:
        args += ["--set", f"watchNamespace={watched}"]
    helm("install", release, CHART, *args)
    try:
        who = f"system:serviceaccount:{namespace}:{release}-lmmr1-operator"
        for verb, resource in ALLOWED:
            assert can_i(kubectl, who, verb, resource, watched), f"cannot {verb} {resource}"
        for verb, resource in DENIED:
            assert not can_i(kubectl, who, verb, resource, watched), f"can {verb} {resource}"

        # Leader election: its own Lease in the release namespace, nothing else.
        def can_update_lease(lease: str) -> bool:
            result = kubectl(
                "auth",
                "can-i",
                "update",
                f"leases.coordination.k8s.io/{lease}",
                f"--as={who}",
                "-n",
                namespace,
                check=False,
            )
            return result.stdout.strip() == "yes"

        assert can_update_lease(f"{release}-lmmr1-operator")
        assert not can_update_lease("kube-scheduler")
        if watch_namespace:  # nothing outside the watched namespace
            assert not can_i(kubectl, who, "watch", "lmmr1runs.lmmr1.io", "default")
            assert not can_i(kubectl, who, "create", "pods", "default")
            assert not can_i(kubectl, who, "get", "secrets", "default")
    finally:
        helm("uninstall", release, check=False)
        subprocess.run(
            [
                testbed.binary("kubectl"),
                f"--kubeconfig={testbed.kubeconfig}",
                "delete",
                "namespace",
                watched,
                "--wait=false",
            ],
            check=False,
            capture_output=True,
        )


def test_committed_manifests_are_rendered_from_the_chart(
    testbed: TestBedState, tmp_path: Path
) -> None:
    subprocess.run(
        [
            "bash",
            str(REPO_ROOT / "scripts" / "render_manifests.sh"),
            testbed.binary("helm"),
            str(tmp_path),
        ],
        check=True,
    )
    # Every committed file that says it comes from the chart is rendered, and nothing else:
    # an empty output (the script writing elsewhere) must fail, not pass vacuously.
    generated = sorted(
        path.name
        for path in (REPO_ROOT / "manifests").glob("*.yaml")
        if path.read_text().startswith("# Generated by `make generate` from charts/lmmr1")
    )
    assert generated == ["20-operator.yaml"]
    assert sorted(path.name for path in tmp_path.iterdir()) == generated
    for name in generated:
        rendered = (tmp_path / name).read_text()
        kinds = {doc["kind"] for doc in yaml.safe_load_all(rendered) if doc}
        assert {"Deployment", "ServiceAccount", "ClusterRole"} <= kinds, kinds
        assert (REPO_ROOT / "manifests" / name).read_text() == rendered, (
            f"manifests/{name} drifted from the chart: run `make generate`"
        )
