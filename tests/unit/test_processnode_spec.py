"""The process node's pure pod-spec translation."""

from __future__ import annotations

import base64
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from lmmr1_testbed.processnode import spec

POD = {
    "metadata": {
        "name": "p",
        "namespace": "ns",
        "uid": "u-1",
        "labels": {"app": "x"},
        "annotations": {"a": "b"},
    },
    "spec": {"nodeName": "n1", "serviceAccountName": "sa"},
    "status": {"podIP": "127.101.0.7", "hostIP": "127.0.0.1", "podIPs": [{"ip": "127.101.0.7"}]},
}
OBJECTS = {
    ("secret", "creds"): {"KEY": b"s3cret", "OTHER": b"o"},
    ("configmap", "cfg"): {"mode": b"fast", "config.yaml": b"a: 1\n"},
}


def lookup(kind: str, name: str) -> dict[str, bytes] | None:
    return OBJECTS.get((kind, name))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500m", Decimal("0.5")),
        ("2Gi", Decimal(2 * 2**30)),
        ("1e3", Decimal(1000)),
        ("8", Decimal(8)),
        ("1.5k", Decimal(1500)),
    ],
)
def test_parse_quantity(text: str, expected: Decimal) -> None:
    assert spec.parse_quantity(text) == expected


def test_parse_quantity_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        spec.parse_quantity("2 lots")


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert spec.expand("$(A)-$(B)", env) == "1-two"
    assert spec.expand("$$(A)", env) == "$(A)"  # escaped
    assert spec.expand("$(MISSING)", env) == "$(MISSING)"  # unknown stays literally


def test_container_env_resolves_every_source_in_order() -> None:
    container = {
        "name": "c",
        "resources": {"limits": {"nvidia.com/gpu": "2", "memory": "1Gi"}},
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "ADDR", "value": "$(POD_IP):8000"},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "KEY"}}},
            {
                "name": "OPT",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "K", "optional": True}},
            },
            {
                "name": "MEM_MI",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
        ],
    }
    env = spec.container_env(POD, container, lookup, {"PATH": "/bin"})
    assert env["ADDR"] == "127.101.0.7:8000"
    assert env["APP"] == "x"
    assert env["KEY"] == "s3cret"
    assert "OPT" not in env
    assert env["CFG_mode"] == "fast"
    assert env["MEM_MI"] == "1024"
    assert env["PATH"] == "/bin"


def test_missing_secret_is_a_config_error_naming_it() -> None:
    container = {
        "name": "c",
        "env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "K"}}}],
    }
    with pytest.raises(spec.ConfigError, match="secret ns/'absent' not found"):
        spec.container_env(POD, container, lookup, {})


def test_command_line_needs_a_command() -> None:
    with pytest.raises(spec.ConfigError, match="no command"):
        spec.command_line({"name": "c", "image": "busybox"}, {})
    argv = spec.command_line({"name": "c", "command": ["echo"], "args": ["$(X)"]}, {"X": "hi"})
    assert argv == ["echo", "hi"]


def test_volume_content_for_each_type() -> None:
    def token(projection: dict[str, object]) -> str:
        return f"token-for-{projection.get('audience', 'api')}"

    projected = spec.volume_content(
        POD,
        {
            "name": "kube-api-access",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "cfg", "items": [{"key": "mode", "path": "m"}]}},
                    {
                        "downwardAPI": {
                            "items": [
                                {
                                    "path": "namespace",
                                    "fieldRef": {"fieldPath": "metadata.namespace"},
                                }
                            ]
                        }
                    },
                ]
            },
        },
        lookup,
        token,
    )
    assert isinstance(projected, spec.VolumeFiles)
    assert projected.files["token"][0] == b"token-for-api"
    assert projected.files["m"][0] == b"fast"
    assert projected.files["namespace"][0] == b"ns"

    secret = spec.volume_content(
        POD, {"name": "s", "secret": {"secretName": "creds", "defaultMode": 0o400}}, lookup, token
    )
    assert isinstance(secret, spec.VolumeFiles)
    assert secret.files["KEY"] == (b"s3cret", 0o400)
    assert spec.volume_content(POD, {"name": "e", "emptyDir": {}}, lookup, token) == spec.VolumeDir(
        "emptyDir", ""
    )
    with pytest.raises(spec.ConfigError, match="not found"):
        spec.volume_content(POD, {"name": "c", "configMap": {"name": "absent"}}, lookup, token)


def test_decode_secret_and_configmap() -> None:
    assert spec.decode_secret({"data": {"k": base64.b64encode(b"v").decode()}}) == {"k": b"v"}
    assert spec.decode_configmap({"data": {"k": "v"}}) == {"k": b"v"}


def test_launch_script_bind_mounts_in_a_private_namespace(tmp_path: Path) -> None:
    source = tmp_path / "vol"
    source.mkdir()
    (source / "config.yaml").write_text("hello from the volume\n")
    target = tmp_path / "mnt" / "etc"
    argv = spec.launch_script(
        [(str(source), str(target), True)],
        str(tmp_path),
        ["sh", "-c", "cat $0/config.yaml; pwd", str(target)],
    )
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["hello from the volume", str(tmp_path)]
    # The mount lived only in the container's namespace.
    assert not (target / "config.yaml").exists()


def test_a_mount_over_the_sources_parent_goes_last(tmp_path: Path) -> None:
    """An emptyDir at a path above the other volumes' sources must not hide them."""
    volumes = tmp_path / "pod" / "volumes"
    (volumes / "tmp").mkdir(parents=True)
    (volumes / "config").mkdir()
    (volumes / "config" / "stage.yaml").write_text("ok\n")
    target_root = tmp_path  # plays /tmp: an ancestor of every source
    config_target = tmp_path.parent / f"{tmp_path.name}-etc"
    argv = spec.launch_script(
        [
            (str(volumes / "tmp"), str(target_root), False),
            (str(volumes / "config"), str(config_target), True),
        ],
        "/",
        ["cat", str(config_target / "stage.yaml")],
    )
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


