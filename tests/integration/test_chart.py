"""The Helm chart: renders what users expect (helm template), installs, upgrades and
uninstalls on the test bed, and grants the operator exactly what it needs."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
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
    helm("lint", "--strict", CHART, "--set", "watchNamespaces={team-a,team-b}")
    helm("lint", "--strict", CHART, "--set", "watchAllNamespaces=true")


def test_default_render_serves_the_release_namespace_hardened_and_complete(helm: Cli) -> None:
    docs = template(helm)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",  # kopf's discovery (read-only)
            "ClusterRoleBinding",
            "ClusterRole",  # users' rel-lmmr1-edit and rel-lmmr1-view, bound to no one
            "ClusterRole",
            "Role",  # the operator's, in the one namespace it serves: its own
            "RoleBinding",
            "Role",  # leader election
            "RoleBinding",
            "Service",
            "Deployment",
            "CustomResourceDefinition",
        ]
    )
    assert {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(docs, "Role")} == {
        ("ops", "rel-lmmr1-operator"),
        ("ops", "rel-lmmr1-operator-leader-election"),
    }
    assert_only_reads_are_cluster_wide(docs)
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
    assert scope_of(container) == (["--namespace=ops"], "ops", "false")
    crds = {doc["metadata"]["name"]: doc for doc in by_kind(docs, "CustomResourceDefinition")}
    assert crds["lmmr1runs.lmmr1.io"]["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep"
    }


def test_the_chart_crd_is_the_generated_crd(helm: Cli) -> None:
    docs = template(helm, "--show-only", "templates/crd-lmmr1runs.yaml")
    committed = yaml.safe_load((REPO_ROOT / "manifests" / "10-crd-lmmr1runs.yaml").read_text())
    assert docs[0]["spec"] == committed["spec"]


def scope_of(container: dict[str, Any]) -> tuple[list[str], str, str]:
    """kopf's namespace flags and the operator's two scope settings, as rendered."""
    flags = [a for a in container["command"] if a.startswith(("--namespace", "--all-namespaces"))]
    env = {e["name"]: e.get("value") for e in container["env"]}
    return flags, env["LMMR1_WATCH_NAMESPACES"], env["LMMR1_WATCH_ALL_NAMESPACES"]


def assert_only_reads_are_cluster_wide(docs: list[dict[str, Any]]) -> None:
    """The operator's ClusterRoleBindings grant it nothing but get/list/watch."""
    cluster_roles = {doc["metadata"]["name"]: doc for doc in by_kind(docs, "ClusterRole")}
    for binding in by_kind(docs, "ClusterRoleBinding"):
        rules = cluster_roles[binding["roleRef"]["name"]]["rules"]
        assert {verb for rule in rules for verb in rule["verbs"]} == {"get", "list", "watch"}
        assert {res for rule in rules for res in rule["resources"]} == {
            "customresourcedefinitions",
            "namespaces",
        }


def test_watch_namespaces_give_one_role_each_and_nothing_cluster_wide(helm: Cli) -> None:
    docs = template(helm, "--set", "watchNamespaces={team-a,team-b}")
    assert_only_reads_are_cluster_wide(docs)
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(docs, "Role")}
    # The runs' namespaces, and the Lease in the release's (which it does not serve).
    assert set(roles) == {
        ("team-a", "rel-lmmr1-operator"),
        ("team-b", "rel-lmmr1-operator"),
        ("ops", "rel-lmmr1-operator-leader-election"),
    }
    assert (
        roles["team-a", "rel-lmmr1-operator"]["rules"]
        == roles["team-b", "rel-lmmr1-operator"]["rules"]
    )
    assert {"leases"} == {
        res
        for rule in roles["ops", "rel-lmmr1-operator-leader-election"]["rules"]
        for res in rule["resources"]
    }
    bindings = {
        (b["metadata"]["namespace"], b["roleRef"]["kind"], b["roleRef"]["name"])
        for b in by_kind(docs, "RoleBinding")
    }
    assert ("team-a", "Role", "rel-lmmr1-operator") in bindings
    assert ("team-b", "Role", "rel-lmmr1-operator") in bindings
    container = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert scope_of(container) == (
        ["--namespace=team-a", "--namespace=team-b"],
        "team-a,team-b",
        "false",
    )


def test_cluster_wide_mode_is_an_explicit_opt_in_that_says_what_it_grants(helm: Cli) -> None:
    docs = template(helm, "--set", "watchAllNamespaces=true")
    # Only leader election stays namespaced.
    assert [r["metadata"]["name"] for r in by_kind(docs, "Role")] == [
        "rel-lmmr1-operator-leader-election"
    ]
    operator_role = next(
        r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"] == "rel-lmmr1-operator"
    )
    secrets_rule = next(r for r in operator_role["rules"] if r["resources"] == ["secrets"])
    assert secrets_rule["verbs"] == ["get", "create", "delete"]
    container = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert scope_of(container) == (["--all-namespaces"], "", "true")
    notes = helm("install", "rel", CHART, "--dry-run=client", "--set", "watchAllNamespaces=true")
    assert "WARNING: watchAllNamespaces=true" in notes.stdout
    assert "kube-system included" in notes.stdout


