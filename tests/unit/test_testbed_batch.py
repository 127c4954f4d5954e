"""The test bed's rewrite of upstream webhook manifests for controllers run outside the
cluster (lmmr1_testbed.batch): what it keeps, where it points them, what it narrows."""

from __future__ import annotations

import yaml

from lmmr1_testbed.batch import JOBSET_POD_SELECTOR, KUEUE_WEBHOOK_PATHS, webhook_configurations


def _webhook(name: str, path: str) -> dict[str, object]:
    return {
        "admissionReviewVersions": ["v1"],
        "clientConfig": {
            "service": {"name": "webhook-service", "namespace": "system", "path": path}
        },
        "failurePolicy": "Fail",
        "name": name,
        "sideEffects": "None",
    }


# The shape of the manifests controller-gen writes (both modules' config/components/webhook).
UPSTREAM = yaml.safe_dump_all(
    [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "mutating-webhook-configuration"},
            "webhooks": [
                _webhook("mjob.kb.io", "/mutate-batch-v1-job"),
                _webhook("mpod.kb.io", "/mutate--v1-pod"),
                _webhook("mworkload.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-workload"),
                _webhook("mrayjob.kb.io", "/mutate-ray-io-v1-rayjob"),
            ],
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "validating-webhook-configuration"},
            "webhooks": [_webhook("vrayjob.kb.io", "/validate-ray-io-v1-rayjob")],
        },
    ]
)


def test_only_enabled_integrations_webhooks_are_kept_and_pointed_at_loopback() -> None:
    configurations = webhook_configurations(
        UPSTREAM,
        prefix="kueue",
        base_url="https://127.0.0.1:9443",
        ca_bundle="Q0E=",
        keep=lambda path: any(part in path for part in KUEUE_WEBHOOK_PATHS),
        pod_selector=None,
    )
    # A configuration left with no webhook (Ray only) is not installed at all.
    assert [c["metadata"] for c in configurations] == [
        {"name": "kueue-mutating-webhook-configuration"}
    ]
    webhooks = configurations[0]["webhooks"]
    assert [w["name"] for w in webhooks] == ["mjob.kb.io", "mworkload.kb.io"]
    assert webhooks[0]["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate-batch-v1-job",
        "caBundle": "Q0E=",
    }
    assert all("objectSelector" not in w for w in webhooks)


def test_pod_webhooks_are_narrowed_to_the_controllers_own_pods() -> None:
    configurations = webhook_configurations(
        UPSTREAM,
        prefix="jobset",
        base_url="https://127.0.0.1:9444",
        ca_bundle="Q0E=",
        keep=lambda path: "ray" not in path,
        pod_selector=JOBSET_POD_SELECTOR,
    )
    by_name = {w["name"]: w for c in configurations for w in c["webhooks"]}
    # Upstream's kustomize patch does the same: a failing JobSet webhook must not refuse
    # every pod in the cluster, only a JobSet's.
    assert by_name["mpod.kb.io"]["objectSelector"] == JOBSET_POD_SELECTOR
    assert "objectSelector" not in by_name["mjob.kb.io"]
