"""Bring the whole test bed up or down: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok (simulated GPU nodes), the process node, an S3 server (versitygw) and
an MLflow tracking server (SQLite backend, artifacts served by the server itself).

    python -m lmmr1_testbed up      # or: make cluster-up
    python -m lmmr1_testbed down    # or: make cluster-down

Every component listens on loopback on a port the kernel picked free, runs with
authentication and RBAC on, and logs to `<run_dir>/logs/<component>.log`.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lmmr1_testbed import batch, images, pki, procs
from lmmr1_testbed.layout import TestBedState, cache_dir, ensure_binaries, run_dir

# Start order; `down` stops in reverse.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "versitygw",
    "mlflow",
    "process-node",
)
SERVICE_CIDR = "10.96.0.0/16"
GPU_NODES = 4
GPUS_PER_NODE = 8
# Local NVMe of an 8-GPU cloud node (p5.48xlarge: 8 x 3.84 TB), where emptyDirs live.
KWOK_NODE_DISK = "28Ti"
KWOK_STAGES = Path(__file__).with_name("kwok-stages.yaml")


def log(message: str) -> None:
    print(f"testbed: {message}", file=sys.stderr, flush=True)


def wait_until(what: str, check: Callable[[], bool], timeout: float, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"{what} not ready after {timeout:.0f}s; last lines of {logfile}:\n{procs.tail(logfile)}"
    )


def _https_ok(url: str, ca: Path, client: pki.KeyPair | None = None) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    try:
        with urllib.request.urlopen(url, context=context, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def status() -> TestBedState | None:
    """The running test bed's state, or None when it is not (fully) up."""
    directory = run_dir()
    state = TestBedState.load(directory)
    if state is None:
        return None
    for name in COMPONENTS:
        pid = procs.pid_of(name, directory)
        if pid is None or not procs.is_alive(pid):
            return None
    return state


