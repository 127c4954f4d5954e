"""Container probes (httpGet, tcpSocket, exec) as the kubelet runs them."""

from __future__ import annotations

import http.client
import socket
import subprocess
from collections.abc import Mapping
from typing import Any

Obj = dict[str, Any]


def _port(value: int | str, container: Obj) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for port in container.get("ports", []):
        if port.get("name") == value:
            return int(port["containerPort"])
    raise ValueError(f"named port {value!r} not found in container {container['name']!r}")


def run_probe(probe: Obj, container: Obj, pod_ip: str, env: Mapping[str, str]) -> bool:
    """One probe attempt: True on success. Never raises for a failing target."""
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            get = probe["httpGet"]
            host = get.get("host") or pod_ip
            conn_cls = (
                http.client.HTTPSConnection
                if get.get("scheme", "HTTP").upper() == "HTTPS"
                else http.client.HTTPConnection
            )
            conn = conn_cls(host, _port(get["port"], container), timeout=timeout)
            try:
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
                conn.request("GET", get.get("path", "/"), headers=headers)
                return 200 <= conn.getresponse().status < 400
            finally:
                conn.close()
        if "tcpSocket" in probe:
            tcp = probe["tcpSocket"]
            with socket.create_connection(
                (tcp.get("host") or pod_ip, _port(tcp["port"], container)), timeout=timeout
            ):
                return True
        if "exec" in probe:
            result = subprocess.run(
                probe["exec"]["command"],
                env=dict(env),
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            return result.returncode == 0
        if "grpc" in probe:
            return False  # not supported by the process node; documented
    except (OSError, ValueError, subprocess.TimeoutExpired, http.client.HTTPException):
        return False
    return True
