"""The process node runs real pods as local processes, exactly as their specs say."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from lmmr1_testbed.images import OPERATOR_IMAGE, TRAINER_CPU_IMAGE
from lmmr1_testbed.layout import TestBedState, pod_log
from lmmr1_testbed.pytest_plugin import Cli, WaitFor

# The small image (no torch): its environment is the operator's lock file.
IMAGE = OPERATOR_IMAGE
# What Pod Security `restricted` asks of every pod and container (the namespaces enforce it).
RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

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
    """A pod on the process node, compliant with Pod Security `restricted` unless the
    caller passes its own securityContext."""
    for container in [*containers, *spec.get("initContainers", [])]:
        container.setdefault("image", IMAGE)
        container.setdefault("securityContext", RESTRICTED_CONTAINER)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            **ON_PROCESS_NODE,
            "securityContext": RESTRICTED_POD,
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
                    "restartPolicy": "Always",
                    "command": ["python", "-c", SIDECAR],
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
                    "command": ["python", "-c", MAIN],
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
                    "command": [
                        "python",
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
                    "command": ["python", "-c", "print('ok')"],
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
                    "command": ["python", "-c", script],
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
                    "command": ["python", "-c", "import time\nwhile True: time.sleep(1)"],
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
            [{"name": "main", "command": ["python", "-c", script]}],
        ),
    )
    pod = wait("pod Succeeded", lambda: phase_is(kubectl, "says-goodbye", "Succeeded"))
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == "final: s3://b/step-4"


# ----- kubelet security semantics: ids, volume ownership, read-only root, image pulls -------

READ_TOKEN = """
import os, pathlib
print("uid", os.getuid(), "gid", os.getgid(), "groups", sorted(os.getgroups()))
try:
    print("token", pathlib.Path("/etc/lmmr1/token/token").read_text().strip())
except PermissionError as err:
    print("denied", err)
    raise SystemExit(78)
"""


def secret_pod(name: str, **pod_security: Any) -> str:
    return make_pod(
        name,
        [
            {
                "name": "main",
                "command": ["python", "-c", READ_TOKEN],
                "volumeMounts": [
                    {"name": "token", "mountPath": "/etc/lmmr1/token", "readOnly": True}
                ],
            }
        ],
        securityContext={**RESTRICTED_POD, "runAsUser": 1000, "runAsGroup": 1000, **pod_security},
        volumes=[{"name": "token", "secret": {"secretName": "tok", "defaultMode": 0o400}}],
    )


def test_a_root_owned_0400_secret_is_unreadable_to_uid_1000_and_readable_with_fs_group(
    kubectl: Cli, wait: WaitFor, testbed: TestBedState, namespace: str
) -> None:
    """What a real kubelet does with `defaultMode: 0400`: the file is root's, so a container
    running as 1000 cannot read it, unless the pod's fsGroup makes it group-readable."""
    kubectl("create", "secret", "generic", "tok", "--from-literal=token=s3cret")
    kubectl("apply", "-f", "-", stdin=secret_pod("no-fs-group"))
    kubectl("apply", "-f", "-", stdin=secret_pod("with-fs-group", fsGroup=2000))
    wait("pod Failed", lambda: phase_is(kubectl, "no-fs-group", "Failed"))
    out = pod_log(testbed, namespace, "no-fs-group", "main")
    assert "uid 1000 gid 1000 groups [1000]" in out
    assert "denied [Errno 13] Permission denied" in out
    wait("pod Succeeded", lambda: phase_is(kubectl, "with-fs-group", "Succeeded"))
    out = pod_log(testbed, namespace, "with-fs-group", "main")
    assert "uid 1000 gid 1000 groups [1000, 2000]" in out
    assert "token s3cret" in out


WRITE_EVERYWHERE = """
import pathlib, sys
for path in ("/tmp/probe", "/scratch/probe", sys.prefix + "/probe"):
    try:
        pathlib.Path(path).write_text("x")
        print("wrote", path)
    except OSError as err:
        print("refused", path, err.strerror)
"""


def test_read_only_root_filesystem_leaves_only_volumes_writable(
    kubectl: Cli, wait: WaitFor, testbed: TestBedState, namespace: str
) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "read-only-root",
            [
                {
                    "name": name,
                    "command": ["python", "-c", WRITE_EVERYWHERE],
                    "securityContext": {**RESTRICTED_CONTAINER, "readOnlyRootFilesystem": ro},
                    "volumeMounts": [
                        {"name": "scratch", "mountPath": "/scratch"},
                        *([{"name": "tmp", "mountPath": "/tmp"}] if name == "ro-tmp" else []),
                    ],
                }
                for name, ro in (("ro", True), ("rw", False), ("ro-tmp", True))
            ],
            volumes=[{"name": "scratch", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
        ),
    )
    wait("pod Succeeded", lambda: phase_is(kubectl, "read-only-root", "Succeeded"))
    read_only = pod_log(testbed, namespace, "read-only-root", "ro")
    writable = pod_log(testbed, namespace, "read-only-root", "rw")
    # Each container has its own /tmp (mode 1777) in its root filesystem.
    assert "refused /tmp/probe Read-only file system" in read_only
    assert "wrote /tmp/probe" in writable
    assert "wrote /scratch/probe" in read_only  # an emptyDir is world-writable
    # An emptyDir at /tmp replaces the read-only /tmp of the root filesystem.
    assert "wrote /tmp/probe" in pod_log(testbed, namespace, "read-only-root", "ro-tmp")
    # The image's environment is never the container's to change.
    assert "refused /opt/venv/probe" in read_only and "refused /opt/venv/probe" in writable


