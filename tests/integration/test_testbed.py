"""The test bed's parts, each proven for real: API server (CRDs, schema validation, RBAC),
controllers (Jobs, garbage collection), scheduler + kwok GPU nodes, the process node, S3,
kubectl and helm."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lmmr1_testbed.layout import TestBedState
from lmmr1_testbed.pytest_plugin import Cli, WaitFor

CHARTS = Path(__file__).with_name("charts")

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.testbed.lmmr1.io
spec:
  group: testbed.lmmr1.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: Phase, type: string, jsonPath: .status.phase}
    - {name: Age, type: date, jsonPath: .metadata.creationTimestamp}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1, maximum: 8}
          status:
            type: object
            properties:
              phase: {type: string}
"""


def pod_json(kubectl: Cli, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", "pod", name, "-o", "json").stdout))


def test_crd_status_subresource_printer_columns_and_schema(kubectl: Cli, wait: WaitFor) -> None:
    kubectl("apply", "-f", "-", stdin=WIDGET_CRD)
    wait(
        "widgets CRD established",
        lambda: (
            "True"
            in kubectl(
                "get",
                "crd",
                "widgets.testbed.lmmr1.io",
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                check=False,
            ).stdout
        ),
    )
    kubectl(
        "apply",
        "-f",
        "-",
        stdin="apiVersion: testbed.lmmr1.io/v1\nkind: Widget\n"
        "metadata: {name: w1}\nspec: {size: 3}\n",
    )
    # status is a subresource: a patch through it sticks...
    kubectl(
        "patch",
        "widget",
        "w1",
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Spinning"}}',
    )
    # ...while a status change through the main resource is dropped by the API server.
    kubectl("patch", "widget", "w1", "--type=merge", "-p", '{"status": {"phase": "Ignored"}}')
    table = kubectl("get", "wdg").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "PHASE", "AGE"]
    assert table[1].split()[:3] == ["w1", "3", "Spinning"]

    bad = kubectl(
        "apply",
        "-f",
        "-",
        check=False,
        stdin="apiVersion: testbed.lmmr1.io/v1\nkind: Widget\n"
        "metadata: {name: w2}\nspec: {size: 99}\n",
    )
    assert bad.returncode != 0
    assert "spec.size" in bad.stderr and "less than or equal to 8" in bad.stderr


def test_rbac_is_enforced(kubectl: Cli, namespace: str) -> None:
    kubectl("create", "serviceaccount", "reader")
    kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods")
    kubectl(
        "create",
        "rolebinding",
        "reader",
        "--role=pod-reader",
        f"--serviceaccount={namespace}:reader",
    )
    who = f"--as=system:serviceaccount:{namespace}:reader"
    assert kubectl("auth", "can-i", "list", "pods", who).stdout.strip() == "yes"
    denied = kubectl("auth", "can-i", "delete", "pods", who, check=False)
    assert denied.stdout.strip() == "no"
    forbidden = kubectl("get", "secrets", who, check=False)
    assert forbidden.returncode != 0 and "Forbidden" in forbidden.stderr


@pytest.mark.pod_security("privileged")  # simulated pods, not the product's
def test_job_pods_are_scheduled_on_kwok_gpu_nodes_and_complete_on_demand(
    kubectl: Cli, wait: WaitFor, testbed: TestBedState
) -> None:
    kubectl(
        "apply",
        "-f",
        "-",
        stdin=textwrap.dedent("""
        apiVersion: batch/v1
        kind: Job
        metadata: {name: gpu-job}
        spec:
          completions: 2
          parallelism: 2
          completionMode: Indexed
          backoffLimit: 0
          template:
            spec:
              restartPolicy: Never
              containers:
              - name: train
                image: trainer:test
                resources: {limits: {nvidia.com/gpu: 8}}
        """),
    )

    def running_pods() -> list[dict[str, Any]] | None:
        pods = json.loads(kubectl("get", "pods", "-l", "job-name=gpu-job", "-o", "json").stdout)
        items = pods["items"]
        ok = len(items) == 2 and all(p["status"].get("phase") == "Running" for p in items)
        return items if ok else None

    pods = wait("2 job pods Running", running_pods)
    nodes = {p["spec"]["nodeName"] for p in pods}
    # 8 GPUs each: the scheduler must spread them over two distinct GPU nodes.
    assert len(nodes) == 2 and nodes <= set(testbed.gpu_nodes)
    for pod in pods:
        kubectl("annotate", "pod", pod["metadata"]["name"], "testbed.lmmr1.io/exit-code=0")
    wait(
        "job complete",
        lambda: (
            "True"
            in kubectl(
                "get",
                "job",
                "gpu-job",
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Complete')].status}",
            ).stdout
        ),
    )


