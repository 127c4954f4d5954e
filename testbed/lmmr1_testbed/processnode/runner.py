"""Run one pod's containers as local processes and keep its status true.

Order follows the kubelet: regular init containers one at a time to completion; native
sidecars (init containers with `restartPolicy: Always`) start in order, each waiting for its
startupProbe, and keep running (restarted when they exit); then the main containers start
together. When every main container is done for good, the sidecars get SIGTERM and the pod
ends Succeeded or Failed. Deleting the pod stops everything within its grace period.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmmr1_testbed import procs
from lmmr1_testbed.images import Runtime
from lmmr1_testbed.processnode import spec as podspec
from lmmr1_testbed.processnode.probes import run_probe

Obj = dict[str, Any]
log = logging.getLogger("processnode")

MAX_BACKOFF_S = 30.0  # kubelet uses 300 s; a test bed wants fast retries


class NodeApi(Protocol):
    """What a pod runner needs from the API server."""

    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None: ...
    def token(self, pod: Obj, projection: Obj) -> str: ...
    def patch_status(self, pod: Obj, status: Obj) -> None: ...


def _still_running(proc: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: proc.poll() is None


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    """One container's process and the status the kubelet would report for it."""

    spec: Obj
    kind: str  # "init" | "sidecar" | "main"
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "PodInitializing"}})
    last_state: Obj = field(default_factory=dict)
    restarts: int = 0
    ready: bool = False
    started: bool = False
    next_start: float = 0.0
    pending_start: bool = False  # (re)start once `next_start` has passed
    next_probe: float = 0.0
    pull_failures: int = 0
    done: bool = False  # terminated and will not be restarted

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> Obj:
        out: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "restartCount": self.restarts,
            "started": self.started,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.proc is not None:
            out["containerID"] = f"process://{self.proc.pid}"
        return out