def up(*, gpu_nodes: int = GPU_NODES, with_batch: bool = False) -> TestBedState:
    """Start every component (reusing a healthy running test bed) and return its state.

    `with_batch` also starts Kueue and JobSet (`make cluster-up` does); tests that need them
    start them with `batch.ensure`, so that the others never wait for their build.
    """
    running = status()
    if running is not None:
        log(f"already up in {running.run_dir}; installing this checkout into its images")
        images.prepare(cache_dir(), Path(running.run_dir))
        if with_batch:
            batch.ensure(running)
        return running
    directory = run_dir()
    down(quiet=True)
    started = time.monotonic()
    bin_dir = ensure_binaries()
    for tool in ("unshare", "mount", "setpriv"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"'{tool}' not found: apt-get install util-linux mount")
    # Data is not kept across restarts: a test bed starts empty, like a fresh cluster.
    shutil.rmtree(directory, ignore_errors=True)
    pki_dir = directory / "pki"
    pki_dir.mkdir(parents=True)
    for sub in ("logs", "pids"):
        (directory / sub).mkdir()
    (directory / "bin").symlink_to(bin_dir)  # .testbed/bin/kubectl, .testbed/bin/helm, ...
    ports = {
        name: procs.free_port()
        for name in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok", "s3", "mlflow")
    }
    host = "127.0.0.1"
    apiserver_url = f"https://{host}:{ports['apiserver']}"

    ca = pki.make_ca(pki_dir)
    serving = pki.issue(
        ca,
        pki_dir,
        "apiserver",
        "kube-apiserver",
        server_names=(
            host,
            "localhost",
            "10.96.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
    )
    sa_key = pki.make_service_account_key(pki_dir)

    def kubeconfig_for(stem: str, user: str, groups: tuple[str, ...] = ()) -> Path:
        client = pki.issue(ca, pki_dir, stem, user, groups)
        path = directory / f"{stem}.kubeconfig"
        path.write_text(pki.kubeconfig(apiserver_url, ca.cert, client, user))
        return path

    admin_kubeconfig = kubeconfig_for("admin", "lmmr1-testbed-admin", ("system:masters",))
    shutil.copy(admin_kubeconfig, directory / "kubeconfig")
    kcm_kubeconfig = kubeconfig_for("kube-controller-manager", "system:kube-controller-manager")
    scheduler_kubeconfig = kubeconfig_for("kube-scheduler", "system:kube-scheduler")
    # kwok and the process node play kubelets for many nodes; the Node authorizer only
    # admits one node per identity, so they act as test-bed admins (they are fixtures).
    kwok_kubeconfig = kubeconfig_for("kwok", "lmmr1-testbed-kwok", ("system:masters",))
    node_kubeconfig = kubeconfig_for("process-node", "lmmr1-testbed-node", ("system:masters",))
    admin_client = pki.KeyPair(pki_dir / "admin.crt", pki_dir / "admin.key")
    logs = directory / "logs"

    def binary(name: str) -> str:
        return str(bin_dir / name)

    log("starting etcd")
    procs.start(
        "etcd",
        [
            binary("etcd"),
            "--name=testbed",
            f"--data-dir={directory / 'etcd'}",
            f"--listen-client-urls=http://{host}:{ports['etcd']}",
            f"--advertise-client-urls=http://{host}:{ports['etcd']}",
            f"--listen-peer-urls=http://{host}:{ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://{host}:{ports['etcd-peer']}",
            f"--initial-cluster=testbed=http://{host}:{ports['etcd-peer']}",
            "--unsafe-no-fsync",
            "--log-level=warn",
            "--quota-backend-bytes=2147483648",
        ],
        run_dir=directory,
    )
    wait_until(
        "etcd", lambda: http_ok(f"http://{host}:{ports['etcd']}/health"), 30, logs / "etcd.log"
    )

    log("starting kube-apiserver")
    procs.start(
        "kube-apiserver",
        [
            binary("kube-apiserver"),
            f"--etcd-servers=http://{host}:{ports['etcd']}",
            f"--bind-address={host}",
            f"--advertise-address={host}",
            f"--secure-port={ports['apiserver']}",
            f"--cert-dir={pki_dir}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={ca.cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa_key}",
            f"--service-account-signing-key-file={sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--profiling=false",
            # No aggregated APIs and no kubelets to reach: keep the apiserver lean.
            "--enable-priority-and-fairness=false",
            "--event-ttl=1h",
        ],
        run_dir=directory,
    )
    wait_until(
        "kube-apiserver",
        lambda: _https_ok(f"{apiserver_url}/readyz", ca.cert, admin_client),
        90,
        logs / "kube-apiserver.log",
    )
    (directory / "apiserver-ready").touch()  # its mtime is what `make bench` reads

    log("starting kube-controller-manager and kube-scheduler")
    procs.start(
        "kube-controller-manager",
        [
            binary("kube-controller-manager"),
            f"--kubeconfig={kcm_kubeconfig}",
            f"--authentication-kubeconfig={kcm_kubeconfig}",
            f"--authorization-kubeconfig={kcm_kubeconfig}",
            f"--bind-address={host}",
            f"--secure-port={ports['kcm']}",
            f"--service-account-private-key-file={sa_key}",
            f"--root-ca-file={ca.cert}",
            f"--cluster-signing-cert-file={ca.cert}",
            f"--cluster-signing-key-file={ca.key}",
            "--use-service-account-credentials=true",
            "--controllers=*",
            "--leader-elect=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Fast GC and job sync keep tests quick.
            "--concurrent-gc-syncs=5",
        ],
        run_dir=directory,
    )
    procs.start(
        "kube-scheduler",
        [
            binary("kube-scheduler"),
            f"--kubeconfig={scheduler_kubeconfig}",
            f"--authentication-kubeconfig={scheduler_kubeconfig}",
            f"--authorization-kubeconfig={scheduler_kubeconfig}",
            f"--bind-address={host}",
            f"--secure-port={ports['scheduler']}",
            "--leader-elect=false",
        ],
        run_dir=directory,
    )

    log("starting kwok (simulated GPU nodes)")
    stages = directory / "kwok-stages.yaml"
    stock = sorted((bin_dir.parent / "kwok-stages").glob("*.yaml"))
    stages.write_text("\n---\n".join(path.read_text() for path in [*stock, KWOK_STAGES]))
    procs.start(
        "kwok",
        [
            binary("kwok"),
            f"--kubeconfig={kwok_kubeconfig}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--config={stages}",
            f"--server-address={host}:{ports['kwok']}",
            "--cidr=10.244.0.0/16",
            f"--node-ip={host}",
            # Without it kwok keeps no node leases and the controller manager, seeing only
            # status heartbeats, marks busy fake nodes NotReady now and then.
            "--node-lease-duration-seconds=40",
        ],
        run_dir=directory,
    )

    log("starting the MLflow tracking server")
    mlflow_url = _start_mlflow(directory, host, ports["mlflow"])

    state = TestBedState(
        run_dir=str(directory),
        bin_dir=str(bin_dir),
        apiserver_url=apiserver_url,
        kubeconfig=str(directory / "kubeconfig"),
        s3_endpoint=f"http://{host}:{ports['s3']}",
        s3_access_key="lmmr1-" + secrets.token_hex(4),
        s3_secret_key=secrets.token_hex(16),
        mlflow_url=mlflow_url,
        gpu_nodes=[f"kwok-gpu-{i}" for i in range(gpu_nodes)],
        ports=ports,
    )

    log("starting versitygw (S3)")
    _start_s3(state)

    log("preparing the images' environments (the first time: their lock files' packages)")
    image_table = images.prepare(cache_dir(), directory)
    log("starting the process node")
    procs.start(
        "process-node",
        [
            sys.executable,
            "-m",
            "lmmr1_testbed.processnode",
            f"--kubeconfig={node_kubeconfig}",
            f"--node-name={state.process_node}",
            f"--pods-dir={directory / 'pods'}",
            f"--apiserver={host}:{ports['apiserver']}",
            f"--images={image_table}",
        ],
        run_dir=directory,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )

    for name in state.gpu_nodes:
        _create_kwok_node(state, name)
    wait_until(
        "versitygw", lambda: procs.port_is_open(host, ports["s3"]), 30, logs / "versitygw.log"
    )
    # Last: its first start (database migrations) takes tens of seconds on a busy machine.
    wait_until("MLflow", lambda: http_ok(f"{mlflow_url}/health"), 180, logs / "mlflow.log")
    wait_until(
        "GPU nodes Ready",
        lambda: _nodes_ready(state, [*state.gpu_nodes, state.process_node]),
        60,
        logs / "kwok.log",
    )
    wait_until(
        "default service account",
        lambda: _default_sa_exists(state),
        60,
        logs / "kube-controller-manager.log",
    )
    state.save()
    (directory / "s3.env").write_text(
        "".join(f"export {key}={value}\n" for key, value in state.s3_env().items())
    )
    if with_batch:
        batch.ensure(state)
    log(
        f"up in {time.monotonic() - started:.1f}s: KUBECONFIG={state.kubeconfig}; "
        f"S3 at {state.s3_endpoint} (source {directory / 's3.env'}); MLflow at {mlflow_url}"
    )
    return state


def _start_s3(state: TestBedState) -> None:
    """versitygw over the test bed's S3 directories (kept across restarts)."""
    directory = Path(state.run_dir)
    (directory / "s3" / "data").mkdir(parents=True, exist_ok=True)
    (directory / "s3" / "meta").mkdir(parents=True, exist_ok=True)
    procs.start(
        "versitygw",
        [
            state.binary("versitygw"),
            "--port",
            f"127.0.0.1:{state.ports['s3']}",
            "posix",
            "--sidecar",
            str(directory / "s3" / "meta"),
            str(directory / "s3" / "data"),
        ],
        run_dir=directory,
        env={"ROOT_ACCESS_KEY": state.s3_access_key, "ROOT_SECRET_KEY": state.s3_secret_key},
    )


def restart_s3(state: TestBedState, *, down_seconds: float) -> None:
    """Stop the S3 server (SIGTERM), leave it down `down_seconds`, start it again on the
    same port and data, and wait until it answers: an S3 outage, as the chaos test plays it."""
    procs.stop("versitygw", Path(state.run_dir), grace=5.0)
    time.sleep(down_seconds)
    _start_s3(state)
    wait_until(
        "versitygw",
        lambda: procs.port_is_open("127.0.0.1", state.ports["s3"]),
        30,
        Path(state.run_dir) / "logs" / "versitygw.log",
    )


def _start_mlflow(directory: Path, host: str, port: int) -> str:
    """The tracking server the trainer's MLflow back end logs to (the dev virtualenv's
    `mlflow`): runs and metrics in SQLite, artifacts (the samples tables) stored by the
    server under <run_dir>/mlflow/artifacts and served to clients over HTTP, so a client
    needs nothing but the URL."""
    data = directory / "mlflow"
    data.mkdir()
    procs.start(
        "mlflow",
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            f"--backend-store-uri=sqlite:///{data / 'mlflow.db'}",
            f"--artifacts-destination={data / 'artifacts'}",
            f"--host={host}",
            f"--port={port}",
            "--workers=1",
        ],
        run_dir=directory,
        # No job runner: MLflow 3 starts several huey consumers for its server-side jobs
        # (prompt optimisation, scorers), which the trainer never asks for.
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    return f"http://{host}:{port}"


def kubectl(
    state: TestBedState, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the test bed's own kubectl against it as the admin."""
    return subprocess.run(
        [state.binary("kubectl"), f"--kubeconfig={state.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=check,
    )


def add_kwok_nodes(state: TestBedState, count: int) -> list[str]:
    """Make sure there are at least `count` kwok GPU nodes (a scale benchmark's thousands
    of pods need more than the 110 each node takes); their names."""
    names = [f"kwok-gpu-{i}" for i in range(count)]
    for name in names[len(state.gpu_nodes) :]:
        _create_kwok_node(state, name)
    wait_until(
        f"{count} kwok nodes Ready",
        lambda: _nodes_ready(state, names),
        60,
        Path(state.run_dir) / "logs" / "kwok.log",
    )
    return names


def _create_kwok_node(state: TestBedState, name: str) -> None:
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            },
        },
        "status": {
            "allocatable": {
                "cpu": "96",
                "memory": "1Ti",
                "pods": "110",
                "ephemeral-storage": KWOK_NODE_DISK,
                "nvidia.com/gpu": str(GPUS_PER_NODE),
            },
            "capacity": {
                "cpu": "96",
                "memory": "1Ti",
                "pods": "110",
                "ephemeral-storage": KWOK_NODE_DISK,
                "nvidia.com/gpu": str(GPUS_PER_NODE),
            },
        },
    }
    kubectl(state, "apply", "--server-side", "-f", "-", stdin=json.dumps(node))


