"""The operator's one I/O module for Kubernetes: create-if-absent, replace, delete and list
objects given as plain dicts, through the kubernetes dynamic client.

`Kube` asks the API server every time (tests, tools), and paces every call it makes with a
client-side rate limit (client-go's QPS and burst). What the operator runs is its cached
subclass, `lmmr1_operator.cached_kube.CachedKube`.
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
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError, ResourceNotFoundError

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
    # Only runs with spec.queueName use these (docs/design.md, "The JobSet path").
    "JobSet": "jobset.x-k8s.io/v1alpha2",
    "Workload": "kueue.x-k8s.io/v1beta2",
}
# Kinds whose CRDs a cluster may lack (JobSet, Kueue): reading one answers "none", deleting
# one does nothing, and creating one is refused with reason NotFound, never an exception
# that would fail every pass of a run that does not use them.
OPTIONAL_KINDS = frozenset({"JobSet", "Workload"})
# How long a kind the API server did not serve is taken as absent before discovery is asked
# again (a miss makes the dynamic client read the whole discovery document).
MISSING_KIND_RETRY_S = 60.0
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


def _not_served(obj: Obj) -> CreateRefused:
    return CreateRefused(
        obj["kind"],
        obj["metadata"]["name"],
        "NotFound",
        f"the server does not serve {obj['apiVersion']} {obj['kind']}",
    )


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
        self._missing: dict[str, float] = {}  # optional kind -> when to look for it again
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
            if time.monotonic() < self._missing.get(kind, 0.0):
                raise ResourceNotFoundError(f"{API_VERSIONS[kind]} {kind} is not served")
            try:
                self._resources[kind] = self.dynamic.resources.get(
                    api_version=API_VERSIONS[kind], kind=kind
                )
            except ResourceNotFoundError:
                if kind in OPTIONAL_KINDS:
                    self._missing[kind] = time.monotonic() + MISSING_KIND_RETRY_S
                raise
        return self._resources[kind]

    def _still_served(self, kind: str) -> bool:
        """Discovery read afresh: whether `kind` is still served."""
        self._resources.pop(kind, None)
        self.dynamic.resources.invalidate_cache()
        return self.serves(kind)

    def serves(self, kind: str) -> bool:
        """Whether the API server serves `kind` (an optional kind's CRD is installed)."""
        try:
            self._resource(kind)
        except ResourceNotFoundError:
            return False
        return True

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            found = self._call("get", kind).get(name=name, namespace=namespace)
        except NotFoundError:
            return None
        except ResourceNotFoundError:
            if kind in OPTIONAL_KINDS:
                return None
            raise
        return dict(found.to_dict())

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[Obj]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        try:
            found = self._call("list", kind).get(namespace=namespace, label_selector=selector)
        except (NotFoundError, ResourceNotFoundError):
            if kind in OPTIONAL_KINDS:  # its CRD is not installed (or was removed)
                return []
            raise
        return list(found.to_dict().get("items", []))

    def ensure(self, obj: Obj) -> bool:
        """Create `obj` unless an object of that name exists. True if it created it; raises
        CreateRefused when the API server refuses it for good."""
        meta = obj["metadata"]
        try:
            created = self._call("create", obj["kind"]).create(
                body=obj, namespace=meta["namespace"]
            )
        except ResourceNotFoundError as err:  # no REST mapping: the CRD is not installed
            if obj["kind"] not in OPTIONAL_KINDS:
                raise
            raise _not_served(obj) from err
        except NotFoundError as err:
            # A CRD removed since discovery was read: the API server answers the create
            # with a bare "404 page not found" (no Status). Ask discovery again.
            if obj["kind"] in OPTIONAL_KINDS and not self._still_served(obj["kind"]):
                raise _not_served(obj) from err
            refused = refusal(obj, err)
            if refused is None:
                raise
            raise refused from err
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
        if kind in OPTIONAL_KINDS and not self.serves(kind):
            return  # nothing of a kind the cluster does not serve can exist
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