# ----- identities and volume ownership: the kubelet's rules, and the kernel enforcing them ---


def pod_with(security: dict[str, object], container_security: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    container = {
        "name": "c",
        **({"securityContext": container_security} if container_security else {}),
    }
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {"securityContext": security, "containers": [container]},
    }, container


def test_identity_comes_from_the_container_then_the_pod_then_the_image() -> None:
    pod, container = pod_with({"runAsUser": 2000, "fsGroup": 3000, "supplementalGroups": [4000]})
    identity = spec.container_identity(pod, container, 1000, 1000)
    assert (identity.uid, identity.gid, identity.groups) == (2000, 0, (0, 4000, 3000))
    pod, container = pod_with({"runAsUser": 2000}, {"runAsUser": 5000, "runAsGroup": 5001})
    assert spec.container_identity(pod, container, 1000, 1000).uid == 5000
    pod, container = pod_with({})
    identity = spec.container_identity(pod, container, 1000, 1000)
    assert (identity.uid, identity.gid, identity.no_new_privs) == (1000, 1000, False)


def test_run_as_non_root_refuses_an_image_that_runs_as_root() -> None:
    pod, container = pod_with({"runAsNonRoot": True})
    with pytest.raises(spec.ConfigError, match="runAsNonRoot and image will run as root"):
        spec.container_identity(pod, container, 0, 0)
    pod, container = pod_with({"runAsNonRoot": True}, {"runAsUser": 0})
    with pytest.raises(spec.ConfigError, match="container: c"):
        spec.container_identity(pod, container, 1000, 1000)
    pod, container = pod_with({"runAsNonRoot": True})
    assert spec.container_identity(pod, container, 1000, 1000).uid == 1000


def test_fs_group_makes_read_only_volumes_group_readable_and_writable_ones_group_writable() -> None:
    pod, _ = pod_with({"fsGroup": 3000})
    secret = spec.volume_ownership(pod, {"name": "s", "secret": {"secretName": "x"}})
    assert secret == spec.Ownership(0, 3000, 0o440, 0o2550)
    empty = spec.volume_ownership(pod, {"name": "e", "emptyDir": {}})
    assert empty is not None and empty.extra_mode == 0o660
    assert spec.volume_ownership(pod, {"name": "h", "hostPath": {"path": "/x"}}) is None
    pod, _ = pod_with({})
    assert spec.volume_ownership(pod, {"name": "s", "secret": {"secretName": "x"}}) is None


def test_a_token_belongs_to_the_pods_single_non_root_user_without_fs_group() -> None:
    pod, _ = pod_with({})
    assert spec.token_owner(pod, {"c": 1000}) == 1000
    assert spec.token_owner(pod, {"c": 0}) is None
    pod, _ = pod_with({"fsGroup": 1000})
    assert spec.token_owner(pod, {"c": 1000}) is None


def run_as(identity: spec.Identity, mounts: list[tuple[str, str, bool]], script: str):  # type: ignore[no-untyped-def]
    argv = spec.launch_script(mounts, "/", ["sh", "-c", script], identity=identity)
    return subprocess.run(argv, capture_output=True, text=True, check=False)


UID_1000 = spec.Identity(1000, 1000, (), True, True, False)


@pytest.fixture
def root_secret(tmp_path: Path) -> Path:
    """A secret volume as the kubelet writes one without fsGroup: root-owned, mode 0400."""
    volume = tmp_path / "secret"
    volume.mkdir()
    (volume / "token").write_text("s3cret\n")
    (volume / "token").chmod(0o400)
    return volume


def test_a_root_owned_0400_secret_is_unreadable_to_uid_1000(root_secret: Path) -> None:
    result = run_as(
        UID_1000, [(str(root_secret), "/etc/lmmr1-unit", True)], "id -u; cat /etc/lmmr1-unit/token"
    )
    assert result.stdout.splitlines() == ["1000"]
    assert result.returncode != 0 and "Permission denied" in result.stderr


def test_the_same_secret_is_readable_with_the_right_fs_group(root_secret: Path) -> None:
    import os

    from lmmr1_testbed.processnode.runner import _apply_ownership

    _apply_ownership(root_secret, spec.Ownership(0, 3000, 0o440, 0o2550))
    assert (root_secret / "token").stat().st_mode & 0o777 == 0o440
    assert os.stat(root_secret / "token").st_gid == 3000
    identity = spec.Identity(1000, 1000, (3000,), True, True, False)
    result = run_as(
        identity, [(str(root_secret), "/etc/lmmr1-unit", True)], "cat /etc/lmmr1-unit/token"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "s3cret\n"


def test_a_read_only_root_filesystem_refuses_writes_except_to_volumes(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o777)
    read_only = spec.Identity(1000, 1000, (), True, True, True)
    script = (
        "touch /var/tmp/lmmr1-unit-$$ && echo root-writable; "
        "touch /scratch/ok && echo volume-writable"
    )
    result = run_as(read_only, [(str(scratch), "/scratch", False)], script)
    assert "Read-only file system" in result.stderr
    assert result.stdout.splitlines() == ["volume-writable"]
    writable = spec.Identity(0, 0, (), False, False, False)
    result = run_as(
        writable, [], "touch /var/tmp/lmmr1-unit-probe && rm /var/tmp/lmmr1-unit-probe && echo ok"
    )
    assert result.stdout == "ok\n", result.stderr
