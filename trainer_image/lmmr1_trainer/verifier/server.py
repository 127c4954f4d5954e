"""The verifier's HTTP service (standard-library ThreadingHTTPServer + prometheus-client).

Endpoints: `POST /get_reward` (OpenRLHF / LMM-R1), `POST /v1/rewards` (per-reward breakdown),
`GET /healthz`, `GET /metrics`. Every error is a JSON body `{"error": …, "status": …}` with a
4xx code for a bad request (400 malformed JSON, 404/405 route, 411 no Content-Length,
413 body or batch too large, 422 wrong shape, naming the field) and 500 only for a bug.
The body is never read past `limits.max_request_bytes`, a slow client is cut off after
`limits.read_timeout_s`, and scoring cannot hang (see pool.py).
"""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from pydantic import BaseModel, ValidationError

from lmmr1_trainer.verifier.config import VerifierConfig, describe_validation_error
from lmmr1_trainer.verifier.engine import Sample, Verifier
from lmmr1_trainer.verifier.protocol import (
    ErrorResponse,
    GetRewardRequest,
    GetRewardResponse,
    RewardBreakdown,
    RewardResult,
    RewardsRequest,
    RewardsResponse,
    RewardsSummary,
)
from lmmr1_trainer.verifier.rewards import SampleResult, UnknownTaskError

logger = logging.getLogger(__name__)

_POST_ROUTES = ("/get_reward", "/v1/rewards")
_GET_ROUTES = ("/healthz", "/metrics")
_REWARD_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
_ModelT = TypeVar("_ModelT", bound=BaseModel)


