"""The operator's leader election against the test bed's real API server, with holders whose
clocks disagree with ours. A holder's renewTime is written by its own clock; a replica must
judge the lease by when it saw the record change, as client-go does, or a holder whose
clock runs behind looks expired while it renews (two leaders) and one whose clock runs
ahead keeps the lease long after it died."""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes import config as kube_config

from lmmr1_operator.leader import LeaderElector
from lmmr1_testbed.layout import TestBedState

NAMESPACE = "default"
LEASE_SECONDS = 3


@pytest.fixture
def coordination(testbed: TestBedState) -> Iterator[client.CoordinationV1Api]:
    api_client = kube_config.new_client_from_config(config_file=testbed.kubeconfig)  # type: ignore[no-untyped-call]
    yield client.CoordinationV1Api(api_client)
    api_client.close()


def _other_holds(api: client.CoordinationV1Api, name: str, renewed: dt.datetime) -> None:
    """Another replica's write: it holds `name`, renewed at `renewed` by its clock."""
    spec = client.V1LeaseSpec(
        holder_identity="other-replica",
        lease_duration_seconds=LEASE_SECONDS,
        acquire_time=renewed,
        renew_time=renewed,
        lease_transitions=0,
    )
    try:
        lease = api.read_namespaced_lease(name, NAMESPACE)
    except client.ApiException as err:
        assert err.status == 404
        body = client.V1Lease(metadata=client.V1ObjectMeta(name=name), spec=spec)
        api.create_namespaced_lease(NAMESPACE, body)
        return
    lease.spec = spec
    api.replace_namespaced_lease(name, NAMESPACE, lease)


def _elector(api: client.CoordinationV1Api, name: str) -> LeaderElector:
    return LeaderElector(
        api.api_client, NAMESPACE, name, "this-replica", lease_seconds=LEASE_SECONDS
    )


def _holder(api: client.CoordinationV1Api, name: str) -> str | None:
    spec = api.read_namespaced_lease(name, NAMESPACE).spec
    return spec.holder_identity if spec else None


def test_a_holder_whose_clock_runs_behind_keeps_its_lease_while_it_renews(
    coordination: client.CoordinationV1Api,
) -> None:
    name = f"lease-{secrets.token_hex(3)}"
    behind = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    _other_holds(coordination, name, behind)
    elector = _elector(coordination, name)
    # The holder renews every second, for twice the lease duration: its renewTime is always
    # an hour old by our clock, yet it is alive.
    for tick in range(2 * LEASE_SECONDS):
        assert not elector._try_acquire_or_renew(), f"took a live lease at tick {tick}"
        _other_holds(coordination, name, behind + dt.timedelta(seconds=tick + 1))
        time.sleep(1)
    assert _holder(coordination, name) == "other-replica"
    # It stops renewing: the lease is ours once we have seen no change for its duration.
    assert not elector._try_acquire_or_renew()
    time.sleep(LEASE_SECONDS + 0.5)
    assert elector._try_acquire_or_renew()
    assert _holder(coordination, name) == "this-replica"


def test_a_dead_holder_whose_clock_ran_ahead_loses_its_lease_after_its_duration(
    coordination: client.CoordinationV1Api,
) -> None:
    name = f"lease-{secrets.token_hex(3)}"
    _other_holds(coordination, name, dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    elector = _elector(coordination, name)
    assert not elector._try_acquire_or_renew()  # first sight: the holder may be alive
    time.sleep(LEASE_SECONDS + 0.5)
    assert elector._try_acquire_or_renew(), "waited for the dead holder's clock"
    spec = coordination.read_namespaced_lease(name, NAMESPACE).spec
    assert spec is not None and spec.holder_identity == "this-replica"
    assert spec.lease_transitions == 1


def test_a_released_lease_is_taken_at_once_and_a_live_leader_is_never_doubled(
    coordination: client.CoordinationV1Api,
) -> None:
    name = f"lease-{secrets.token_hex(3)}"
    first, second = _elector(coordination, name), _elector(coordination, name)
    second.identity = "second-replica"
    assert first._try_acquire_or_renew()  # no lease yet: created
    for _ in range(2 * LEASE_SECONDS):
        assert first._try_acquire_or_renew()
        first._leading_until = time.monotonic() + LEASE_SECONDS  # as `run` keeps its term
        assert not second._try_acquire_or_renew()
        time.sleep(1)
    first.release()  # a clean shutdown hands over without waiting for expiry
    assert _holder(coordination, name) is None
    assert second._try_acquire_or_renew()
    assert _holder(coordination, name) == "second-replica"
