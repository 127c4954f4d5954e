"""Pure translation of a pod spec into what the process node runs: environment, command
line, volume contents and mounts. No I/O against the API server here: callers pass lookups.
"""

from __future__ import annotations

import base64
import math
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
# (kind, namespace, name) -> the object's data (Secret data already decoded), or None.
Lookup = Callable[[str, str], Mapping[str, bytes] | None]


class ConfigError(Exception):
    """The pod cannot start yet (e.g. a missing Secret): kubelet's CreateContainerConfigError."""


_SUFFIXES: dict[str, Decimal] = {
    **{s: Decimal(2) ** (10 * (i + 1)) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Decimal(10) ** (3 * i) for i, s in enumerate(("", "k", "M", "G", "T", "P", "E"))},
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
}


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2Gi", "1e3") as a Decimal."""
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ValueError(f"invalid quantity {text!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known variables expand, `$$` escapes, others stay."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR.sub(replace, text)


def field_value(pod: Obj, path: str) -> str:
    """The downward API's `fieldRef.fieldPath` against a pod."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.podIPs": ",".join(ip["ip"] for ip in status.get("podIPs", [])),
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{key}="{value}"' for key, value in sorted(items.items()))
    raise ConfigError(f"unsupported fieldRef.fieldPath {path!r}")


def resource_value(container: Obj, ref: Obj) -> str:
    """The downward API's `resourceFieldRef` (limits fall back to requests, as the kubelet's
    node-allocatable fallback is not meaningful on a simulated node)."""
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources", {})
    value = resources.get(kind, {}).get(resource) or resources.get("requests", {}).get(resource)
    if value is None:
        return "0"
    divisor = parse_quantity(ref.get("divisor", "1"))
    return str(math.ceil(parse_quantity(value) / divisor))


def _key_ref(ref: Obj, kind: str, namespace: str, lookup: Lookup) -> str | None:
    data = lookup(kind, ref["name"]) if ref.get("name") else None
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        what = "key {!r} in ".format(ref["key"]) if data is not None else ""
        raise ConfigError(f"{what}{kind} {namespace}/{ref.get('name')!r} not found")
    return data[ref["key"]].decode()


def container_env(
    pod: Obj, container: Obj, lookup: Lookup, base: Mapping[str, str]
) -> dict[str, str]:
    """The container's environment: `base`, then `envFrom`, then `env` in order."""
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key not in source:
                continue
            ref = source[key]
            data = lookup(kind, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"{kind} {namespace}/{ref['name']!r} not found")
            env.update({prefix + name: value.decode() for name, value in data.items()})
    for var in container.get("env", []):
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        value: str | None
        if "fieldRef" in source:
            value = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            value = resource_value(container, source["resourceFieldRef"])
        elif "secretKeyRef" in source:
            value = _key_ref(source["secretKeyRef"], "secret", namespace, lookup)
        elif "configMapKeyRef" in source:
            value = _key_ref(source["configMapKeyRef"], "configmap", namespace, lookup)
        else:
            raise ConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def command_line(container: Obj, env: Mapping[str, str]) -> list[str]:
    """`command` + `args` with `$(VAR)` expanded. Images have no known entrypoint here."""
    command = container.get("command")
    if not command:
        raise ConfigError(
            f"container {container['name']!r} has no command: the process node cannot know "
            f"the entrypoint of image {container.get('image')!r}"
        )
    return [expand(part, env) for part in [*command, *container.get("args", [])]]


@dataclass(frozen=True)
class VolumeFiles:
    """A volume whose content the node writes: relative path -> (bytes, file mode)."""

    files: dict[str, tuple[bytes, int]]
    tokens: frozenset[str] = frozenset()  # paths of serviceAccountToken projections


@dataclass(frozen=True)
class VolumeDir:
    """A volume backed by a directory: emptyDir, hostPath or a persistent volume claim."""

    kind: str  # "emptyDir" | "hostPath" | "pvc"
    source: str  # hostPath path or claim name; "" for emptyDir


TokenSource = Callable[[Obj], str]  # serviceAccountToken projection -> token


def _items(
    data: Mapping[str, bytes], items: list[Obj] | None, mode: int
) -> dict[str, tuple[bytes, int]]:
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    out = {}
    for item in items:
        if item["key"] not in data:
            raise ConfigError(f"volume item key {item['key']!r} not found")
        out[item["path"]] = (data[item["key"]], item.get("mode", mode))
    return out


def _downward_files(pod: Obj, items: list[Obj], mode: int) -> dict[str, tuple[bytes, int]]:
    out = {}
    for item in items:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            raise ConfigError("downwardAPI resourceFieldRef items are not supported")
        out[item["path"]] = (value.encode(), item.get("mode", mode))
    return out