class VerifierMetrics:
    """Prometheus metrics on a registry of their own (several servers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmmr1_verifier_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "lmmr1_verifier_request_duration_seconds",
            "Time to answer a request",
            ["endpoint"],
            registry=self.registry,
        )
        self.samples = Counter(
            "lmmr1_verifier_samples",
            "Scored samples by task and accuracy status",
            ["task", "status"],
            registry=self.registry,
        )
        self.reward = Histogram(
            "lmmr1_verifier_reward",
            "Total reward per sample",
            buckets=_REWARD_BUCKETS,
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "lmmr1_verifier_worker_restarts",
            "Workers replaced, by reason (timeout, crash, deadline)",
            ["reason"],
            registry=self.registry,
        )
        self.workers_alive = Gauge(
            "lmmr1_verifier_workers_alive", "Worker processes up", registry=self.registry
        )
        self.in_flight = Gauge(
            "lmmr1_verifier_requests_in_flight", "Requests being answered", registry=self.registry
        )

    def observe(self, results: list[SampleResult]) -> None:
        for result in results:
            self.samples.labels(task=result.task, status=result.status.value).inc()
            self.reward.observe(result.reward)


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class VerifierServer(ThreadingHTTPServer):
    """Serves one Verifier; `serve_forever()` in the main thread, `shutdown()` from another."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, config: VerifierConfig, verifier: Verifier, metrics: VerifierMetrics):
        self.config = config
        self.verifier = verifier
        self.metrics = metrics
        metrics.workers_alive.set_function(lambda: float(verifier.workers_alive()))
        super().__init__((config.host, config.port), VerifierRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class VerifierRequestHandler(BaseHTTPRequestHandler):
    server: VerifierServer
    protocol_version = "HTTP/1.1"
    server_version = "lmmr1-verifier"
    error_content_type = "application/json"

    def setup(self) -> None:
        super().setup()
        self.request.settimeout(self.server.config.limits.read_timeout_s)

    # -- plumbing ----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors from http.server (bad request line, 501 method…) as JSON."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method is the client's mistake
            code = HTTPStatus.METHOD_NOT_ALLOWED
        status = HTTPStatus(code)
        self.close_connection = True
        self._send_json(status, ErrorResponse(error=message or status.phrase, status=code))

    def _send_json(self, status: HTTPStatus, body: BaseModel) -> None:
        self._send(status, body.model_dump_json().encode(), "application/json")

    def _send(self, status: HTTPStatus, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            path = getattr(self, "path", "").split("?")[0]
            self.send_header("Allow", "POST" if path in _POST_ROUTES else "GET, HEAD")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _endpoint(self) -> str:
        path = self.path.split("?")[0]
        return path if path in _POST_ROUTES + _GET_ROUTES else "other"

    def _dispatch(self, routes: tuple[str, ...], other: tuple[str, ...]) -> None:
        endpoint = self._endpoint()
        metrics = self.server.metrics
        started = time.monotonic()
        metrics.in_flight.inc()
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        try:
            if endpoint in other:
                raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} {endpoint}")
            if endpoint not in routes:
                raise HttpError(HTTPStatus.NOT_FOUND, f"no route {self.path.split('?')[0]!r}")
            status, payload, content_type = self._route(endpoint)
            self._send(status, payload, content_type)
        except HttpError as exc:
            status = exc.status
            self._send_json(status, ErrorResponse(error=exc.message, status=status.value))
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            logger.exception("unexpected error answering %s %s", self.command, self.path[:200])
            self.close_connection = True
            self._send_json(status, ErrorResponse(error="internal error", status=status.value))
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint=endpoint, code=str(int(status))).inc()
            metrics.request_seconds.labels(endpoint=endpoint).observe(time.monotonic() - started)

    def do_GET(self) -> None:
        self._dispatch(_GET_ROUTES, _POST_ROUTES)

    def do_POST(self) -> None:
        self._dispatch(_POST_ROUTES, _GET_ROUTES)

    def do_HEAD(self) -> None:
        self._dispatch(_GET_ROUTES, _POST_ROUTES)

    def do_PUT(self) -> None:
        self._dispatch((), _POST_ROUTES + _GET_ROUTES)

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    # -- routes ------------------------------------------------------------------------------

    def _route(self, endpoint: str) -> tuple[HTTPStatus, bytes, str]:
        if endpoint == "/healthz":
            return self._healthz()
        if endpoint == "/metrics":
            return HTTPStatus.OK, generate_latest(self.server.metrics.registry), CONTENT_TYPE_LATEST
        body = self._read_json()
        if endpoint == "/get_reward":
            response: BaseModel = self._get_reward(body)
        else:
            response = self._rewards(body)
        return HTTPStatus.OK, response.model_dump_json().encode(), "application/json"

    def _healthz(self) -> tuple[HTTPStatus, bytes, str]:
        verifier = self.server.verifier
        wanted = self.server.config.pool.workers
        alive = verifier.workers_alive()
        healthy = wanted == 0 or alive > 0
        body = {"status": "ok" if healthy else "no workers", "workers": wanted, "alive": alive}
        status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
        return status, json.dumps(body).encode(), "application/json"

    def _read_json(self) -> dict[str, Any]:
        limits = self.server.config.limits
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError(length_header)
        except ValueError:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if length > limits.max_request_bytes:
            self.close_connection = True
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is over limits.max_request_bytes "
                f"({limits.max_request_bytes}); send smaller batches",
            )
        raw = self.rfile.read(length)
        if len(raw) != length:
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, "the body ended before Content-Length")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {exc}"[:300]) from None
        if not isinstance(body, dict):
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, "the body must be a JSON object")
        return body

    def _validate(self, model: type[_ModelT], body: dict[str, Any]) -> _ModelT:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            message = describe_validation_error(exc)
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, message[:2000]) from None

    def _check_batch(self, size: int) -> None:
        limit = self.server.config.limits.max_batch_size
        if size > limit:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"batch of {size} samples is over limits.max_batch_size ({limit})",
            )

    def _get_reward(self, body: dict[str, Any]) -> GetRewardResponse:
        request = self._validate(GetRewardRequest, body)
        self._check_batch(len(request.query))
        verifier = self.server.verifier
        results = verifier.score(verifier.samples_from_queries(request.query, request.labels))
        self.server.metrics.observe(results)
        return GetRewardResponse.from_results(results)

    def _rewards(self, body: dict[str, Any]) -> RewardsResponse:
        started = time.monotonic()
        request = self._validate(RewardsRequest, body)
        self._check_batch(len(request.samples))
        verifier = self.server.verifier
        template = request.prompt_template or self.server.config.prompt_template
        samples = []
        for index, item in enumerate(request.samples):
            if item.task is not None:
                try:
                    verifier.check_task(item.task)
                except UnknownTaskError as exc:
                    raise HttpError(
                        HTTPStatus.UNPROCESSABLE_ENTITY, f"samples.{index}.task: {exc}"
                    ) from None
            if item.query is not None:
                extracted = verifier.extract(item.query, template)
                text, found = extracted.text, extracted.marker_found
            else:
                text, found = item.response or "", True
            samples.append(Sample(text, item.label, item.task, marker_found=found))
        results = verifier.score(samples)
        self.server.metrics.observe(results)
        count = len(results)
        weights = self.server.config.weights
        return RewardsResponse(
            results=[
                RewardResult.from_result(item.id, result)
                for item, result in zip(request.samples, results, strict=True)
            ],
            summary=RewardsSummary(
                count=count,
                mean_reward=sum(r.reward for r in results) / count if count else 0.0,
                mean_accuracy=sum(r.accuracy_score for r in results) / count if count else 0.0,
                skipped=sum(r.skip for r in results),
                elapsed_s=round(time.monotonic() - started, 6),
            ),
            weights=RewardBreakdown(format=weights.format, accuracy=weights.accuracy),
            profile=self.server.config.profile.value,
            unparseable_label_policy=self.server.config.unparseable_label_policy.value,
        )
