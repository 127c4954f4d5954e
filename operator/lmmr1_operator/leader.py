"""Leader election on a coordination.k8s.io Lease, as controller-runtime does it: only the
replica holding the lease reconciles; the others watch and wait to take over.

The holder renews every `renew_seconds`; a replica takes the lease over once it has not
been renewed for `lease_seconds` (its holder died) or when the holder released it on a
clean shutdown. Writes carry the lease's resourceVersion, so two replicas can never both
believe they took it.

"Not renewed for `lease_seconds`" is judged as client-go's leader election judges it: by
this replica's own monotonic clock, from when it last saw the lease record change, never by
comparing the holder's renewTime with the local wall clock. Nodes' clocks disagree: a
holder whose clock runs behind would look expired while renewing (two leaders), and one
whose clock runs ahead would keep the lease long after it died.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client

log = logging.getLogger("lmmr1.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        renew_seconds: float = 2.0,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self.on_change = on_change
        self.api = client.CoordinationV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds
        self._leading_until = 0.0  # monotonic deadline of our current term
        # The lease record as last read, and when (monotonic) it was first seen so.
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.stopping = threading.Event()

    def is_leader(self) -> bool:
        return time.monotonic() < self._leading_until

    def run(self) -> None:
        """Acquire and renew until `stopping` is set; then release."""
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if self._try_acquire_or_renew():
                    self._leading_until = started + self.lease_seconds - self.renew_seconds
                else:
                    self._leading_until = 0.0
                if self.on_change is not None:
                    self.on_change(1 if self.is_leader() else 0)
            except Exception as err:  # API unreachable: leadership lapses on its own
                log.warning("lease %s/%s: %s", self.namespace, self.name, err)
            self.stopping.wait(self.renew_seconds)
        self.release()

    def _spec(self, acquired: Any, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "acquireTime": acquired,
            "renewTime": _now(),
            "leaseTransitions": transitions,
        }

    def _try_acquire_or_renew(self) -> bool:
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except client.ApiException as err:
            if err.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name),
                spec=client.V1LeaseSpec(**self._spec(_now(), 0)),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
            except client.ApiException as create_err:
                if create_err.status == 409:  # another replica was faster
                    return False
                raise
            self._observed = None  # our own write: re-read as a change next time
            log.info("became the leader (lease %s/%s created)", self.namespace, self.name)
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity
        now = time.monotonic()
        record = (
            holder,
            spec.renew_time,
            spec.acquire_time,
            spec.lease_transitions,
            spec.lease_duration_seconds,
        )
        if record != self._observed:  # renewed (or changed hands) since the last read
            self._observed, self._observed_at = record, now
        expired = holder is None or now - self._observed_at > (spec.lease_duration_seconds or 0)
        if holder != self.identity and not expired:
            return False
        mine = holder == self.identity
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        acquired = spec.acquire_time if mine else _now()
        lease.spec = client.V1LeaseSpec(**self._spec(acquired, transitions))
        try:  # carries the resourceVersion we read: a concurrent taker gets 409
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except client.ApiException as err:
            if err.status == 409:
                return False
            raise
        if not mine:
            log.info(
                "became the leader (lease %s/%s taken over from %s)",
                self.namespace,
                self.name,
                holder,
            )
        return True

    def release(self) -> None:
        """Give the lease up so another replica need not wait for it to expire."""
        if not self.is_leader():
            return
        self._leading_until = 0.0
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("released the lease %s/%s", self.namespace, self.name)
        except client.ApiException as err:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, err)