def _object_files(
    source: Obj, kind: str, name_key: str, lookup: Lookup, mode: int
) -> dict[str, tuple[bytes, int]]:
    data = lookup(kind, source[name_key])
    if data is None:
        if source.get("optional"):
            return {}
        raise ConfigError(f"{kind} {source[name_key]!r} not found")
    return _items(data, source.get("items"), mode)


def volume_content(
    pod: Obj, volume: Obj, lookup: Lookup, token: TokenSource
) -> VolumeFiles | VolumeDir:
    """What a pod volume holds."""
    if "emptyDir" in volume:
        return VolumeDir("emptyDir", "")
    if "hostPath" in volume:
        return VolumeDir("hostPath", volume["hostPath"]["path"])
    if "persistentVolumeClaim" in volume:
        return VolumeDir("pvc", volume["persistentVolumeClaim"]["claimName"])
    if "configMap" in volume:
        source = volume["configMap"]
        return VolumeFiles(
            _object_files(source, "configmap", "name", lookup, source.get("defaultMode", 0o644))
        )
    if "secret" in volume:
        source = volume["secret"]
        return VolumeFiles(
            _object_files(source, "secret", "secretName", lookup, source.get("defaultMode", 0o644))
        )
    if "downwardAPI" in volume:
        source = volume["downwardAPI"]
        return VolumeFiles(
            _downward_files(pod, source.get("items", []), source.get("defaultMode", 0o644))
        )
    if "projected" in volume:
        projected = volume["projected"]
        mode = projected.get("defaultMode", 0o644)
        files: dict[str, tuple[bytes, int]] = {}
        tokens: set[str] = set()
        for source in projected.get("sources", []):
            if "serviceAccountToken" in source:
                sat = source["serviceAccountToken"]
                files[sat["path"]] = (token(sat).encode(), mode)
                tokens.add(sat["path"])
            elif "configMap" in source:
                files.update(_object_files(source["configMap"], "configmap", "name", lookup, mode))
            elif "secret" in source:
                files.update(_object_files(source["secret"], "secret", "name", lookup, mode))
            elif "downwardAPI" in source:
                files.update(_downward_files(pod, source["downwardAPI"].get("items", []), mode))
        return VolumeFiles(files, frozenset(tokens))
    raise ConfigError(f"volume {volume['name']!r}: unsupported type {sorted(volume)}")


def decode_secret(secret: Obj) -> dict[str, bytes]:
    data = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
    data.update({key: value.encode() for key, value in (secret.get("stringData") or {}).items()})
    return data


def decode_configmap(configmap: Obj) -> dict[str, bytes]:
    data = {key: value.encode() for key, value in (configmap.get("data") or {}).items()}
    data.update(
        {key: base64.b64decode(value) for key, value in (configmap.get("binaryData") or {}).items()}
    )
    return data


def _privileges(identity: Identity) -> list[str]:
    """`setpriv` arguments that drop root to the container's identity."""
    argv = ["setpriv", f"--reuid={identity.uid}", f"--regid={identity.gid}"]
    argv.append(
        f"--groups={','.join(map(str, identity.groups))}" if identity.groups else "--clear-groups"
    )
    if identity.no_new_privs:
        argv.append("--no-new-privs")
    if identity.drop_all_capabilities:
        argv += ["--inh-caps=-all", "--bounding-set=-all"]
    return [*argv, "--"]


def launch_script(
    mounts: list[tuple[str, str, bool]],
    workdir: str,
    argv: list[str],
    *,
    identity: Identity | None = None,
) -> list[str]:
    """The argv that runs `argv` in a private mount namespace with each (source, target,
    read_only) bind-mounted, then (with an identity) a read-only root filesystem if asked,
    the container's uid, gids and privileges, and `cd workdir`. `unshare` and `setpriv`
    exec, so the pid stays the container's main process.

    Mounts go outermost first, all writable, so a mount point nested in another volume (a
    token directory inside a config directory) can be created; read-only remounts follow.
    A target above some volume's source (an emptyDir at /tmp when the test bed lives under
    /tmp) is mounted last, since it hides everything beneath it.
    """
    sources = [Path(source) for source, _, _ in mounts]

    def shadows_a_source(target: str) -> bool:
        # e.g. an emptyDir at /tmp while the test bed's files live under /tmp/...
        return any(Path(target) in source.parents for source in sources)

    ordered = sorted(mounts, key=lambda m: (shadows_a_source(m[1]), len(Path(m[1]).parts)))
    lines = ["set -e"]
    for source, target, _ in ordered:
        src, dst = shlex.quote(source), shlex.quote(target)
        lines.append(
            f"if [ -d {src} ]; then mkdir -p {dst}; "
            f'else mkdir -p "$(dirname {dst})"; [ -e {dst} ] || touch {dst}; fi'
        )
        lines.append(f"mount --bind {src} {dst}")
    if identity is not None and identity.read_only_root:
        # Only this namespace's view of / turns read-only; volumes keep their own flags.
        lines.append("mount -o remount,bind,ro /")
    for _, target, read_only in ordered:
        if read_only:
            lines.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
    lines.append(f"cd {shlex.quote(workdir)}")
    privileges = "" if identity is None else shlex.join(_privileges(identity)) + " "
    lines.append(f'exec {privileges}"$@"')
    script = "\n".join(lines)
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        script,
        "container",
        *argv,
    ]