class PodRunner(threading.Thread):
    def __init__(
        self,
        pod: Obj,
        api: NodeApi,
        pod_ip: str,
        host_ip: str,
        pods_dir: Path,
        base_env: dict[str, str],
        images: dict[str, Runtime],
    ) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.pod = pod
        self.api = api
        self.pod_ip = pod_ip
        self.host_ip = host_ip
        self.dir: Path = pods_dir / str(meta["namespace"]) / str(meta["name"])
        self.base_env = {**base_env, "LMMR1_TESTBED_POD_DIR": str(self.dir)}
        self.images = images
        self.stop_requested = threading.Event()
        self.grace = 30.0
        self.finished = threading.Event()
        self.start_time = now()
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        spec = pod["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.containers: list[Container] = [
            Container(c, "sidecar" if c.get("restartPolicy") == "Always" else "init")
            for c in spec.get("initContainers", [])
        ] + [Container(c, "main") for c in spec.get("containers", [])]
        self.mounts: dict[str, str] = {}
        self._last_status: Obj | None = None
        self._transitions: dict[str, tuple[bool, str]] = {}
        self._init_containers_done = False

    # ----- lifecycle -------------------------------------------------------------------

    def stop(self, grace: float) -> None:
        self.grace = grace
        self.stop_requested.set()

    def run(self) -> None:
        try:
            self.pod.setdefault("status", {})["podIP"] = self.pod_ip
            self.pod["status"]["hostIP"] = self.host_ip
            self._prepare_volumes()
            if not self.stop_requested.is_set():
                self._run()
        except Exception as err:  # the node must survive any pod
            log.exception("pod %s failed in the process node", self.label)
            self.phase, self.reason, self.message = "Failed", "ProcessNodeError", str(err)
        finally:
            self._terminate_all(self.grace)
            self._push_status()
            self.finished.set()

    def _prepare_volumes(self) -> None:
        """Materialise volumes; a missing Secret/ConfigMap waits like the kubelet does."""
        while not self.stop_requested.is_set():
            try:
                self._write_volumes()
                return
            except podspec.ConfigError as err:
                for c in self.containers:
                    c.state = {
                        "waiting": {"reason": "CreateContainerConfigError", "message": str(err)}
                    }
                self._push_status()
                self.stop_requested.wait(2.0)

    def _write_volumes(self) -> None:
        namespace = self.pod["metadata"]["namespace"]
        volumes_dir = self.dir / "volumes"
        volumes_dir.mkdir(parents=True, exist_ok=True)
        for volume in self.pod["spec"].get("volumes", []):
            content = podspec.volume_content(
                self.pod,
                volume,
                lambda kind, name: self.api.lookup(kind, namespace, name),
                lambda projection: self.api.token(self.pod, projection),
            )
            target = volumes_dir / volume["name"]
            if isinstance(content, podspec.VolumeDir):
                if content.kind == "hostPath":
                    self.mounts[volume["name"]] = content.source
                    continue
                if content.kind == "pvc":
                    # Claims outlive pods: keep their data beside the pods dir.
                    target = self.dir.parents[1] / "pvcs" / namespace / content.source
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    # The kubelet makes an emptyDir world-writable.
                    target.mkdir(parents=True, exist_ok=True)
                    target.chmod(0o777)
            else:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                token_owner = podspec.token_owner(self.pod, self._image_uids())
                for rel, (data, mode) in content.files.items():
                    path = target / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    path.chmod(mode)
                    if rel in content.tokens and token_owner is not None:
                        os.chown(path, token_owner, -1)
                        path.chmod(0o600)
            ownership = podspec.volume_ownership(self.pod, volume)
            if ownership is not None:
                _apply_ownership(target, ownership)
            self.mounts[volume["name"]] = str(target)

    def _image_uids(self) -> dict[str, int]:
        """Each container's image's default uid (0 for an image the node cannot run)."""
        uids = {}
        for c in self.containers:
            runtime = self.images.get(str(c.spec.get("image", "")))
            uids[c.name] = runtime.spec.uid if runtime else 0
        return uids

    @property
    def label(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    # ----- the main loop ---------------------------------------------------------------

    def _run(self) -> None:
        for c in self.containers:
            c.state = {"waiting": {"reason": "PodInitializing"}}
        for c in self.containers:
            if c.kind == "main":
                break
            if c.kind == "init":
                if not self._run_to_completion(c):
                    return
            else:
                self._start(c)
                if not self._wait_started(c):
                    return
        self._init_containers_done = True
        for c in self.containers:
            if c.kind == "main":
                self._start(c)
        while not self.stop_requested.is_set():
            self._tick()
            if any(c.proc is not None or c.done for c in self.containers if c.kind == "main"):
                self.phase = "Running"
            mains = [c for c in self.containers if c.kind == "main"]
            if all(c.done for c in mains):
                ok = all(c.state["terminated"]["exitCode"] == 0 for c in mains)
                self._terminate_all(self.grace)
                self.phase = "Succeeded" if ok else "Failed"
                return
            self._push_status()
            self.stop_requested.wait(0.2)

    def _run_to_completion(self, c: Container) -> bool:
        while not self.stop_requested.is_set():
            if c.proc is None and not c.done and time.monotonic() >= c.next_start:
                self._start(c)
            self._tick()
            if c.done:
                if c.state["terminated"]["exitCode"] == 0:
                    return True
                self.phase = "Failed"
                self.reason, self.message = "InitContainerFailed", f"init container {c.name}"
                return False
            self._push_status()
            self.stop_requested.wait(0.2)
        return False

    def _wait_started(self, c: Container) -> bool:
        while not self.stop_requested.is_set():
            self._tick()
            if c.started:
                return True
            self._push_status()
            self.stop_requested.wait(0.2)
        return False

    def _tick(self) -> None:
        """Reap exits, restart by policy, run due probes."""
        for c in self.containers:
            if c.proc is not None:
                code = c.proc.poll()
                if code is not None:
                    self._exited(c, code)
            elif c.pending_start and time.monotonic() >= c.next_start:
                self._start(c)
            if c.proc is not None:
                self._probe(c)

    def _exited(self, c: Container, code: int) -> None:
        # A signal exit reads as 128+signal, as a container runtime reports it.
        exit_code = 128 - code if code < 0 else code
        running = c.state.get("running", {})
        c.state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": running.get("startedAt", now()),
                "finishedAt": now(),
                "containerID": f"process://{c.proc.pid if c.proc else 0}",
            }
        }
        message = self._termination_message(c, exit_code)
        if message:
            c.state["terminated"]["message"] = message
        c.proc, c.ready, c.started = None, False, False
        log.info("pod %s container %s exited %d", self.label, c.name, exit_code)
        restart = (
            c.kind == "sidecar"
            or (c.kind == "main" and self.restart_policy == "Always")
            or (exit_code != 0 and self.restart_policy in ("Always", "OnFailure"))
        )
        if restart and not self.stop_requested.is_set():
            c.last_state = c.state
            c.restarts += 1
            c.next_start = time.monotonic() + min(MAX_BACKOFF_S, 2.0 ** (c.restarts - 1))
            c.pending_start = True
            c.state = {"waiting": {"reason": "CrashLoopBackOff" if exit_code else "Completed"}}
        else:
            c.done = True

    def _pull(self, c: Container) -> Runtime | None:
        """The container's image, or None after reporting ErrImagePull/ImagePullBackOff
        (alternating, retried with back-off) as the kubelet does for a missing image."""
        image = str(c.spec.get("image", ""))
        runtime = self.images.get(image)
        if runtime is not None:
            return runtime
        c.pull_failures += 1
        reason = "ErrImagePull" if c.pull_failures % 2 else "ImagePullBackOff"
        c.state = {
            "waiting": {
                "reason": reason,
                "message": f'Failed to pull image "{image}": not found: the test bed has '
                f"no environment for it (it can run {', '.join(sorted(self.images))})",
            }
        }
        c.pending_start = True
        c.next_start = time.monotonic() + min(MAX_BACKOFF_S, 2.0**c.pull_failures)
        return None

    def _start(self, c: Container) -> None:
        runtime = self._pull(c)
        if runtime is None:
            return
        image = runtime.spec
        try:
            identity = podspec.container_identity(self.pod, c.spec, image.uid, image.gid)
            env = podspec.container_env(
                self.pod,
                c.spec,
                lambda kind, name: self.api.lookup(kind, self.pod["metadata"]["namespace"], name),
                {**image.env, **self.base_env},
            )
            env.setdefault("HOME", image.home)
            argv = podspec.command_line(c.spec, env)
        except podspec.ConfigError as err:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            c.pending_start = True
            c.next_start = time.monotonic() + 2.0
            return
        c.pending_start = False
        mounts = [*self._image_layer(c, runtime, identity)]
        for mount in c.spec.get("volumeMounts", []):
            source = self.mounts[mount["name"]]
            if mount.get("subPath"):
                source = os.path.join(source, mount["subPath"])
            mounts.append((source, mount["mountPath"], bool(mount.get("readOnly"))))
        # The termination message file, per container, read back into its status on exit;
        # the kubelet makes it writable for any user.
        message_file = self._termination_file(c)
        message_file.write_bytes(b"")
        message_file.chmod(0o666)
        mounts.append(
            (
                str(message_file),
                c.spec.get("terminationMessagePath") or "/dev/termination-log",
                False,
            )
        )
        # A volume at a path of the image's root filesystem (an emptyDir at /tmp) replaces
        # it, so the volume's own read-only flag is the one that applies.
        mounts = [m for i, m in enumerate(mounts) if m[1] not in {t for _, t, _ in mounts[i + 1 :]}]
        launch = podspec.launch_script(
            mounts, c.spec.get("workingDir") or image.workdir, argv, identity=identity
        )
        logfile = self.dir / f"{c.name}.log"
        if logfile.exists() and c.restarts:
            logfile.replace(self.dir / f"{c.name}.previous.log")
        with open(logfile, "ab") as out:
            c.proc = subprocess.Popen(
                launch,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        c.env, c.argv = env, argv
        # `down` reads these to reap pods' processes if the node itself was killed hard.
        (self.dir / f"{c.name}.pid").write_text(str(c.proc.pid))
        c.state = {"running": {"startedAt": now()}}
        c.next_probe = time.monotonic() + float(
            (c.spec.get("startupProbe") or c.spec.get("readinessProbe") or {}).get(
                "initialDelaySeconds", 0
            )
        )
        c.started = "startupProbe" not in c.spec
        c.ready = c.started and "readinessProbe" not in c.spec and c.kind != "init"
        log.info("pod %s container %s started: %s", self.label, c.name, argv)

    def _image_layer(
        self, c: Container, runtime: Runtime, identity: podspec.Identity
    ) -> list[tuple[str, str, bool]]:
        """What the image's root filesystem contributes: its virtualenv (read-only: a
        container never changes the cached environment), and this container's own /tmp,
        home directory (owned by the image's user) and WORKDIR, read-only with
        readOnlyRootFilesystem."""
        image = runtime.spec
        rootfs = self.dir / "containers" / c.name / "rootfs"
        read_only = identity.read_only_root
        layer = [(runtime.environment, image.venv_path, True)]
        for accounts in ("passwd", "group"):
            layer.append((f"{runtime.etc}/{accounts}", f"/etc/{accounts}", True))
        tmp = rootfs / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)
        layer.append((str(tmp), "/tmp", read_only))
        for path, owner in ((image.home, (image.uid, image.gid)), (image.workdir, (0, 0))):
            if path == "/" or any(target == path for _, target, _ in layer):
                continue
            directory = rootfs / path.lstrip("/")
            directory.mkdir(parents=True, exist_ok=True)
            os.chown(directory, *owner)
            layer.append((str(directory), path, read_only))
        return layer

    def _termination_file(self, c: Container) -> Path:
        return self.dir / f"{c.name}.termination-log"

    def _termination_message(self, c: Container, exit_code: int) -> str:
        """What the kubelet reports: the file (at most 4 KiB), or with
        FallbackToLogsOnError the end of the log when the file is empty and it failed."""
        path = self._termination_file(c)
        message = path.read_bytes()[:4096].decode(errors="replace") if path.exists() else ""
        fallback = c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        if not message and fallback and exit_code != 0:
            log_file = self.dir / f"{c.name}.log"
            if log_file.exists():
                message = "\n".join(log_file.read_text(errors="replace").splitlines()[-80:])
                message = message[-2048:]
        return message

    def _probe(self, c: Container) -> None:
        if time.monotonic() < c.next_probe:
            return
        probe = c.spec.get("readinessProbe") if c.started else c.spec.get("startupProbe")
        if probe is None:
            return
        c.next_probe = time.monotonic() + float(probe.get("periodSeconds", 10))
        ok = run_probe(probe, c.spec, self.pod_ip, c.env)
        if not c.started:
            c.started = ok
            c.ready = ok and "readinessProbe" not in c.spec
            if ok and "readinessProbe" in c.spec:
                c.next_probe = time.monotonic()
        else:
            c.ready = ok

    def _terminate_all(self, grace: float) -> None:
        """SIGTERM main containers, then sidecars in reverse order, SIGKILL after grace."""
        order = [c for c in self.containers if c.kind == "main"] + [
            c for c in reversed(self.containers) if c.kind != "main"
        ]
        for c in order:
            proc = c.proc
            if proc is not None and proc.poll() is None:
                procs.kill_group(proc.pid, grace=grace, alive=_still_running(proc))
            if c.proc is not None:
                self._exited(c, c.proc.wait())
            c.done = True
            if "waiting" in c.state and self.phase in ("Pending", "Running"):
                c.state = {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "ContainerStatusUnknown",
                        "finishedAt": now(),
                    }
                }

    # ----- status ----------------------------------------------------------------------

    def status(self) -> Obj:
        inits = [c for c in self.containers if c.kind != "main"]
        mains = [c for c in self.containers if c.kind == "main"]
        ready = all(c.ready for c in mains) and all(c.ready for c in inits if c.kind == "sidecar")
        ready = ready and self.phase == "Running"

        def cond(kind: str, value: bool, reason: str | None = None) -> Obj:
            previous = self._transitions.get(kind)
            if previous is None or previous[0] != value:
                self._transitions[kind] = previous = (value, now())
            out: Obj = {
                "type": kind,
                "status": "True" if value else "False",
                "lastTransitionTime": previous[1],
            }
            if not value and reason:
                out["reason"] = reason
            return out

        status: Obj = {
            "phase": self.phase,
            "hostIP": self.host_ip,
            "hostIPs": [{"ip": self.host_ip}],
            "podIP": self.pod_ip,
            "podIPs": [{"ip": self.pod_ip}],
            "startTime": self.start_time,
            "qosClass": self.pod.get("status", {}).get("qosClass", "BestEffort"),
            "conditions": [
                cond("PodReadyToStartContainers", True),
                cond("Initialized", self._init_containers_done, "ContainersNotInitialized"),
                cond("ContainersReady", ready, "ContainersNotReady"),
                cond("Ready", ready, "ContainersNotReady"),
                cond("PodScheduled", True),
            ],
            "initContainerStatuses": [c.status() for c in inits],
            "containerStatuses": [c.status() for c in mains],
        }
        if self.reason:
            status["reason"], status["message"] = self.reason, self.message
        return status

    def _push_status(self) -> None:
        status = self.status()
        comparable = status
        if comparable == self._last_status:
            return
        try:
            self.api.patch_status(self.pod, status)
            self._last_status = comparable
        except Exception as err:  # transient API errors: retried on the next tick
            log.warning("pod %s: status update failed: %s", self.label, err)


def _apply_ownership(root: Path, ownership: podspec.Ownership) -> None:
    """chown/chmod a volume's tree the way the kubelet applies an fsGroup."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chown(path, ownership.uid, ownership.gid)
        extra = ownership.extra_dir_mode if path.is_dir() else ownership.extra_mode
        path.chmod(path.stat().st_mode & 0o7777 | extra)
