"""The informers' store (versions, tombstones, the run index) and the list-then-watch loop:
resuming a watch from its last version, listing again after 410 Gone, and telling the
operator of objects that went while it was not watching.

The loop is driven by a scripted resource here; tests/integration/test_operator_cache.py
runs it against the real API server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

from lmmr1_operator.informer import Informer, Store

Obj = dict[str, Any]


def obj(name: str, version: int, run: str = "r", namespace: str = "ns", **labels: str) -> Obj:
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": str(version),
            "labels": {"lmmr1.io/run": run, **labels},
        },
    }


def test_an_older_version_never_replaces_a_newer_one() -> None:
    store = Store()
    assert store.put(obj("a", 5))
    assert not store.put(obj("a", 4))  # a watch event from before a write-through
    assert store.get("ns", "a")["metadata"]["resourceVersion"] == "5"
    assert store.put(obj("a", 6))


def test_what_a_reader_edits_is_its_own_copy_not_the_cache() -> None:
    store = Store()
    store.put(obj("a", 5, role="trainer"))
    read = store.get("ns", "a")
    assert read is not None
    read["metadata"]["labels"]["role"] = "edited"
    store.list("ns", {"lmmr1.io/run": "r"})[0]["metadata"]["resourceVersion"] = "99"
    held = store.get("ns", "a")
    assert held is not None
    assert held["metadata"]["labels"]["role"] == "trainer"
    assert held["metadata"]["resourceVersion"] == "5"


def test_a_deleted_object_is_not_brought_back_by_a_late_write_through() -> None:
    store = Store()
    store.put(obj("a", 5))
    store.remove("ns", "a", "7")
    assert not store.put(obj("a", 5))  # what a create returned, after the deletion's event
    assert store.get("ns", "a") is None
    assert store.put(obj("a", 9))  # created again later


def test_lists_by_run_and_labels_and_the_index_follows_relabelling() -> None:
    store = Store()
    store.put(obj("a", 1, run="r1", role="rollout"))
    store.put(obj("b", 2, run="r1", role="trainer"))
    store.put(obj("c", 3, run="r2", role="rollout"))
    store.put(obj("d", 4, run="r1", namespace="other", role="rollout"))
    names = [o["metadata"]["name"] for o in store.list("ns", {"lmmr1.io/run": "r1"})]
    assert sorted(names) == ["a", "b"]
    rollout = {"role": "rollout"}
    assert [o["metadata"]["name"] for o in store.list("ns", {"lmmr1.io/run": "r1", **rollout})] == [
        "a"
    ]
    assert sorted(o["metadata"]["name"] for o in store.list("ns", rollout)) == ["a", "c"]
    store.put(obj("a", 5, run="r2", role="rollout"))
    assert [o["metadata"]["name"] for o in store.list("ns", {"lmmr1.io/run": "r1"})] == ["b"]
    assert len(store) == 4


class _Listed:
    def __init__(self, items: list[Obj], version: str) -> None:
        self._body = {"items": items, "metadata": {"resourceVersion": version}}

    def to_dict(self) -> Obj:
        return {"items": [dict(i) for i in self._body["items"]], "metadata": self._body["metadata"]}


class ScriptedServer:
    """Answers lists and watches from a script; records the versions watched from."""

    kind = "Pod"

    def __init__(self) -> None:
        self.lists: list[list[Obj]] = []
        self.watches: list[list[dict[str, Any]] | ApiException] = []
        self.watched_from: list[str] = []
        self.selectors: list[Obj] = []
        self.done = threading.Event()

    def get(self, namespace: str | None, **selectors: Any) -> _Listed:
        self.selectors.append(selectors)
        items = self.lists.pop(0)
        version = max((int(i["metadata"]["resourceVersion"]) for i in items), default=1)
        return _Listed(items, str(version))

    def watch(self, resource: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.watched_from.append(kwargs["resource_version"])
        if not self.watches:
            self.done.set()
            time.sleep(0.05)
            return
        script = self.watches.pop(0)
        if isinstance(script, ApiException):
            raise script
        yield from script


def test_the_watch_resumes_from_its_last_version_and_lists_again_after_410() -> None:
    server = ScriptedServer()
    server.lists = [[obj("a", 3), obj("b", 4)], [obj("b", 12), obj("c", 11)]]
    server.watches = [
        [
            {"type": "MODIFIED", "raw_object": obj("a", 6)},
            {"type": "BOOKMARK", "raw_object": {"metadata": {"resourceVersion": "8"}}},
        ],
        [{"type": "DELETED", "raw_object": obj("a", 9)}],
        ApiException(status=410, reason="Expired: too old resource version"),
    ]
    changed: list[str] = []
    informer = Informer(
        server,
        server.watch,
        ("ns",),
        lambda o: changed.append(o["metadata"]["name"]),
        label_selector="app.kubernetes.io/managed-by=lmmr1-operator",
    )
    stopping = threading.Event()
    informer.start(stopping)
    assert informer.wait_synced(5)
    assert server.done.wait(5)
    stopping.set()
    # The first watch from the list's version; the next from the bookmark's; after 410 a
    # new list, then a watch from its version.
    assert server.watched_from[:4] == ["4", "8", "9", "12"]
    assert server.selectors[0]["label_selector"] == "app.kubernetes.io/managed-by=lmmr1-operator"
    store = informer.store
    assert store.get("ns", "a") is None and store.get("ns", "c") is not None
    assert store.get("ns", "b")["metadata"]["resourceVersion"] == "12"
    # Every change was told, the relisted ones included.
    assert changed[:4] == ["a", "b", "a", "a"] and {"b", "c"} <= set(changed[4:])


def test_an_object_deleted_while_the_watch_was_down_is_told_on_the_next_list() -> None:
    server = ScriptedServer()
    server.lists = [[obj("a", 3), obj("b", 4)], [obj("b", 4)]]
    server.watches = [ApiException(status=410, reason="Expired")]
    gone: list[str] = []
    informer = Informer(server, server.watch, ("ns",), lambda o: gone.append(o["metadata"]["name"]))
    stopping = threading.Event()
    informer.start(stopping)
    assert server.done.wait(5)
    stopping.set()
    assert informer.store.get("ns", "a") is None
    assert gone.count("a") == 2  # listed once, then told it is gone
