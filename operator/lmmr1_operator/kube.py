"""The operator's one I/O module for Kubernetes: create-if-absent, replace, delete and list
objects given as plain dicts, through the kubernetes dynamic client.

`Kube` asks the API server every time (tests, tools). `CachedKube` is what the operator
runs: it reads runs and children from informers (`lmmr1_operator.informer`), creates only
what its cache lacks, writes what it wrote through to the cache, and paces every call it
makes with a client-side rate limit (client-go's QPS and burst).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

from lmmr1_operator import naming

Obj = dict[str, Any]
log = logging.getLogger("lmmr1.kube")

# kind -> apiVersion, for every kind the operator touches.
API_VERSIONS: dict[str, str] = {
    "Pod": "v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Job": "batch/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
    "LMMR1Run": "lmmr1.io/v1alpha1",
    "Event": "v1",
}
MERGE_PATCH = "application/merge-patch+json"


class CreateRefused(Exception):
    """The API server refused to create an object for good (admission, quota, validation,
    RBAC): a 4xx other than 409 AlreadyExists and 429 TooManyRequests."""

    def __init__(self, kind: str, name: str, reason: str, message: str) -> None:
        super().__init__(f"{kind} {name}: {reason}: {message}")
        self.kind, self.name, self.reason, self.message = kind, name, reason, message


def refusal(obj: Obj, err: ApiException) -> CreateRefused | None:
    """What a failed create says, or None when retrying may help (5xx, 429) or the object
    exists (409). The message is the API server's Status message (which admission plugin
    or quota refused it, and why)."""
    status = int(err.status or 0)
    if not 400 <= status < 500 or status in (409, 429):
        return None
    reason, message = str(err.reason or status), ""
    try:
        body = json.loads(err.body or "{}")
        reason = str(body.get("reason") or reason)
        message = str(body.get("message") or "")
    except (TypeError, ValueError):
        message = str(err.body or "")
    return CreateRefused(obj["kind"], obj["metadata"]["name"], reason, message or reason)


class RateLimiter:
    """A token bucket: `qps` calls a second on average, bursts of up to `burst`."""

    def __init__(self, qps: float, burst: int) -> None:
        self._qps, self._burst = qps, float(burst)
        self._tokens, self._at = float(burst), time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._qps)
            self._at = now
            self._tokens -= 1
            wait = -self._tokens / self._qps if self._tokens < 0 else 0.0
        if wait:
            time.sleep(wait)  # the token is taken: later callers queue behind this one


Counted = Callable[[str, str], None]  # (verb, kind): every API call made


class Kube:
    def __init__(
        self,
        api_client: client.ApiClient,
        identity: str = "lmmr1-operator",
        limiter: RateLimiter | None = None,
        on_call: Counted | None = None,
    ) -> None:
        self.identity = identity
        self.dynamic = dynamic.DynamicClient(api_client)  # type: ignore[no-untyped-call]
        self._resources: dict[str, Any] = {}
        self._limiter = limiter
        self._on_call = on_call or (lambda verb, kind: None)

    def _call(self, verb: str, kind: str) -> Any:
        """Account for one API call (rate limit, metric) and return the kind's resource."""
        if self._limiter is not None:
            self._limiter.acquire()
        self._on_call(verb, kind)
        return self._resource(kind)

    def _wrote(self, obj: Obj) -> None:
        """What the API server returned for a write of ours (the cache keeps it)."""

    def _resource(self, kind: str) -> Any:
        if kind not in self._resources:
            self._resources[kind] = self.dynamic.resources.get(
                api_version=API_VERSIONS[kind], kind=kind
            )
        return self._resources[kind]

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            found = self._call("get", kind).get(name=name, namespace=namespace)
        except NotFoundError:
            return None
        return dict(found.to_dict())

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[Obj]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        found = self._call("list", kind).get(namespace=namespace, label_selector=selector)
        return list(found.to_dict().get("items", []))

    def ensure(self, obj: Obj) -> bool:
        """Create `obj` unless an object of that name exists. True if it created it; raises
        CreateRefused when the API server refuses it for good."""
        meta = obj["metadata"]
        try:
            created = self._call("create", obj["kind"]).create(
                body=obj, namespace=meta["namespace"]
            )
        except ConflictError:  # exists, or is still terminating: the next pass sees which
            return False
        except ApiException as err:
            refused = refusal(obj, err)
            if refused is None:
                raise
            raise refused from err
        log.info("created %s %s/%s", obj["kind"], meta["namespace"], meta["name"])
        self._wrote({"kind": obj["kind"], **created.to_dict()})
        return True

    def replace(self, obj: Obj) -> None:
        """Create `obj`, or overwrite an existing object's `data` with it: only an object of
        the same owner (raises CreateRefused, reason NameTaken, for anyone else's)."""
        meta = obj["metadata"]
        if self.ensure(obj):
            return
        existing = self.get(obj["kind"], meta["namespace"], meta["name"])
        owner = meta["ownerReferences"][0]["uid"]
        if existing is not None and not naming.owned_by(existing, owner):
            raise CreateRefused(obj["kind"], meta["name"], "NameTaken", naming.name_taken(existing))
        patched = self._call("patch", obj["kind"]).patch(
            name=meta["name"],
            namespace=meta["namespace"],
            body={"data": obj.get("data")},
            content_type=MERGE_PATCH,
        )
        log.info("updated %s %s/%s", obj["kind"], meta["namespace"], meta["name"])
        self._wrote({"kind": obj["kind"], **patched.to_dict()})

    def events(self, namespace: str, uid: str, reason: str) -> builtins.list[Obj]:
        """The core/v1 Events about the object with this uid, with this reason."""
        found = self._call("list", "Event").get(
            namespace=namespace, field_selector=f"involvedObject.uid={uid},reason={reason}"
        )
        return list(found.to_dict().get("items", []))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            self._call("delete", kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )

    def patch_status(
        self, namespace: str, name: str, status: Obj, resource_version: str | None = None
    ) -> str | None:
        """Merge-patch the run's status; with `resource_version`, only if the run is still
        at that version (else kubernetes.dynamic.exceptions.ConflictError). The run's new
        resourceVersion."""
        body: Obj = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        patched = self._call("patch", "LMMR1Run").status.patch(
            name=name, namespace=namespace, body=body, content_type=MERGE_PATCH
        )
        self._wrote({"kind": "LMMR1Run", **patched.to_dict()})
        return str(patched.metadata.resourceVersion)

    def delete_run(self, namespace: str, name: str) -> None:
        self.delete("LMMR1Run", namespace, name)

    def post_event(self, run: Obj, kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the run (what `kubectl describe lmmr1run` shows). Best-effort:
        an Event that cannot be written is logged, never fatal."""
        meta = run["metadata"]
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": run["apiVersion"],
                "kind": run["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "lmmr1-operator"},
            "reportingComponent": "lmmr1.io/operator",
            "reportingInstance": self.identity,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._call("create", "Event").create(body=event, namespace=meta["namespace"])
        except Exception as err:
            log.warning(
                "could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], err
            )


# The kinds of children the operator creates, all labelled managed-by=lmmr1-operator: it
# lists and watches exactly these, and only its own. (Secrets are not among them: a watch
# of Secrets would need list/watch on every Secret of a served namespace.)
CACHED_KINDS = ("Pod", "Job", "ConfigMap", "Service", "NetworkPolicy", "Role", "RoleBinding")
SECRET_TTL_S = 60.0  # how long a Secret read stays good (its existence, the S3 keys)
MANAGED_SELECTOR = f"{naming.LABEL_MANAGED}={naming.MANAGER}"
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
        return held[1] if held is not None and held[0] > time.monotonic() else None

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
