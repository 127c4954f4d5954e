"""The operator's Kubernetes client: `Kube` over informers (`lmmr1_operator.informer`).

It reads runs and children from the informers' stores, creates only what its cache lacks,
writes what it wrote through to the cache, and remembers Secrets for a while (it holds no
list/watch on them).
"""

from __future__ import annotations

import builtins
import copy
import logging
import threading
import time
from collections.abc import Callable

from kubernetes import client

from lmmr1_operator import kueue, naming
from lmmr1_operator.kube import Counted, CreateRefused, Kube, Obj, RateLimiter

log = logging.getLogger("lmmr1.kube")

# The kinds of children the operator creates, all labelled managed-by=lmmr1-operator: it
# lists and watches exactly these, and only its own. (Secrets are not among them: a watch
# of Secrets would need list/watch on every Secret of a served namespace.)
CACHED_KINDS = ("Pod", "Job", "ConfigMap", "Service", "NetworkPolicy", "Role", "RoleBinding")
SECRET_TTL_S = 60.0  # how long a Secret read stays good (its existence, the S3 keys)
MANAGED_SELECTOR = f"{naming.LABEL_MANAGED}={naming.MANAGER}"
# The JobSet path's kinds (runs with spec.queueName), cached only when their CRDs are
# installed when the operator starts; otherwise they are read from the API server (and a
# kind it does not serve reads as none: see kube.OPTIONAL_KINDS). Kueue's Workloads carry
# none of the operator's labels: every Kueue-made Workload (labelled with its job's UID) of
# the served namespaces is watched.
OPTIONAL_CACHED = {"JobSet": MANAGED_SELECTOR, "Workload": kueue.JOB_UID_LABEL}
# Why a trainer Job has no pods: the Job controller's FailedCreate Events (Pod Security, quota).
FAILED_CREATE_SELECTOR = "involvedObject.kind=Job,reason=FailedCreate"


