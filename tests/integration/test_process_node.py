"""The process node runs real pods as local processes, exactly as their specs say."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from lmmr1_testbed.layout import TestBedState, pod_log
from lmmr1_testbed.pytest_plugin import Cli, WaitFor

ON_PROCESS_NODE = {
    "nodeSelector": {"lmmr1.io/process-node": "true"},
    "tolerations": [{"key": "lmmr1.io/process-node", "operator": "Exists"}],
}
POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}

SIDECAR = """
import http.server, os
class Reward(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"reward=1.0" if self.path == "/reward" else b"ok"
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
print("sidecar listening on", os.environ["POD_IP"], flush=True)
http.server.HTTPServer((os.environ["POD_IP"], 8321), Reward).serve_forever()
"""
MAIN = """
import os, pathlib, urllib.request
got = urllib.request.urlopen(f"http://{os.environ['POD_IP']}:8321/reward", timeout=5).read()
print("main got", got.decode(), "with mode", os.environ["MODE"], "and key", os.environ["KEY"])
print("config says", pathlib.Path("/etc/lmmr1-test/config.yaml").read_text().strip())
"""


def make_pod(name: str, containers: list[dict[str, Any]], **spec: Any) -> str:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            **ON_PROCESS_NODE,
            "containers": containers,
            **spec,
        },
    }
    return json.dumps(pod)


def pod_json(kubectl: Cli, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", "pod", name, "-o", "json").stdout))


def phase_is(kubectl: Cli, name: str, phase: str) -> Any:
    pod = pod_json(kubectl, name)
    return pod if pod["status"].get("phase") == phase else None


def test_sidecar_and_main_container_run_to_success(
    kubectl: Cli, wait: WaitFor, testbed: TestBedState, namespace: str
) -> None:
    kubectl(
        "create",
        "configmap",
        "cfg",
        "--from-literal=mode=fast",
        "--from-literal=config.yaml=steps: 3",
    )
    kubectl("create", "secret", "generic", "creds", "--from-literal=KEY=s3cret")
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "two-containers",
            initContainers=[
                {
                    "name": "verifier",
                    "image": "lmmr1-trainer:dev",
                    "restartPolicy": "Always",
                    "command": [sys.executable, "-c", SIDECAR],
                    "env": [POD_IP_ENV],
                    "startupProbe": {
                        "httpGet": {"path": "/healthz", "port": 8321},
                        "periodSeconds": 1,
                        "failureThreshold": 30,
                    },
                }
            ],
            containers=[
                {
                    "name": "trainer",
                    "image": "lmmr1-trainer:dev",
                    "command": [sys.executable, "-c", MAIN],
                    "env": [
                        POD_IP_ENV,
                        {
                            "name": "MODE",
                            "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}},
                        },
                        {
                            "name": "KEY",
                            "valueFrom": {"secretKeyRef": {"name": "creds", "key": "KEY"}},
                        },
                    ],
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/lmmr1-test", "readOnly": True}
                    ],
                }
            ],
            volumes=[{"name": "config", "configMap": {"name": "cfg"}}],
        ),
    )
    pod = wait("pod Succeeded", lambda: phase_is(kubectl, "two-containers", "Succeeded"))
    main = pod["status"]["containerStatuses"][0]
    assert main["state"]["terminated"]["exitCode"] == 0
    sidecar = pod["status"]["initContainerStatuses"][0]
    assert "terminated" in sidecar["state"]  # stopped once the main container finished
    assert pod["status"]["podIP"].startswith("127.101.")
    out = pod_log(testbed, namespace, "two-containers", "trainer")
    assert "main got reward=1.0 with mode fast and key s3cret" in out
    assert "config says steps: 3" in out
    assert "sidecar listening on " + pod["status"]["podIP"] in pod_log(
        testbed, namespace, "two-containers", "verifier"
    )


def test_a_container_exiting_3_fails_the_pod_with_exit_code_3(
    kubectl: Cli, wait: WaitFor, testbed: TestBedState, namespace: str
) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "exit-three",
            [
                {
                    "name": "main",
                    "image": "x",
                    "command": [
                        sys.executable,
                        "-c",
                        "import sys; print('bad config'); sys.exit(3)",
                    ],
                }
            ],
        ),
    )
    pod = wait("pod Failed", lambda: phase_is(kubectl, "exit-three", "Failed"))
    state = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert state["exitCode"] == 3 and state["reason"] == "Error"
    assert "bad config" in pod_log(testbed, namespace, "exit-three", "main")


def test_missing_secret_waits_with_a_clear_reason_then_runs(kubectl: Cli, wait: WaitFor) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "needs-secret",
            [
                {
                    "name": "main",
                    "image": "x",
                    "command": [sys.executable, "-c", "print('ok')"],
                    "env": [
                        {"name": "K", "valueFrom": {"secretKeyRef": {"name": "later", "key": "K"}}}
                    ],
                }
            ],
        ),
    )

    def waiting_reason() -> str | None:
        statuses = pod_json(kubectl, "needs-secret")["status"].get("containerStatuses", [])
        waiting = statuses[0]["state"].get("waiting", {}) if statuses else {}
        return (
            waiting.get("message")
            if waiting.get("reason") == "CreateContainerConfigError"
            else None
        )

    assert "'later' not found" in wait("CreateContainerConfigError", waiting_reason)
    kubectl("create", "secret", "generic", "later", "--from-literal=K=v")
    wait("pod Succeeded", lambda: phase_is(kubectl, "needs-secret", "Succeeded"))


def test_pods_reach_the_api_with_their_service_account_under_rbac(
    kubectl: Cli, wait: WaitFor, testbed: TestBedState, namespace: str
) -> None:
    kubectl("create", "serviceaccount", "watcher")
    kubectl("create", "role", "pod-reader", "--verb=get", "--resource=pods")
    kubectl(
        "create",
        "rolebinding",
        "watcher",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:watcher",
    )
    script = (
        "import os\nfrom kubernetes import client, config\nconfig.load_incluster_config()\n"
        "api = client.CoreV1Api()\n"
        "ns = open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read()\n"
        "print('my ip', api.read_namespaced_pod(os.environ['NAME'], ns).status.pod_ip)\n"
        "try:\n    api.list_namespaced_secret(ns)\n"
        "except client.ApiException as err:\n    print('secrets', err.status)\n"
    )
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "in-cluster",
            [
                {
                    "name": "main",
                    "image": "x",
                    "command": [sys.executable, "-c", script],
                    "env": [
                        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                    ],
                }
            ],
            serviceAccountName="watcher",
        ),
    )
    pod = wait("pod Succeeded", lambda: phase_is(kubectl, "in-cluster", "Succeeded"), 90)
    out = pod_log(testbed, namespace, "in-cluster", "main")
    assert f"my ip {pod['status']['podIP']}" in out
    assert "secrets 403" in out  # RBAC applies to pods too


def test_deleting_a_pod_kills_its_processes(kubectl: Cli, wait: WaitFor) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "sleeper",
            [
                {
                    "name": "main",
                    "image": "x",
                    "command": [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"],
                }
            ],
        ),
    )
    pod = wait("pod Running", lambda: phase_is(kubectl, "sleeper", "Running"))
    pid = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("process://"))
    os.kill(pid, 0)  # alive
    kubectl("delete", "pod", "sleeper", "--wait=true", "--timeout=60s")

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait("process gone", gone, 15)


def test_the_termination_message_reaches_the_container_status(kubectl: Cli, wait: WaitFor) -> None:
    script = "open('/dev/termination-log', 'w').write('final: s3://b/step-4')"
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "says-goodbye",
            [{"name": "main", "image": "x", "command": [sys.executable, "-c", script]}],
        ),
    )
    pod = wait("pod Succeeded", lambda: phase_is(kubectl, "says-goodbye", "Succeeded"))
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == "final: s3://b/step-4"
