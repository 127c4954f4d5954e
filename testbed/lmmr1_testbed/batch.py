"""The batch controllers beside the test bed's control plane: Kueue and JobSet (issue 15).

Both are the upstream controller managers, built from pinned Go modules by
`testbed/build.sh --batch`, and run as processes outside the cluster like the rest of the
test bed. What a real install does with in-cluster Services and cert-manager is done here by
hand:

- their CRDs, from the modules' own `config/components/crd/bases`, applied server-side;
- their webhooks, from the modules' own webhook manifests, registered with a URL client
  config (`https://127.0.0.1:<port>/<path>`) and the test bed's CA, and served with a
  certificate that CA issued for 127.0.0.1 (their internal certificate management, which
  wants a Service name, is off);
- leader election off, one replica each.

Kueue manages `batch/job` and `jobset.x-k8s.io/jobset` (not bare pods: the operator's
gang path puts the whole stage in one JobSet). Its on-demand visibility API (an aggregated
API server) is off. Only webhooks whose handlers those settings register are installed:
a registered webhook with no handler would refuse every object it matches.

Starting them is lazy (`ensure`): the first test that needs them pays for the build, which
`.ci/run` starts in the background before anything else, so the other tests never wait.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from lmmr1_testbed import pki, procs
from lmmr1_testbed.layout import BUILD_SCRIPT, PrerequisiteMissing, TestBedState

COMPONENTS = ("jobset", "kueue")
KUEUE_INTEGRATIONS = ("batch/job", "jobset.x-k8s.io/jobset")
# Webhook paths served by what this configuration enables; every other webhook in the
# upstream manifests is for an integration that is off (pods, Deployments, Ray, ...).
KUEUE_WEBHOOK_PATHS = (
    "-kueue-x-k8s-io-",
    "-batch-v1-job",
    "-jobset-x-k8s-io-",
)
JOBSET_POD_SELECTOR = {
    # As upstream's kustomize patch: only pods of a JobSet go through its pod webhooks.
    "matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]
}
# Kueue's metrics server reads its certificate from this fixed path when internal
# certificate management is off (kueue v0.17 cmd/kueue/main.go); it is mounted from the
# test bed's run directory in a private mount namespace.
KUEUE_METRICS_CERT_DIR = "/etc/kueue/metrics/certs"
Obj = dict[str, Any]


def log(message: str) -> None:
    print(f"testbed: {message}", file=sys.stderr, flush=True)


def ensure_binaries() -> Path:
    """Build (or reuse) the Kueue and JobSet binaries; the directory that holds them (its
    parent holds `manifests/`)."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--batch"], stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode == 127:
        raise PrerequisiteMissing("testbed/build.sh --batch: a prerequisite is missing")
    if proc.returncode != 0:
        raise RuntimeError(f"testbed/build.sh --batch failed with exit code {proc.returncode}")
    return Path(proc.stdout.strip().splitlines()[-1])


def running(state: TestBedState) -> bool:
    directory = Path(state.run_dir)
    for name in COMPONENTS:
        pid = procs.pid_of(name, directory)
        if pid is None or not procs.is_alive(pid):
            return False
    return True


def ensure(state: TestBedState) -> None:
    """Start Kueue and JobSet on the running test bed, unless they already run."""
    if running(state):
        return
    from lmmr1_testbed import bed  # bed imports this module

    bin_dir = ensure_binaries()
    directory = Path(state.run_dir)
    work = directory / "batch"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    manifests = bin_dir.parent / "manifests"
    ports = {
        name: procs.free_port()
        for name in ("kueue-webhook", "kueue-health", "jobset-webhook", "jobset-health")
    }
    state.ports.update(ports)
    state.save()

    pki_dir = directory / "pki"
    ca = pki.KeyPair(pki_dir / "ca.crt", pki_dir / "ca.key")
    serving = pki.issue(
        ca, pki_dir, "batch-webhooks", "lmmr1-testbed-webhooks", server_names=("127.0.0.1",)
    )
    certs = work / "certs"
    certs.mkdir()
    # controller-runtime's webhook server and Kueue's metrics server read tls.crt/tls.key.
    shutil.copy(serving.cert, certs / "tls.crt")
    shutil.copy(serving.key, certs / "tls.key")
    ca_bundle = base64.b64encode(ca.cert.read_bytes()).decode()

    install_crds(state, bin_dir)

    kubeconfig = work / "controllers.kubeconfig"
    shutil.copy(state.kubeconfig, kubeconfig)  # fixtures, like kwok: test-bed admins

    log("starting the JobSet controller manager")
    jobset_config = work / "jobset-config.yaml"
    jobset_config.write_text(
        _manager_config("config.jobset.x-k8s.io/v1alpha1", "jobset", ports, certs)
    )
    procs.start(
        "jobset",
        [
            str(bin_dir / "jobset"),
            f"--kubeconfig={kubeconfig}",
            f"--config={jobset_config}",
            "--zap-log-level=info",
        ],
        run_dir=directory,
    )

    log("starting the Kueue controller manager")
    kueue_config = work / "kueue-config.yaml"
    kueue_config.write_text(
        _manager_config(
            "config.kueue.x-k8s.io/v1beta2",
            "kueue",
            ports,
            certs,
            manageJobsWithoutQueueName=False,
            integrations={"frameworks": list(KUEUE_INTEGRATIONS)},
        )
    )
    script = (
        f"set -e; mkdir -p {KUEUE_METRICS_CERT_DIR}; "
        f'mount --bind {certs} {KUEUE_METRICS_CERT_DIR}; exec "$@"'
    )
    procs.start(
        "kueue",
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "kueue",
            str(bin_dir / "kueue"),
            f"--kubeconfig={kubeconfig}",
            f"--config={kueue_config}",
            "--feature-gates=VisibilityOnDemand=false",
        ],
        run_dir=directory,
    )

    logs = directory / "logs"
    for name in COMPONENTS:
        health = f"http://127.0.0.1:{ports[f'{name}-health']}/readyz"
        bed.wait_until(name, partial(bed.http_ok, health), 120, logs / f"{name}.log")
        webhook = partial(procs.port_is_open, "127.0.0.1", ports[f"{name}-webhook"])
        bed.wait_until(f"{name} webhook", webhook, 60, logs / f"{name}.log")

    log("registering their webhooks")
    webhooks = webhook_configurations(
        (manifests / "jobset-webhooks.yaml").read_text(),
        prefix="jobset",
        base_url=f"https://127.0.0.1:{ports['jobset-webhook']}",
        ca_bundle=ca_bundle,
        keep=lambda path: True,
        pod_selector=JOBSET_POD_SELECTOR,
    ) + webhook_configurations(
        (manifests / "kueue-webhooks.yaml").read_text(),
        prefix="kueue",
        base_url=f"https://127.0.0.1:{ports['kueue-webhook']}",
        ca_bundle=ca_bundle,
        keep=lambda path: any(part in path for part in KUEUE_WEBHOOK_PATHS),
        pod_selector=None,
    )
    bed.kubectl(
        state,
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": webhooks}),
    )
    log("Kueue and JobSet are up")