def _nodes_ready(state: TestBedState, names: list[str]) -> bool:
    result = kubectl(state, "get", "nodes", "-o", "json", check=False)
    if result.returncode != 0:
        return False
    ready = {
        item["metadata"]["name"]
        for item in json.loads(result.stdout)["items"]
        for condition in item.get("status", {}).get("conditions", [])
        if condition["type"] == "Ready" and condition["status"] == "True"
    }
    return set(names) <= ready


def _default_sa_exists(state: TestBedState) -> bool:
    return kubectl(state, "get", "serviceaccount", "default", check=False).returncode == 0


def down(*, quiet: bool = False) -> None:
    """Stop every component (processes of pods on the process node included)."""
    directory = run_dir()
    for name in (*reversed(batch.COMPONENTS), *reversed(COMPONENTS)):
        if procs.stop(name, directory, grace=15 if name == "process-node" else 5) and not quiet:
            log(f"stopped {name}")
    # Pods' processes run in their own sessions; the node stops them, unless it was killed
    # hard, so reap any that outlived it.
    for pid_file in (directory / "pods").glob("*/*/*.pid"):
        try:
            pid = int(pid_file.read_text())
        except ValueError:
            continue
        if procs.is_alive(pid) and _is_pod_process(pid, pid_file.parent):
            procs.kill_group(pid, grace=2)
    if not quiet:
        log(f"down ({directory} kept for inspection; removed at the next up)")


def _is_pod_process(pid: int, pod_dir: Path) -> bool:
    """Guard against pid reuse: the process must still have the pod's environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"LMMR1_TESTBED_POD_DIR={pod_dir}".encode() in environ


def encode_secret(values: dict[str, str]) -> dict[str, str]:
    """Secret `data` from plain strings."""
    return {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}