def test_user_roles_aggregate_into_the_built_in_roles(helm: Cli) -> None:
    docs = template(helm)
    roles = {doc["metadata"]["name"]: doc for doc in by_kind(docs, "ClusterRole")}
    edit, view = roles["rel-lmmr1-edit"], roles["rel-lmmr1-view"]
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    assert edit["metadata"]["labels"][aggregate + "edit"] == "true"
    assert edit["metadata"]["labels"][aggregate + "admin"] == "true"
    assert view["metadata"]["labels"][aggregate + "view"] == "true"
    assert {verb for rule in view["rules"] for verb in rule["verbs"]} == {"get", "list", "watch"}
    without = template(helm, "--set", "rbac.aggregateUserRoles=false")
    assert [r["metadata"]["name"] for r in by_kind(without, "ClusterRole")] == [
        "rel-lmmr1-operator-discovery"
    ]


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
        (["--set", "watchNamespaces={Team_A}"], "watchNamespaces/0"),
        (["--set", "watchNamespaces={a,a}"], "watchNamespaces"),
        (
            ["--set", "watchNamespace=team-a"],
            "watchNamespace was replaced by watchNamespaces, a list: set watchNamespaces={team-a}",
        ),
        (
            ["--set", "watchAllNamespaces=true", "--set", "watchNamespaces={team-a}"],
            "watchAllNamespaces=true serves every namespace: leave watchNamespaces empty",
        ),
        (["--set", "imageTypo=x"], "imageTypo"),
        (["--set", "health.port=9090"], "health.port and metrics.port must differ"),
    ],
)
def test_bad_values_fail_with_a_message_naming_them(
    helm: Cli, values: list[str], says: str
) -> None:
    with pytest.raises(RuntimeError, match=says.replace(".", r"\.")):
        template(helm, *values, check=False)


JOBSET_API = "jobset.x-k8s.io/v1alpha2/JobSet"
WORKLOAD_API = "kueue.x-k8s.io/v1beta2/Workload"


def test_kueue_enabled_names_the_jobset_and_kueue_apis_the_cluster_lacks(helm: Cli) -> None:
    """`helm install` fills .Capabilities from the cluster's discovery; `helm template` from
    --api-versions (the batch tests install with kueue.enabled against the real APIs)."""
    enabled = ("--set", "kueue.enabled=true")
    with pytest.raises(RuntimeError, match=r"JobSet v0\.11\.1 .*; Kueue v0\.17\.0 "):
        template(helm, *enabled, check=False)
    with pytest.raises(RuntimeError, match=r"does not serve: Kueue v0\.17\.0 or later"):
        template(helm, *enabled, "--api-versions", JOBSET_API, check=False)
    docs = template(helm, *enabled, "--api-versions", JOBSET_API, "--api-versions", WORKLOAD_API)
    assert by_kind(docs, "Deployment")


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
    assert kubectl("get", "role", deployment, check=False).returncode != 0
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
    # The JobSet path (spec.queueName): one JobSet per stage attempt, Kueue's Workload read.
    ("create", "jobsets.jobset.x-k8s.io"),
    ("delete", "jobsets.jobset.x-k8s.io"),
    ("watch", "jobsets.jobset.x-k8s.io"),
    ("watch", "workloads.kueue.x-k8s.io"),
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
    # Kueue owns its Workloads and a queued JobSet's suspend; JobSets are never updated.
    ("patch", "jobsets.jobset.x-k8s.io"),
    ("update", "workloads.kueue.x-k8s.io"),
    ("patch", "workloads.kueue.x-k8s.io/status"),
    ("create", "clusterqueues.kueue.x-k8s.io"),
]


def _review(kubectl: Cli, who: str, verb: str, resource: str, namespace: str) -> bool:
    """A SubjectAccessReview for `who` (a user, or a service account with the groups the API
    server gives one) doing `verb` on `resource` ("pods", "pods/exec",
    "jobsets.jobset.x-k8s.io": a group other than the core one is spelled out).

    Not `kubectl auth can-i`: that resolves the resource through discovery first, and
    answers "no" for a kind the cluster does not serve yet (JobSet and Kueue's kinds, before
    the batch tests install their CRDs), whatever RBAC grants."""
    resource, _, subresource = resource.partition("/")
    plural, _, group = resource.partition(".")
    groups = ["system:authenticated"]
    if who.startswith("system:serviceaccount:"):
        groups += ["system:serviceaccounts", f"system:serviceaccounts:{who.split(':')[2]}"]
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": who,
            "groups": groups,
            "resourceAttributes": {
                "namespace": namespace,
                "verb": verb,
                "group": group,
                "resource": plural,
                "subresource": subresource,
            },
        },
    }
    answer = kubectl("create", "-o", "json", "-f", "-", stdin=json.dumps(review)).stdout
    return bool(json.loads(answer)["status"].get("allowed"))


def can_i(kubectl: Cli, who: str, verb: str, resource: str, namespace: str) -> bool:
    return _review(kubectl, who, verb, resource, namespace)