# What a trainer pod imports at start-up, then every imported module whose bytecode is not on
# disk (the interpreter compiles those from source, as it cannot write a cache in a pod).
IMPORT_FROM_BYTECODE = """
import os, sys
import deepspeed, torch._dynamo, transformers, vllm
import lmmr1_operator.reconcile, lmmr1_trainer.rollout.vllm_backend, lmmr1_trainer.train
modules = [m for m in list(sys.modules.values()) if getattr(m, "__spec__", None)]
sources = [m for m in modules if (m.__spec__.origin or "").endswith(".py")]
missing = [m.__name__ for m in sources if not os.path.exists(m.__spec__.cached or "")]
print("imported", len(sources), "modules from source files; without bytecode:", len(missing))
print("first without:", sorted(missing)[:10])
"""


def test_a_trainer_pod_imports_every_module_from_the_images_bytecode(
    kubectl: Cli, wait: WaitFor, testbed: TestBedState, namespace: str
) -> None:
    """The Dockerfiles' `pip install` leaves bytecode in the image, and a pod never writes any
    (PYTHONDONTWRITEBYTECODE, a read-only root): the test bed's image environments must hold
    it too, or every test-bed pod compiles torch and vLLM from source at start-up."""
    kubectl(
        "apply", "-f", "-",
        stdin=make_pod(
            "bytecode",
            [{
                "name": "main",
                "image": TRAINER_CPU_IMAGE,
                "command": ["python", "-c", IMPORT_FROM_BYTECODE],
                "env": [{"name": "DS_ACCELERATOR", "value": "cpu"}],
                "securityContext": {**RESTRICTED_CONTAINER, "readOnlyRootFilesystem": True},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # as the trainer's
            }],
            volumes=[{"name": "tmp", "emptyDir": {}}],
        ),
    )  # fmt: skip
    done = wait(
        "pod done",
        lambda: (
            phase_is(kubectl, "bytecode", "Succeeded") or phase_is(kubectl, "bytecode", "Failed")
        ),
        timeout=300,
    )
    log = pod_log(testbed, namespace, "bytecode", "main")
    assert done["status"]["phase"] == "Succeeded", log
    imported = int(log.split("imported ", 1)[1].split()[0])
    assert imported > 1000, log  # torch, vLLM and the trainer really were imported
    assert "without bytecode: 0\n" in log, log


@pytest.mark.pod_security("privileged")
def test_run_as_non_root_refuses_uid_0_with_a_config_error(kubectl: Cli, wait: WaitFor) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "wants-root",
            [{"name": "main", "command": ["python", "-c", "print('ran')"]}],
            securityContext={"runAsNonRoot": True, "runAsUser": 0},
        ),
    )

    def waiting() -> Any:
        for status in pod_json(kubectl, "wants-root")["status"].get("containerStatuses", []):
            waiting = status["state"].get("waiting", {})
            if waiting.get("reason") == "CreateContainerConfigError":
                return waiting
        return None

    state = wait("CreateContainerConfigError", waiting)
    assert "runAsNonRoot and image will run as root" in state["message"]


def test_an_image_without_an_environment_cannot_be_pulled(kubectl: Cli, wait: WaitFor) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "unknown-image",
            [{"name": "main", "image": "ghcr.io/lmmr1/lmmr1-trainer:0.1.0", "command": ["true"]}],
        ),
    )

    def reasons() -> set[str]:
        seen = pod_json(kubectl, "unknown-image")["status"].get("containerStatuses", [])
        return {s["state"].get("waiting", {}).get("reason", "") for s in seen}

    wait("ErrImagePull", lambda: "ErrImagePull" in reasons())
    wait("ImagePullBackOff", lambda: "ImagePullBackOff" in reasons(), 30)
    assert pod_json(kubectl, "unknown-image")["status"]["phase"] == "Pending"


def test_a_restricted_namespace_rejects_a_pod_that_runs_as_root(kubectl: Cli) -> None:
    """The API server's Pod Security admission is on: the namespaces tests run in enforce
    `restricted` as shared clusters do."""
    result = kubectl(
        "apply",
        "-f",
        "-",
        stdin=make_pod(
            "root-pod", [{"name": "main", "command": ["true"]}], securityContext={"runAsUser": 0}
        ),
        check=False,
    )
    assert result.returncode != 0
    assert 'violates PodSecurity "restricted' in result.stderr