# ----- who a container runs as, and who owns its volumes (the kubelet's rules) -------------


@dataclass(frozen=True)
class Identity:
    """The ids and privileges a container's processes really get."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    no_new_privs: bool
    drop_all_capabilities: bool
    read_only_root: bool


def _security(pod: Obj, container: Obj, key: str) -> Any:
    value = (container.get("securityContext") or {}).get(key)
    if value is None:
        value = (pod["spec"].get("securityContext") or {}).get(key)
    return value


def container_identity(pod: Obj, container: Obj, image_uid: int, image_gid: int) -> Identity:
    """runAsUser/runAsGroup (container, else pod, else the image's USER), supplementalGroups
    and fsGroup as extra groups; runAsNonRoot refuses uid 0 as the kubelet does."""
    uid = _security(pod, container, "runAsUser")
    uid = image_uid if uid is None else int(uid)
    gid = _security(pod, container, "runAsGroup")
    if gid is None:
        # The image's passwd entry gives its own user's group; any other uid gets group 0.
        gid = image_gid if uid == image_uid else 0
    if _security(pod, container, "runAsNonRoot") and uid == 0:
        meta = pod["metadata"]
        raise ConfigError(
            "container has runAsNonRoot and image will run as root "
            f'(pod: "{meta["name"]}_{meta["namespace"]}({meta.get("uid", "")})", '
            f"container: {container['name']})"
        )
    pod_security = pod["spec"].get("securityContext") or {}
    # As with runc, the primary group is also a supplementary one.
    groups = [int(gid), *(int(g) for g in pod_security.get("supplementalGroups") or [])]
    if pod_security.get("fsGroup") is not None:
        groups.append(int(pod_security["fsGroup"]))
    security = container.get("securityContext") or {}
    drop = [str(c) for c in (security.get("capabilities") or {}).get("drop") or []]
    return Identity(
        uid=uid,
        gid=int(gid),
        groups=tuple(dict.fromkeys(groups)),
        # Kubernetes' default is to allow escalation unless told otherwise.
        no_new_privs=security.get("allowPrivilegeEscalation") is False,
        drop_all_capabilities="ALL" in drop,
        read_only_root=bool(security.get("readOnlyRootFilesystem")),
    )


@dataclass(frozen=True)
class Ownership:
    """Owner, group and mode bits to apply to a volume's files (None: leave as written)."""

    uid: int
    gid: int
    extra_mode: int  # OR-ed into every file's mode
    extra_dir_mode: int  # OR-ed into every directory's mode


def fs_group(pod: Obj) -> int | None:
    value = (pod["spec"].get("securityContext") or {}).get("fsGroup")
    return None if value is None else int(value)


def volume_ownership(pod: Obj, volume: Obj) -> Ownership | None:
    """The kubelet's SetVolumeOwnership: with an fsGroup, every file of a volume gets that
    group, read bits for it (read and write for writable volumes) and setgid directories;
    without one, files stay root's with the modes the spec asked for."""
    group = fs_group(pod)
    if group is None or "hostPath" in volume:
        return None
    writable = "emptyDir" in volume or "persistentVolumeClaim" in volume
    mode = 0o660 if writable else 0o440
    return Ownership(uid=0, gid=group, extra_mode=mode, extra_dir_mode=0o2000 | mode | 0o110)


def token_owner(pod: Obj, image_uids: Mapping[str, int]) -> int | None:
    """A projected serviceAccountToken file belongs to the containers' common user when the
    pod has no fsGroup and every container runs as the same non-root user (mode 0600); the
    kubelet does this so that a token is readable without loosening its mode."""
    if fs_group(pod) is not None:
        return None
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"].get("containers", [])]
    uids = set()
    for container in containers:
        uid = _security(pod, container, "runAsUser")
        uids.add(image_uids.get(container["name"], 0) if uid is None else int(uid))
    if len(uids) == 1 and 0 not in uids:
        return uids.pop()
    return None
