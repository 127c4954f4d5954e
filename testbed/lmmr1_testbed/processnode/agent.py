"""The process node's agent: register the Node, keep its lease, and run the pods bound to it.

    python -m lmmr1_testbed.processnode --kubeconfig K --node-name N --pods-dir D \
        --apiserver 127.0.0.1:6443

Pods are found by polling (every 0.5 s) the pods whose `spec.nodeName` is this node, which
is simple and survives API-server restarts without watch bookkeeping.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client import ApiException

from lmmr1_testbed import images
from lmmr1_testbed.images import Runtime
from lmmr1_testbed.processnode import spec as podspec
from lmmr1_testbed.processnode.runner import PodRunner

Obj = dict[str, Any]
log = logging.getLogger("processnode")

NODE_LABEL = "lmmr1.io/process-node"
HOST_IP = "127.0.0.1"
# Each pod gets its own loopback address from this range (Linux routes all of 127/8 to lo).
# Pods' loopback addresses. Two test beds on one host (parallel checkouts) share the loopback
# device, so the second takes another range (LMMR1_TESTBED_POD_NETWORK, e.g. 127.102.0.0/16)
# or its first pod's servers collide with the first bed's on the same address and port.
POD_NETWORK = ipaddress.ip_network(os.environ.get("LMMR1_TESTBED_POD_NETWORK", "127.101.0.0/16"))


class Api:
    """The process node's calls to the API server, on plain dicts."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self.api_client = api_client

    def _json(self, response: Any) -> Obj:
        return dict(json.loads(response.data))

    def list_pods(self, node: str) -> list[Obj]:
        response = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node}", _preload_content=False
        )
        return list(self._json(response)["items"])

    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        try:
            if kind == "secret":
                raw = self._json(
                    self.core.read_namespaced_secret(name, namespace, _preload_content=False)
                )
                return podspec.decode_secret(raw)
            raw = self._json(
                self.core.read_namespaced_config_map(name, namespace, _preload_content=False)
            )
            return podspec.decode_configmap(raw)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def token(self, pod: Obj, projection: Obj) -> str:
        meta = pod["metadata"]
        body: Any = {
            "spec": {
                "audiences": [projection["audience"]] if projection.get("audience") else None,
                "expirationSeconds": projection.get("expirationSeconds", 3607),
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            }
        }
        response = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName", "default"),
            meta["namespace"],
            body,
            _preload_content=False,
        )
        return str(self._json(response)["status"]["token"])

    def patch_status(self, pod: Obj, status: Obj) -> None:
        meta = pod["metadata"]
        self.core.patch_namespaced_pod_status(
            meta["name"],
            meta["namespace"],
            {"status": status},
            _content_type="application/merge-patch+json",
        )

    def finalize_deletion(self, pod: Obj) -> None:
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"])
                ),
            )
        except ApiException as err:
            if err.status not in (404, 409):
                raise


def node_manifest(name: str, gpus: int) -> Obj:
    capacity = {
        "cpu": "64",
        "memory": "256Gi",
        "pods": "110",
        "nvidia.com/gpu": str(gpus),
        "ephemeral-storage": "8Ti",  # fake, like the rest: room for many trainer scratch volumes
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                NODE_LABEL: "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
        },
        # Only pods that opt in (tolerate the taint) run here as local processes.
        "spec": {"taints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def node_status(gpus: int) -> Obj:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    capacity = node_manifest("", gpus)["status"]["capacity"]
    return {
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": HOST_IP},
                {"type": "Hostname", "address": "localhost"},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process node is posting ready status",
                    "lastHeartbeatTime": stamp,
                    "lastTransitionTime": stamp,
                },
                *(
                    {
                        "type": kind,
                        "status": "False",
                        "reason": f"KubeletHas{reason}",
                        "lastHeartbeatTime": stamp,
                        "lastTransitionTime": stamp,
                    }
                    for kind, reason in (
                        ("MemoryPressure", "SufficientMemory"),
                        ("DiskPressure", "NoDiskPressure"),
                        ("PIDPressure", "SufficientPID"),
                    )
                ),
            ],
            "nodeInfo": {
                "kubeletVersion": "v0.0.0-processnode",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "process://",
                "kernelVersion": os.uname().release,
                "osImage": "lmmr1 process node",
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }
    }


