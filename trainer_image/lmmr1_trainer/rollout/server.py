"""The rollout HTTP service (standard-library ThreadingHTTPServer + prometheus-client).

Routes: `POST /generate` (open to the run's trainer; the pods' NetworkPolicy keeps others
out), `POST /update_weights`, `POST /init_weight_sync`, `POST /receive_weights` (each needs
`Authorization: Bearer <token>`, the run's rollout token), `GET /health`, `GET /metrics`.
Errors are JSON `{"error": …, "status": …}`: 400 bad JSON, 401 missing/wrong token, 404/405
route, 413 body too large, 422 wrong shape, 501 a feature this back end lacks, 500 a bug.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from pydantic import BaseModel, ValidationError

from lmmr1_trainer.rollout.backends import BackendUnavailable, RolloutBackend
from lmmr1_trainer.rollout.protocol import (
    WEIGHT_VERSION_HEADER,
    GenerateRequest,
    GenerateResponse,
    NcclInitRequest,
    NcclUpdateRequest,
    WeightUpdateResponse,
)

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_WEIGHTS_BYTES = 64 * 1024**3
_AUTH_ROUTES = ("/update_weights", "/init_weight_sync", "/receive_weights")


class _HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class RolloutMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmmr1_rollout_requests", "HTTP requests", ["endpoint", "code"], registry=self.registry
        )
        self.seconds = Histogram(
            "lmmr1_rollout_request_duration_seconds",
            "Time to answer",
            ["endpoint"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "lmmr1_rollout_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.weight_version = Gauge(
            "lmmr1_rollout_weight_version", "Weight updates applied", registry=self.registry
        )


class RolloutServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], backend: RolloutBackend, token: str) -> None:
        super().__init__(address, _Handler)
        self.backend = backend
        self.token = token
        self.metrics = RolloutMetrics()
        self.weight_version = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RolloutServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: BaseModel | dict[str, Any]) -> None:
        data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
        self._send(status, data.encode(), "application/json")

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        size = int(length)
        if size > limit:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {limit} bytes")
        return self.rfile.read(size)

    def _parse(self, model: type[Any]) -> Any:
        try:
            return model.model_validate_json(self._body(MAX_JSON_BYTES))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise _HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{where}: {first['msg']}") from err

    def _authorise(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode(), self.server.token.encode()
        ):
            raise _HttpError(HTTPStatus.UNAUTHORIZED, "a valid bearer token is required")

    def _dispatch(self, method: str) -> None:
        route = self.path.split("?", 1)[0].rstrip("/") or "/"
        started = time.monotonic()
        status = HTTPStatus.OK
        try:
            routes = {"GET": ("/health", "/metrics"), "POST": ("/generate", *_AUTH_ROUTES)}
            if route not in routes["GET"] + routes["POST"]:
                raise _HttpError(HTTPStatus.NOT_FOUND, f"no route {route}")
            if route not in routes[method]:
                raise _HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{route} does not take {method}")
            if route in _AUTH_ROUTES:
                self._authorise()
            getattr(self, "_route_" + route.strip("/"))()
        except _HttpError as err:
            status = err.status
            self._json(status, {"error": str(err), "status": int(status)})
        except BackendUnavailable as err:
            status = HTTPStatus.NOT_IMPLEMENTED
            self._json(status, {"error": str(err), "status": int(status)})
        except Exception as err:
            logger.exception("rollout request %s failed", route)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            self._json(status, {"error": f"{type(err).__name__}: {err}", "status": int(status)})
        finally:
            metrics = self.server.metrics
            metrics.requests.labels(route, str(int(status))).inc()
            metrics.seconds.labels(route).observe(time.monotonic() - started)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _route_health(self) -> None:
        self._json(
            HTTPStatus.OK,
            {
                "status": "ok",
                "backend": self.server.backend.name,
                "weight_version": self.server.weight_version,
            },
        )

    def _route_metrics(self) -> None:
        self._send(
            HTTPStatus.OK, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST
        )

    def _route_generate(self) -> None:
        request: GenerateRequest = self._parse(GenerateRequest)
        try:
            results = self.server.backend.generate(request)
        except ValueError as err:  # e.g. a text-only model given an image
            raise _HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, str(err)) from err
        self.server.metrics.tokens.inc(sum(len(s.token_ids) for r in results for s in r.samples))
        response = GenerateResponse(results=results, weight_version=self.server.weight_version)
        self._json(HTTPStatus.OK, response)

    def _set_version(self, version: int | None) -> int:
        self.server.weight_version = (
            version if version is not None else self.server.weight_version + 1
        )
        self.server.metrics.weight_version.set(self.server.weight_version)
        return self.server.weight_version

    def _route_update_weights(self) -> None:
        from safetensors.torch import load

        payload = self._body(MAX_WEIGHTS_BYTES)
        try:
            tensors = load(payload)
        except Exception as err:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"not a safetensors payload: {err}") from err
        try:
            count = self.server.backend.load_weights(tensors)
        except ValueError as err:
            raise _HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, str(err)) from err
        header = self.headers.get(WEIGHT_VERSION_HEADER)
        version = self._set_version(int(header) if header else None)
        self._json(HTTPStatus.OK, WeightUpdateResponse(weight_version=version, tensors=count))

    def _route_init_weight_sync(self) -> None:
        self.server.backend.init_nccl(self._parse(NcclInitRequest))
        self._json(HTTPStatus.OK, {"status": "ok"})

    def _route_receive_weights(self) -> None:
        request: NcclUpdateRequest = self._parse(NcclUpdateRequest)
        count = self.server.backend.receive_nccl(request)
        version = self._set_version(request.weight_version)
        self._json(HTTPStatus.OK, WeightUpdateResponse(weight_version=version, tensors=count))
