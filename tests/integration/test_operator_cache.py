"""The operator's informer cache against the test bed's real API server: it holds only the
operator's own objects (the server filters by label), follows creates and deletes, answers
reads with no API call, creates only what it lacks, and sees a name taken by an object
it does not watch."""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes import config as kube_config

from lmmr1_operator import naming
from lmmr1_operator.cached_kube import CachedKube
from lmmr1_operator.kube import CreateRefused
from lmmr1_testbed.layout import TestBedState

Obj = dict[str, Any]


def until(check: Callable[[], object], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Bed:
    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.calls: Counter[tuple[str, str]] = Counter()
        self.changed: list[str] = []
        self.stopping = threading.Event()
        self.kube = CachedKube(
            api_client,
            "cache-test",
            (namespace,),
            lambda obj: self.changed.append(obj["metadata"]["name"]),
            on_call=lambda verb, kind: self.calls.update([(verb, kind)]),
        )

    def configmap(self, name: str, managed: bool, owner: Obj | None = None) -> Obj:
        labels = naming.run_labels("r") if managed else {"app": "someone-else"}
        meta: Obj = {"name": name, "namespace": self.namespace, "labels": labels}
        if owner is not None:
            meta["ownerReferences"] = [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": owner["metadata"]["name"],
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                }
            ]
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}}


@pytest.fixture
def bed(testbed: TestBedState) -> Iterator[Bed]:
    api_client = kube_config.new_client_from_config(config_file=testbed.kubeconfig)  # type: ignore[no-untyped-call]
    namespace = f"cache-{secrets.token_hex(3)}"
    core = client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": namespace}})
    made = Bed(api_client, namespace)
    made.kube.start(made.stopping)
    assert made.kube.wait_synced(30)
    yield made
    made.stopping.set()
    core.delete_namespace(namespace)
    api_client.close()


def test_the_cache_holds_only_the_operators_objects_and_follows_them(bed: Bed) -> None:
    bed.core.create_namespaced_config_map(bed.namespace, bed.configmap("ours", managed=True))
    bed.core.create_namespaced_config_map(bed.namespace, bed.configmap("theirs", managed=False))
    until(lambda: bed.kube.get("ConfigMap", bed.namespace, "ours"))
    assert "ours" in bed.changed
    bed.core.delete_namespaced_config_map("ours", bed.namespace)
    until(lambda: bed.kube.get("ConfigMap", bed.namespace, "ours") is None)
    assert bed.changed.count("ours") >= 2  # created, deleted
    # The API server filtered: the other ConfigMap never reached the operator.
    assert "theirs" not in bed.changed
    assert bed.kube.get("ConfigMap", bed.namespace, "theirs") is None
    # Reads came from the cache: no get or list of ConfigMaps was sent.
    assert not {k for k in bed.calls if k[1] == "ConfigMap" and k[0] in ("get", "list")}


def test_only_what_the_cache_lacks_is_created_and_a_write_is_seen_at_once(bed: Bed) -> None:
    owner = bed.core.create_namespaced_config_map(
        bed.namespace, bed.configmap("owner", managed=False)
    ).to_dict()
    child = bed.configmap("child", managed=True, owner=owner)
    assert bed.kube.ensure(child)
    # Written through: a pass right after the create sees it, before its watch event.
    assert bed.kube.get("ConfigMap", bed.namespace, "child") is not None
    before = sum(bed.calls.values())
    for _ in range(20):
        assert not bed.kube.ensure(child)
        bed.kube.replace(child)  # same data: nothing to write
    assert sum(bed.calls.values()) == before
    assert bed.calls[("create", "ConfigMap")] == 1


def test_a_name_taken_by_an_object_the_cache_does_not_hold_is_reported(bed: Bed) -> None:
    owner = bed.core.create_namespaced_config_map(
        bed.namespace, bed.configmap("owner2", managed=False)
    ).to_dict()
    bed.core.create_namespaced_config_map(bed.namespace, bed.configmap("taken", managed=False))
    with pytest.raises(CreateRefused) as refused:
        bed.kube.ensure(bed.configmap("taken", managed=True, owner=owner))
    assert refused.value.reason == "NameTaken"
    assert "taken already exists and is not this run's" in refused.value.message


def test_failed_create_events_of_jobs_are_watched_by_reason(bed: Bed) -> None:
    def event(name: str, reason: str, kind: str) -> Obj:
        return {
            "metadata": {"name": name, "namespace": bed.namespace},
            "involvedObject": {"kind": kind, "name": "j", "namespace": bed.namespace, "uid": "u1"},
            "reason": reason,
            "message": "pods is forbidden: violates PodSecurity",
            "type": "Warning",
        }

    bed.core.create_namespaced_event(bed.namespace, event("e1", "FailedCreate", "Job"))
    bed.core.create_namespaced_event(bed.namespace, event("e2", "Scheduled", "Pod"))
    until(lambda: bed.kube.events(bed.namespace, "u1", "FailedCreate"))
    found = bed.kube.events(bed.namespace, "u1", "FailedCreate")
    assert [e["metadata"]["name"] for e in found] == ["e1"]
    assert "e2" not in bed.changed


def test_a_secret_the_operator_created_is_not_read_back(bed: Bed) -> None:
    owner = bed.core.create_namespaced_config_map(
        bed.namespace, bed.configmap("secret-owner", managed=False)
    ).to_dict()
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            **bed.configmap("token", managed=True, owner=owner)["metadata"],
        },
        "stringData": {"token": "t0k3n"},
    }
    assert bed.kube.ensure(secret)
    # The next passes read it (the token for the run's config) and ensure it: no call.
    before = sum(bed.calls.values())
    for _ in range(5):
        held = bed.kube.get("Secret", bed.namespace, "token")
        assert held is not None and naming.owned_by(held, owner["metadata"]["uid"])
        assert not bed.kube.ensure(secret)
    assert sum(bed.calls.values()) == before, bed.calls
    # Deleted by the operator: forgotten at once, so the next pass creates it again.
    bed.kube.delete("Secret", bed.namespace, "token")
    assert bed.kube.ensure(secret)