def _manager_config(
    api_version: str, name: str, ports: dict[str, int], certs: Path, **extra: Any
) -> str:
    """A controller-runtime manager's Configuration (both share its shape): one replica,
    the webhook on loopback with the test bed's certificate, no metrics server."""
    return yaml.safe_dump(
        {
            "apiVersion": api_version,
            "kind": "Configuration",
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "webhook": {
                "port": ports[f"{name}-webhook"],
                "host": "127.0.0.1",
                "certDir": str(certs),
            },
            "health": {"healthProbeBindAddress": f"127.0.0.1:{ports[f'{name}-health']}"},
            "metrics": {"bindAddress": "0"},
            **extra,
        }
    )


def queue(
    name: str,
    namespace: str,
    quota: dict[str, str],
    preemption: dict[str, str] | None = None,
) -> list[Obj]:
    """A ResourceFlavor `name`, a ClusterQueue `name` open to every namespace with `quota`
    (every resource a pod requests must be covered: Kueue admits nothing that requests an
    uncovered one, e.g. ephemeral-storage for emptyDirs), and the LocalQueue `name` in
    `namespace` that points at it."""
    spec: Obj = {
        "namespaceSelector": {},
        "resourceGroups": [
            {
                "coveredResources": list(quota),
                "flavors": [
                    {
                        "name": name,
                        "resources": [{"name": k, "nominalQuota": v} for k, v in quota.items()],
                    }
                ],
            }
        ],
    }
    if preemption:
        spec["preemption"] = preemption
    api = "kueue.x-k8s.io/v1beta2"
    return [
        {"apiVersion": api, "kind": "ResourceFlavor", "metadata": {"name": name}},
        {"apiVersion": api, "kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec},
        {
            "apiVersion": api,
            "kind": "LocalQueue",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterQueue": name},
        },
    ]


def install_crds(state: TestBedState, bin_dir: Path | None = None) -> None:
    """Apply the Kueue and JobSet CRDs (again: a test that removed one puts it back) and wait
    until the API server serves them."""
    from lmmr1_testbed import bed

    manifests = (bin_dir or ensure_binaries()).parent / "manifests"
    log("installing the Kueue and JobSet CRDs")
    for crds in ("jobset-crds", "kueue-crds"):
        bed.kubectl(
            state, "apply", "--server-side", "--force-conflicts", "-f", str(manifests / crds)
        )
    bed.kubectl(state, "wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")


def webhook_configurations(
    manifests: str,
    *,
    prefix: str,
    base_url: str,
    ca_bundle: str,
    keep: Callable[[str], bool],
    pod_selector: Obj | None,
) -> list[Obj]:
    """The upstream webhook configurations, pointed at `base_url` instead of an in-cluster
    Service, named `<prefix>-<name>`, with only the webhooks whose path `keep` accepts."""
    configurations = []
    for document in yaml.safe_load_all(manifests):
        if not document:
            continue
        webhooks = []
        for webhook in document.get("webhooks", []):
            path = webhook["clientConfig"]["service"]["path"]
            if not keep(path):
                continue
            webhook["clientConfig"] = {"url": base_url + path, "caBundle": ca_bundle}
            if pod_selector is not None and path.endswith("-v1-pod"):
                webhook["objectSelector"] = pod_selector
            webhooks.append(webhook)
        if webhooks:
            document["metadata"] = {"name": f"{prefix}-{document['metadata']['name']}"}
            document["webhooks"] = webhooks
            configurations.append(document)
    return configurations