@pytest.mark.pod_security("privileged")  # simulated pods, not the product's
def test_kwok_pod_fails_with_the_requested_exit_code(kubectl: Cli, wait: WaitFor) -> None:
    kubectl(
        "run",
        "doomed",
        "--image=x",
        "--restart=Never",
        "--overrides",
        json.dumps({"spec": {"nodeSelector": {"type": "kwok"}}}),
    )
    wait("pod Running", lambda: pod_json(kubectl, "doomed")["status"].get("phase") == "Running")
    kubectl("annotate", "pod", "doomed", "testbed.lmmr1.io/exit-code=3")
    pod = wait(
        "pod Failed",
        lambda: (p := pod_json(kubectl, "doomed"))["status"]["phase"] == "Failed" and p,
    )
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_deleting_an_owner_garbage_collects_its_children(kubectl: Cli, wait: WaitFor) -> None:
    kubectl("create", "configmap", "owner")
    uid = kubectl("get", "configmap", "owner", "-o", "jsonpath={.metadata.uid}").stdout
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
            ],
        },
    }
    kubectl("apply", "-f", "-", stdin=json.dumps(child))
    kubectl("delete", "configmap", "owner")
    wait(
        "child garbage-collected",
        lambda: kubectl("get", "configmap", "child", check=False).returncode != 0,
    )


def test_helm_lints_installs_and_uninstalls_a_chart(helm: Cli, kubectl: Cli) -> None:
    chart = str(CHARTS / "trivial")
    helm("lint", chart)
    helm("install", "demo", chart, "--set", "greeting=hi", "--wait", "--timeout", "60s")
    assert (
        kubectl("get", "configmap", "demo-trivial", "-o", "jsonpath={.data.greeting}").stdout
        == "hi"
    )
    assert "demo" in helm("list", "-q").stdout.split()
    helm("uninstall", "demo", "--wait")
    assert kubectl("get", "configmap", "demo-trivial", check=False).returncode != 0


def test_s3_multipart_round_trip_list_and_delete(
    s3_client: Any, s3_bucket: str, tmp_path: Path
) -> None:
    from boto3.s3.transfer import TransferConfig

    # The multipart API itself: three parts (S3's 5 MiB minimum, then a short last part).
    parts_data = [bytes([i]) * (5 * 2**20) for i in (1, 2)] + [b"tail" * 1000]
    key = "ckpt/step-1/model.safetensors"
    upload = s3_client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    parts = [
        {
            "PartNumber": n,
            "ETag": s3_client.upload_part(
                Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=n, Body=data
            )["ETag"],
        }
        for n, data in enumerate(parts_data, start=1)
    ]
    s3_client.complete_multipart_upload(
        Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    head = s3_client.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentLength"] == sum(map(len, parts_data))
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: 3 parts

    # boto3's managed transfer (what checkpoint I/O uses) both ways.
    payload = bytes(range(256)) * (48 * 1024)  # 12 MiB
    source, copy = tmp_path / "in.bin", tmp_path / "out.bin"
    source.write_bytes(payload)
    config = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    s3_client.upload_file(str(source), s3_bucket, "ckpt/step-2/model.bin", Config=config)
    assert "-" in s3_client.head_object(Bucket=s3_bucket, Key="ckpt/step-2/model.bin")["ETag"]
    s3_client.download_file(s3_bucket, "ckpt/step-2/model.bin", str(copy), Config=config)
    assert copy.read_bytes() == payload

    # An aborted upload leaves nothing behind.
    abandoned = s3_client.create_multipart_upload(Bucket=s3_bucket, Key="ckpt/step-3/x")
    s3_client.abort_multipart_upload(
        Bucket=s3_bucket, Key="ckpt/step-3/x", UploadId=abandoned["UploadId"]
    )

    listed = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="ckpt/", Delimiter="/")
    assert [p["Prefix"] for p in listed["CommonPrefixes"]] == ["ckpt/step-1/", "ckpt/step-2/"]
    s3_client.delete_objects(
        Bucket=s3_bucket,
        Delete={"Objects": [{"Key": key}, {"Key": "ckpt/step-2/model.bin"}]},
    )
    assert s3_client.list_objects_v2(Bucket=s3_bucket).get("KeyCount", 0) == 0


def test_the_mlflow_tracking_server_answers_its_rest_api(testbed: TestBedState) -> None:
    """`make cluster-up` starts MLflow (SQLite store, artifacts served by the server): an
    experiment, a run and a metric made over the REST API are there when read back."""
    import urllib.request

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{testbed.mlflow_url}/api/2.0/mlflow/{path}",
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return dict(json.loads(response.read() or b"{}"))

    with urllib.request.urlopen(f"{testbed.mlflow_url}/health", timeout=10) as response:
        assert response.read() == b"OK"
    name = f"testbed-{Path(testbed.run_dir).name}-{id(call)}"
    experiment = call("POST", "experiments/create", {"name": name})["experiment_id"]
    run = call("POST", "runs/create", {"experiment_id": experiment})["run"]["info"]["run_id"]
    call(
        "POST",
        "runs/log-metric",
        {"run_id": run, "key": "r", "value": 0.5, "timestamp": 1, "step": 3},
    )
    got = call("GET", f"metrics/get-history?run_id={run}&metric_key=r")["metrics"]
    assert [(m["step"], m["value"]) for m in got] == [(3, 0.5)]
    assert (Path(testbed.run_dir) / "mlflow" / "mlflow.db").stat().st_size > 0