class Agent:
    def __init__(
        self,
        api: Api,
        node: str,
        pods_dir: Path,
        apiserver: str,
        gpus: int,
        images: dict[str, Runtime],
    ) -> None:
        self.api = api
        self.node = node
        self.pods_dir = pods_dir
        self.gpus = gpus
        self.images = images
        host, _, port = apiserver.rpartition(":")
        # What the kubelet adds to every container; PATH, HOME and the rest come from the
        # image (its Dockerfile's ENV), as on a real node. Nothing of the host leaks in.
        self.base_env = {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "LANG": "C.UTF-8",
            # A safety net: nothing in a pod may reach a model hub from the test bed.
            "HF_HUB_OFFLINE": "1",
        }
        self.runners: dict[str, PodRunner] = {}
        self.ips: dict[str, str] = {}
        self.stopping = threading.Event()

    def register(self) -> None:
        core = self.api.core
        try:
            core.create_node(cast(Any, node_manifest(self.node, self.gpus)))
        except ApiException as err:
            if err.status != 409:
                raise
        self.heartbeat()

    def heartbeat(self) -> None:
        self.api.core.patch_node_status(self.node, node_status(self.gpus))
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease: Any = {
            "metadata": {"name": self.node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": stamp},
        }
        try:
            self.api.coordination.patch_namespaced_lease(self.node, "kube-node-lease", lease)
        except ApiException as err:
            if err.status != 404:
                raise
            self.api.coordination.create_namespaced_lease("kube-node-lease", lease)

    def allocate_ip(self, uid: str) -> str:
        if uid not in self.ips:
            used = set(self.ips.values())
            free = next(str(ip) for ip in POD_NETWORK.hosts() if str(ip) not in used)
            self.ips[uid] = free
        return self.ips[uid]

    def sync(self) -> None:
        pods = {pod["metadata"]["uid"]: pod for pod in self.api.list_pods(self.node)}
        for uid, pod in pods.items():
            runner = self.runners.get(uid)
            if pod["metadata"].get("deletionTimestamp"):
                grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
                if runner is None or runner.finished.is_set():
                    self.api.finalize_deletion(pod)
                else:
                    runner.stop(grace)
                continue
            if runner is None and pod.get("status", {}).get("phase") in (None, "Pending"):
                runner = PodRunner(
                    pod,
                    self.api,
                    self.allocate_ip(uid),
                    HOST_IP,
                    self.pods_dir,
                    self.base_env,
                    self.images,
                )
                self.runners[uid] = runner
                runner.start()
        for uid in list(self.runners):
            if uid not in pods:  # force-deleted: stop at once
                runner = self.runners.pop(uid)
                runner.stop(0)
                self.ips.pop(uid, None)

    def run(self) -> None:
        self.register()
        last_beat = time.monotonic()
        while not self.stopping.is_set():
            try:
                self.sync()
                if time.monotonic() - last_beat > 10:
                    self.heartbeat()
                    last_beat = time.monotonic()
            except Exception as err:  # keep the node alive through API hiccups
                log.warning("sync failed: %s", err)
            self.stopping.wait(0.5)
        for runner in self.runners.values():
            runner.stop(5)
        for runner in self.runners.values():
            runner.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmmr1_testbed.processnode",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--pods-dir", required=True, type=Path)
    parser.add_argument("--apiserver", required=True, help="host:port pods use to reach the API")
    parser.add_argument("--gpus", type=int, default=8, help="fake nvidia.com/gpu capacity")
    parser.add_argument(
        "--images", required=True, type=Path, help="image table (lmmr1_testbed.images.prepare)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api_client = config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    agent = Agent(
        Api(api_client),
        args.node_name,
        args.pods_dir,
        args.apiserver,
        args.gpus,
        images.load_table(args.images),
    )
    signal.signal(signal.SIGTERM, lambda *_: agent.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stopping.set())
    agent.run()