class CachedKube(Kube):
    """Reads from informers; writes through to them. `on_change(obj)` is told of every
    change an informer sees (the operator queues the object's run)."""

    def __init__(
        self,
        api_client: client.ApiClient,
        identity: str,
        namespaces: tuple[str, ...] | None,
        on_change: Callable[[Obj], None],
        limiter: RateLimiter | None = None,
        on_call: Counted | None = None,
    ) -> None:
        from lmmr1_operator.informer import Informer, Store

        super().__init__(api_client, identity, limiter, on_call)

        def before_list_or_watch(kind: str) -> Callable[[], None]:
            def account() -> None:
                self._call("watch", kind)

            return account

        self.runs = Store()  # fed by the runs' watch (kopf's) through `saw_run`
        self.informers = {
            kind: Informer(
                self._resource(kind),
                self.dynamic.watch,
                namespaces,
                on_change,
                label_selector=MANAGED_SELECTOR,
                before_call=before_list_or_watch(kind),
            )
            for kind in CACHED_KINDS
        }
        for kind, selector in OPTIONAL_CACHED.items():
            if not self.serves(kind):
                log.info("%s is not served: read directly, only for runs with a queue", kind)
                continue
            self.informers[kind] = Informer(
                self._resource(kind),
                self.dynamic.watch,
                namespaces,
                on_change,
                label_selector=selector,
                before_call=before_list_or_watch(kind),
            )
        self.informers["Event"] = Informer(
            self._resource("Event"),
            self.dynamic.watch,
            namespaces,
            on_change,
            field_selector=FAILED_CREATE_SELECTOR,
            before_call=before_list_or_watch("Event"),
        )
        self._secrets: dict[tuple[str, str], tuple[float, Obj | None]] = {}
        self._secrets_lock = threading.Lock()

    def start(self, stopping: threading.Event) -> None:
        for informer in self.informers.values():
            informer.start(stopping)

    def wait_synced(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for informer in self.informers.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not informer.wait_synced(left):
                return False
        return True

    def saw_run(self, body: Obj) -> None:
        run = {"kind": "LMMR1Run", **body}
        run["metadata"] = {k: v for k, v in body["metadata"].items() if k != "managedFields"}
        self.runs.put(run)

    def forget_run(self, namespace: str, name: str, version: str | None) -> None:
        self.runs.remove(namespace, name, version)

    def _wrote(self, obj: Obj) -> None:
        obj = copy.deepcopy(obj)  # the caller keeps its own: later edits stay out of the cache
        obj["metadata"].pop("managedFields", None)  # as the informers keep objects
        if obj["kind"] == "LMMR1Run":
            self.runs.put(obj)
        elif obj["kind"] in self.informers:
            self.informers[obj["kind"]].store.put(obj)
        elif obj["kind"] == "Secret":  # one it just created: the next pass need not read it
            meta = obj["metadata"]
            self._remember_secret(meta["namespace"], meta["name"], obj)

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        if kind == "LMMR1Run":
            return self.runs.get(namespace, name)
        if kind in self.informers:
            return self.informers[kind].store.get(namespace, name)
        if kind == "Secret":
            held = self._remembered_secret(namespace, name)
            if held is not None:
                return held
            found = super().get(kind, namespace, name)
            self._remember_secret(namespace, name, found)
            return found
        return super().get(kind, namespace, name)

    def _remembered_secret(self, namespace: str, name: str) -> Obj | None:
        with self._secrets_lock:
            held = self._secrets.get((namespace, name))
        return copy.deepcopy(held[1]) if held is not None and held[0] > time.monotonic() else None

    def _remember_secret(self, namespace: str, name: str, found: Obj | None) -> None:
        """Remember a user's Secret (S3 keys), and one of the operator's while a run owns
        it; not an orphan of the operator's, which its user is about to delete (a run
        must see its name free again at once), nor a missing one."""
        meta = (found or {}).get("metadata") or {}
        ours = (meta.get("labels") or {}).get(naming.LABEL_MANAGED) == naming.MANAGER
        with self._secrets_lock:
            if found is None or (ours and not meta.get("ownerReferences")):
                self._secrets.pop((namespace, name), None)
            else:
                self._secrets[(namespace, name)] = (time.monotonic() + SECRET_TTL_S, found)

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> builtins.list[Obj]:
        if kind in self.informers:
            return self.informers[kind].store.list(namespace, labels)
        return super().list(kind, namespace, labels)

    def events(self, namespace: str, uid: str, reason: str) -> builtins.list[Obj]:
        if reason != "FailedCreate":
            return super().events(namespace, uid, reason)
        return [
            e
            for e in self.informers["Event"].store.list(namespace, {})
            if (e.get("involvedObject") or {}).get("uid") == uid
        ]

    def ensure(self, obj: Obj) -> bool:
        """Create `obj` only if the cache lacks it. A create the API server answers with
        AlreadyExists means the cache is behind or the name is someone else's: one GET
        tells which (another owner's object is reported as NameTaken)."""
        meta, kind = obj["metadata"], obj["kind"]
        namespace, name = meta["namespace"], meta["name"]
        owner = (meta.get("ownerReferences") or [{}])[0].get("uid")
        if kind in self.informers and self.get(kind, namespace, name):
            return False
        if kind == "Secret":
            # Only a remembered Secret of this owner saves the create: one remembered
            # as someone else's may have been deleted since (the create tells).
            held = self._remembered_secret(namespace, name)
            if held is not None and owner and naming.owned_by(held, owner):
                return False
        if super().ensure(obj):
            return True
        existing = Kube.get(self, kind, namespace, name)
        if kind == "Secret":
            self._remember_secret(namespace, name, existing)
        if existing is not None and owner and not naming.owned_by(existing, owner):
            raise CreateRefused(kind, name, "NameTaken", naming.name_taken(existing))
        if existing is not None and kind in self.informers:
            self._wrote({"kind": kind, **existing})
        return False

    def replace(self, obj: Obj) -> None:
        meta = obj["metadata"]
        held = self.get(obj["kind"], meta["namespace"], meta["name"])
        owner = meta["ownerReferences"][0]["uid"]
        unchanged = held is not None and held.get("data") == obj.get("data")
        if unchanged and held is not None and naming.owned_by(held, owner):
            return  # already what it should be
        super().replace(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        super().delete(kind, namespace, name)
        if kind == "Secret":
            self._remember_secret(namespace, name, None)
