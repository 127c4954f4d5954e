"""Informers: a list-then-watch of one kind in the served namespaces, with a server-side
label (or field) selector, kept in memory so a reconcile reads its children from here and
not from the API server (client-go's shared informers, which controller-runtime's cache
and KubeRay are built on).

Only the operator's own objects are listed and watched (`app.kubernetes.io/managed-by=
lmmr1-operator`): the API server filters, so the operator never receives the rest of a
busy namespace's pods, as kopf's client-side label filters did.

A watch that ends (the server's timeout, a dropped connection) resumes from the last
resourceVersion it saw (bookmarks keep that fresh); one the server has expired (410 Gone)
lists again. Every change is handed to `on_change`, which queues the object's run.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.exceptions import ApiException

from lmmr1_operator import naming

Obj = dict[str, Any]
log = logging.getLogger("lmmr1.informer")

WATCH_TIMEOUT_S = 300  # the API server ends a watch after this; it is resumed at once
RETRY_S = (1, 2, 5, 10, 30)  # back-off between failed lists/watches


def _version(obj: Obj) -> int | None:
    try:
        return int(obj["metadata"].get("resourceVersion") or "")
    except (TypeError, ValueError):
        return None


def _trimmed(obj: Obj) -> Obj:
    """What the cache keeps of an object: all of it but `metadata.managedFields` (server-side
    apply's bookkeeping, often the biggest part of a pod and never read by the operator;
    client-go's informers drop it with a transform for the same reason)."""
    obj["metadata"].pop("managedFields", None)
    return obj


def _matches(obj: Obj, labels: dict[str, str]) -> bool:
    have = obj["metadata"].get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class Store:
    """Objects of one kind by (namespace, name), indexed by their run's label; thread-safe.

    `put` ignores an object older than the one held (by resourceVersion, an etcd revision
    on every API server): the operator writes what it created or patched through to the
    store, and a watch event from before such a write must not undo it. For the same
    reason a deletion leaves a tombstone, so that a write-through arriving after the
    deletion's event cannot bring the object back.

    `get` and `list` hand out deep copies, as controller-runtime's cache reader does: a
    caller that edits what it read (a builder filling in a patch, a test) must not change
    what every later reconcile sees, and that bug would show only under concurrency."""

    TOMBSTONES = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], Obj] = {}
        self._by_run: dict[tuple[str, str], set[str]] = {}
        self._deleted: dict[tuple[str, str], int] = {}  # key -> the deletion's version

    @staticmethod
    def _run(obj: Obj) -> str:
        return str((obj["metadata"].get("labels") or {}).get(naming.LABEL_RUN) or "")

    def put(self, obj: Obj) -> bool:
        """Hold `obj`; False if an object of a later version is held already."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        new = _version(obj)
        with self._lock:
            gone = self._deleted.get(key)
            if gone is not None and new is not None and new <= gone:
                return False
            self._deleted.pop(key, None)
            held = self._objects.get(key)
            if held is not None:
                old = _version(held)
                if old is not None and new is not None and new < old:
                    return False
                self._unindex(key, held)
            self._objects[key] = obj
            self._by_run.setdefault((key[0], self._run(obj)), set()).add(key[1])
            return True

    def remove(self, namespace: str, name: str, version: str | None = None) -> Obj | None:
        """Drop an object; `version` is its deletion's resourceVersion (a tombstone)."""
        with self._lock:
            held = self._objects.pop((namespace, name), None)
            if held is not None:
                self._unindex((namespace, name), held)
            deleted = _version({"metadata": {"resourceVersion": version}})
            if deleted is not None:
                self._deleted[(namespace, name)] = deleted
                if len(self._deleted) > self.TOMBSTONES:
                    del self._deleted[next(iter(self._deleted))]
            return held

    def _unindex(self, key: tuple[str, str], obj: Obj) -> None:
        names = self._by_run.get((key[0], self._run(obj)))
        if names is not None:
            names.discard(key[1])
            if not names:
                del self._by_run[(key[0], self._run(obj))]

    def replace(self, namespace: str | None, objects: Iterable[Obj]) -> list[Obj]:
        """Hold exactly `objects` for `namespace` (None: all); what was dropped."""
        fresh = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objects}
        with self._lock:
            gone = [
                key
                for key in self._objects
                if (namespace is None or key[0] == namespace) and key not in fresh
            ]
        dropped = [d for d in (self.remove(*key) for key in gone) if d is not None]
        for obj in fresh.values():
            self.put(obj)
        return dropped

    def get(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            held = self._objects.get((namespace, name))
        return copy.deepcopy(held) if held is not None else None

    def list(self, namespace: str, labels: dict[str, str]) -> list[Obj]:
        with self._lock:
            run = labels.get(naming.LABEL_RUN)
            if run is not None:
                names = self._by_run.get((namespace, run), set())
                candidates = [self._objects[(namespace, n)] for n in names]
            else:
                candidates = [o for (ns, _), o in self._objects.items() if ns == namespace]
        return [copy.deepcopy(o) for o in candidates if _matches(o, labels)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._objects)


class Informer:
    """Keeps `store` equal to the API server's objects of one kind, per served namespace
    (`namespaces` None: cluster-wide), one thread each."""

    def __init__(
        self,
        resource: Any,  # a kubernetes.dynamic Resource
        watch: Callable[..., Iterable[dict[str, Any]]],  # DynamicClient.watch
        namespaces: tuple[str, ...] | None,
        on_change: Callable[[Obj], None],
        label_selector: str | None = None,
        field_selector: str | None = None,
        before_call: Callable[[], None] = lambda: None,
    ) -> None:
        self.kind = str(resource.kind)
        self.store = Store()
        self._resource, self._watch = resource, watch
        self._namespaces: list[str | None] = list(namespaces) if namespaces else [None]
        self._on_change = on_change
        self._selectors = {"label_selector": label_selector, "field_selector": field_selector}
        self._before_call = before_call
        self._listed: set[str | None] = set()
        self._synced = threading.Event()
        self._lock = threading.Lock()

    def start(self, stopping: threading.Event) -> None:
        for namespace in self._namespaces:
            threading.Thread(
                target=self._run,
                args=(namespace, stopping),
                name=f"informer-{self.kind}-{namespace or 'all'}",
                daemon=True,
            ).start()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once every namespace has been listed once."""
        return self._synced.wait(timeout)

    def _run(self, namespace: str | None, stopping: threading.Event) -> None:
        failures = 0
        version: str | None = None
        while not stopping.is_set():
            try:
                if version is None:
                    version = self._list(namespace)
                version = self._follow(namespace, version, stopping)
                failures = 0
            except _Expired:
                version = None  # list again: the server no longer has that version
            except ApiException as err:
                if err.status == 410:
                    version = None
                    continue
                failures = self._failed(namespace, err, failures, stopping)
                version = None
            except Exception as err:  # API server away or restarting: retry, then relist
                failures = self._failed(namespace, err, failures, stopping)
                version = None

    def _failed(
        self, namespace: str | None, err: Exception, failures: int, stopping: threading.Event
    ) -> int:
        wait = RETRY_S[min(failures, len(RETRY_S) - 1)]
        log.warning("%s informer (%s): %s; again in %ss", self.kind, namespace or "*", err, wait)
        stopping.wait(wait)
        return failures + 1

    def _list(self, namespace: str | None) -> str:
        self._before_call()
        found = self._resource.get(namespace=namespace, **self._selectors).to_dict()
        items: list[Obj] = []
        for item in found.get("items", []):
            item.setdefault("kind", self.kind)
            items.append(_trimmed(item))
        dropped = self.store.replace(namespace, items)
        with self._lock:
            self._listed.add(namespace)
            if len(self._listed) == len(self._namespaces):
                self._synced.set()
        for obj in [*items, *dropped]:
            self._on_change(obj)
        return str(found["metadata"]["resourceVersion"])

    def _follow(self, namespace: str | None, version: str, stopping: threading.Event) -> str:
        """Apply watch events from `version` until the watch ends; the last version seen."""
        self._before_call()
        for event in self._watch(
            self._resource,
            namespace=namespace,
            resource_version=version,
            timeout=WATCH_TIMEOUT_S,
            allow_watch_bookmarks=True,
            **self._selectors,
        ):
            if stopping.is_set():
                break
            kind, obj = event["type"], event["raw_object"]
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Expired()
                raise ApiException(status=obj.get("code"), reason=obj.get("message"))
            version = obj["metadata"].get("resourceVersion") or version
            if kind == "BOOKMARK":
                continue
            obj.setdefault("kind", self.kind)
            _trimmed(obj)
            if kind == "DELETED":
                meta = obj["metadata"]
                self.store.remove(meta["namespace"], meta["name"], meta.get("resourceVersion"))
            else:
                self.store.put(obj)
            self._on_change(obj)
        return version


class _Expired(Exception):
    """410 Gone: the watch's resourceVersion is older than the server keeps."""