def can_i_cluster_wide(kubectl: Cli, who: str, verb: str, resource: str) -> bool:
    """Whether `who` may do this in every namespace at once (a ClusterRole's grant)."""
    return _review(kubectl, who, verb, resource, "")


@pytest.fixture
def team_namespaces(namespace: str, testbed: TestBedState) -> Iterator[list[str]]:
    """Two namespaces for runs (team-a, team-b), besides the release's own."""
    teams = [f"{namespace}-a", f"{namespace}-b"]
    admin = Cli(testbed, "kubectl")
    for team in teams:
        admin("create", "namespace", team)
    yield teams
    for team in teams:
        admin("delete", "namespace", team, "--wait=false", check=False)


@pytest.mark.parametrize("watch_all", [False, True], ids=["listed-namespaces", "cluster-wide"])
def test_operator_rbac_is_least_privilege(
    helm: Cli, kubectl: Cli, namespace: str, team_namespaces: list[str], watch_all: bool
) -> None:
    release = f"r{secrets.token_hex(3)}"
    team_a, team_b = team_namespaces
    args = ["--set", "crds.enabled=false", "--set", "metrics.service.enabled=false"]
    if watch_all:
        args += ["--set", "watchAllNamespaces=true"]
    else:
        args += ["--set", f"watchNamespaces={{{team_a},{team_b}}}"]
    helm("install", release, CHART, *args)
    try:
        who = f"system:serviceaccount:{namespace}:{release}-lmmr1-operator"
        for served in team_namespaces:
            for verb, resource in ALLOWED:
                assert can_i(kubectl, who, verb, resource, served), f"cannot {verb} {resource}"
            for verb, resource in DENIED:
                assert not can_i(kubectl, who, verb, resource, served), f"can {verb} {resource}"

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
        # Outside the listed namespaces (kube-system, default, its own, any other): nothing.
        # Cluster-wide mode grants exactly what values.yaml and NOTES warn about.
        for elsewhere in ("kube-system", "default", namespace):
            for verb, resource in [
                ("create", "pods"),
                ("delete", "pods"),
                ("get", "secrets"),
                ("create", "secrets"),
                ("delete", "secrets"),
                ("watch", "lmmr1runs.lmmr1.io"),
                ("create", "roles.rbac.authorization.k8s.io"),
            ]:
                allowed = can_i(kubectl, who, verb, resource, elsewhere)
                assert allowed == watch_all, f"{verb} {resource} in {elsewhere}: {allowed}"
        for verb in ("get", "create", "delete"):
            assert can_i_cluster_wide(kubectl, who, verb, "secrets") == watch_all, verb
        assert can_i_cluster_wide(kubectl, who, "create", "pods") == watch_all
        # kopf's discovery reads stay cluster-wide in both modes.
        assert can_i_cluster_wide(
            kubectl, who, "watch", "customresourcedefinitions.apiextensions.k8s.io"
        )
    finally:
        helm("uninstall", release, check=False)


def test_namespace_editors_may_create_runs_and_viewers_only_read_them(
    helm: Cli, kubectl: Cli, wait: WaitFor, team_namespaces: list[str]
) -> None:
    """The chart's user roles aggregate into the built-in `edit` and `view` ClusterRoles: a
    RoleBinding to `edit` in team-a lets its user create runs there (and nowhere else), one
    to `view` lets its user read them only."""
    release = f"r{secrets.token_hex(3)}"
    team_a, team_b = team_namespaces
    helm(
        "install",
        release,
        CHART,
        "--set",
        "crds.enabled=false",
        "--set",
        f"watchNamespaces={{{team_a}}}",
    )
    editor, viewer = f"alice-{release}", f"bob-{release}"
    try:
        kubectl(
            "create",
            "rolebinding",
            "editors",
            "--clusterrole=edit",
            f"--user={editor}",
            "-n",
            team_a,
        )
        kubectl(
            "create",
            "rolebinding",
            "viewers",
            "--clusterrole=view",
            f"--user={viewer}",
            "-n",
            team_a,
        )

        def may(user: str, verb: str, where: str = team_a) -> bool:
            return can_i(kubectl, user, verb, "lmmr1runs.lmmr1.io", where)

        # The aggregation controller folds the new roles into edit/view asynchronously.
        wait("edit aggregates lmmr1runs", lambda: may(editor, "create"))
        for verb in ("create", "update", "patch", "delete", "get", "list", "watch"):
            assert may(editor, verb), f"an editor cannot {verb} runs"
        assert not can_i(kubectl, editor, "patch", "lmmr1runs.lmmr1.io/status", team_a)
        assert not may(editor, "create", team_b)  # the binding is team-a's only
        wait("view aggregates lmmr1runs", lambda: may(viewer, "list"))
        for verb in ("get", "list", "watch"):
            assert may(viewer, verb), f"a viewer cannot {verb} runs"
        for verb in ("create", "update", "patch", "delete"):
            assert not may(viewer, verb), f"a viewer can {verb} runs"
    finally:
        helm("uninstall", release, check=False)


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
