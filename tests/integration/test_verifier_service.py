"""The verifier as a real service: `python -m lmmr1_trainer.verifier` in a subprocess on a free
loopback port, called the way OpenRLHF / LMM-R1 call a remote reward model, then fuzzed.

No Kubernetes test bed: the service is started and stopped here.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

UNIT_TESTS = Path(__file__).resolve().parents[1] / "unit"  # holds the test_verifier_plugins
SAMPLE_TIMEOUT_S = 3.0
MAX_BATCH = 64
MAX_BODY = 1_000_000


def _start_service(port: int) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(UNIT_TESTS), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "lmmr1_trainer.verifier",
        "--host", "127.0.0.1", "--port", str(port), "--prompt-template", "chatml",
        "--workers", "2", "--math-timeout-s", "1", "--sample-timeout-s", str(SAMPLE_TIMEOUT_S),
        "--request-deadline-s", "20", "--max-batch-size", str(MAX_BATCH),
        "--max-request-bytes", str(MAX_BODY), "--plugin", "test_verifier_plugins",
        "--log-level", "WARNING",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def _wait_listening(process: subprocess.Popen[str], within_s: float = 60) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    try:
        line = lines.get(timeout=within_s)
    except queue.Empty:
        process.kill()
        raise AssertionError("the verifier did not start") from None
    assert line.startswith("lmmr1-verifier listening on http://127.0.0.1:"), line
    return line.split()[-1]


def _stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    process = _start_service(0)
    url = _wait_listening(process)
    yield url
    assert _stop(process) == 0, "the verifier must exit cleanly on SIGTERM"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class OpenRLHFClient:
    """What openrlhf/utils/remote_rm_utils.py does (LMM-R1 fork): POST the JSON payload with
    a 180 s timeout, raise on an HTTP error, require the score key, retry up to 5 times with
    1 s between tries, then give up with an exception. Records each try's outcome."""

    def __init__(self, try_max_times: int = 5) -> None:
        self.try_max_times = try_max_times
        self.tries: list[str] = []

    def remote_rm_fn(
        self, url: str, queries: list[str], prompts: list[str], labels: list[Any]
    ) -> dict[str, Any]:
        data = {"query": queries, "prompts": prompts, "labels": labels}
        headers = {"Content-Type": "application/json"}
        for _ in range(self.try_max_times):
            try:
                response = requests.post(url=url, json=data, headers=headers, timeout=180)
                response.raise_for_status()
                body: dict[str, Any] = response.json()
                assert "rewards" in body, f"rewards not in {body}"
                self.tries.append("ok")
                return body
            except Exception as exc:
                self.tries.append(type(exc).__name__)
            time.sleep(1)
        raise RuntimeError(f"Request error for {self.try_max_times} times")


def chatml(question: str, response: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>"
        "<|endoftext|><|endoftext|>"
    )


# Scored by the default profile, lmm-r1 (the reference): the whole response is read and only
# boxed or $-delimited answers count; every label goes to math; an unparseable label earns 1.
ROWS = [  # (response, label, reward, acc_reward, label_unparseable)
    (r"<think>1+1=2</think><answer>\boxed{2}</answer>", "2", 1.5, 1.0, 0),
    (r"<think>1+1=3</think><answer>\boxed{3}</answer>", "2", 0.5, 0.0, 0),
    (r"So \boxed{\frac{1}{2}}", 0.5, 1.0, 1.0, 0),
    ("<think>options</think><answer>(B) 42</answer>", "B", 0.5, 0.0, 0),
    (r"<think>t</think><answer>\boxed{2}</answer>", "", 1.5, 1.0, 1),
    ("<think>t</think>\n<answer>$[1,2)$</answer>", "[1,2)", 1.0, 1.0, 0),
]


def test_openrlhf_client_gets_rewards_for_chat_templated_queries(service: str) -> None:
    client = OpenRLHFClient()
    queries = [chatml("q", response) for response, *_ in ROWS]
    body = client.remote_rm_fn(
        f"{service}/get_reward", queries, ["q"] * len(ROWS), [row[1] for row in ROWS]
    )
    assert client.tries == ["ok"]
    assert set(body) == {
        "rewards",
        "format_rewards",
        "acc_rewards",
        "label_unparseable",
        "timed_out",
    }
    assert body["rewards"] == [row[2] for row in ROWS]
    assert body["acc_rewards"] == [row[3] for row in ROWS]
    assert body["format_rewards"] == [0.5, 0.5, 0.0, 0.5, 0.5, 0.0]
    assert body["label_unparseable"] == [row[4] for row in ROWS]
    assert body["timed_out"] == [0] * len(ROWS)


def test_openrlhf_client_retries_until_the_verifier_is_up() -> None:
    port = _free_port()
    client = OpenRLHFClient(try_max_times=60)  # the service may take long to start under load
    answers: list[dict[str, Any]] = []
    caller = threading.Thread(
        target=lambda: answers.append(
            client.remote_rm_fn(
                f"http://127.0.0.1:{port}/get_reward",
                [chatml("q", r"<think>a</think><answer>\boxed{4}</answer>")],
                ["q"],
                ["4"],
            )
        )
    )
    caller.start()
    while not client.tries:  # the first try finds nothing listening
        time.sleep(0.05)
    process = _start_service(port)
    try:
        caller.join(timeout=120)  # a bound for a loaded machine, not a timing check
        assert answers == [
            {
                "rewards": [1.5],
                "format_rewards": [0.5],
                "acc_rewards": [1.0],
                "label_unparseable": [0],
                "timed_out": [0],
            }
        ]
        assert client.tries[0] == "ConnectionError" and client.tries[-1] == "ok"
    finally:
        _stop(process)


def test_openrlhf_client_gives_up_on_a_bad_request(service: str) -> None:
    client = OpenRLHFClient(try_max_times=2)
    with pytest.raises(RuntimeError, match="Request error for 2 times"):
        client.remote_rm_fn(f"{service}/get_reward", ["a", "b"], ["p", "p"], ["1"])
    assert client.tries == ["HTTPError", "HTTPError"]


def test_v1_rewards_breaks_each_reward_down(service: str) -> None:
    samples = [
        {"id": "s0", "response": r"<think>t</think><answer>\boxed{3.14159}</answer>",
         "label": r"\pi", "task": "numeric"},
        {"id": "s1", "query": chatml("q", "<think>t</think><answer>C</answer>"), "label": "(C)"},
        {"id": "s2", "response": "<think>t</think><answer>1</answer>", "label": "$$"},
    ]  # fmt: skip
    response = requests.post(f"{service}/v1/rewards", json={"samples": samples}, timeout=60)
    assert response.status_code == 200
    body = response.json()
    first, second, third = body["results"]
    assert first["id"] == "s0" and first["task"] == "numeric" and first["reward"] == 1.5
    assert first["rewards"] == {"format": 0.5, "accuracy": 1.0}
    assert first["extracted_answer"] == "3.14159"
    # lmm-r1 sends letters to math too: a bare C is no anchored answer.
    assert (second["task"], second["reward"], second["status"]) == ("math", 0.5, "no_answer")
    assert (third["status"], third["skip"], third["flags"]) == (
        "label_unparseable",
        True,
        ["label_unparseable"],
    )
    assert third["scores"] == {"format": 1.0, "accuracy": 1.0}  # lmm-r1: the reference's 1
    assert body["summary"]["count"] == 3 and body["summary"]["skipped"] == 1
    assert body["weights"] == {"format": 0.5, "accuracy": 1.0}
    assert (body["profile"], body["unparseable_label_policy"]) == ("lmm-r1", "one")


def _wait_healthy(service: str, workers: int = 2, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while True:
        health = requests.get(f"{service}/healthz", timeout=10).json()
        if health["alive"] == workers:
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.1)


def test_hung_and_crashing_samples_do_not_break_the_batch(service: str) -> None:
    _wait_healthy(service)
    samples = [
        {"response": "x", "label": "60", "task": "test-hang"},
        {"response": "x", "label": "1", "task": "test-crash"},
        {"response": r"<think>t</think><answer>\boxed{7}</answer>", "label": "7"},
    ]
    started = time.monotonic()
    response = requests.post(f"{service}/v1/rewards", json={"samples": samples}, timeout=60)
    assert time.monotonic() - started < SAMPLE_TIMEOUT_S + 3
    statuses = [(r["status"], r["reward"]) for r in response.json()["results"]]
    assert statuses == [("timeout", 0.0), ("error", 0.0), ("ok", 1.5)]
    _wait_healthy(service)
    metrics = requests.get(f"{service}/metrics", timeout=10).text
    assert 'lmmr1_verifier_worker_restarts_total{reason="timeout"}' in metrics
    assert 'lmmr1_verifier_worker_restarts_total{reason="crash"}' in metrics


def _raw(service: str, method: str, path: str, body: bytes = b"", **headers: str) -> Any:
    parts = urlsplit(service)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name.replace("_", "-"), value)
    connection.endheaders(body or None)
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


def test_bad_requests_get_a_4xx_json_error(service: str) -> None:
    def post(body: bytes, **headers: str) -> Any:
        return _raw(service, "POST", "/get_reward", body, Content_Length=str(len(body)), **headers)

    cases = {
        "not json": (post(b'{"query": [}'), 400, "not JSON"),
        "bad utf-8": (post(b'{"query": ["\xff"]}'), 400, "not JSON"),
        "json list": (post(b"[1, 2]"), 422, "must be a JSON object"),
        "bad shape": (post(b'{"query": [1], "labels": ["1"]}'), 422, "query.0: Input should be"),
        "no length": (_raw(service, "POST", "/get_reward", b""), 411, "Content-Length"),
        "too large": (
            _raw(service, "POST", "/get_reward", b"{}", Content_Length=str(MAX_BODY + 1)),
            413,
            "limits.max_request_bytes",
        ),
        "batch": (
            post(json.dumps({"query": ["a"] * 65, "labels": ["1"] * 65}).encode()),
            413,
            "limits.max_batch_size",
        ),
        "unknown path": (_raw(service, "GET", "/nope"), 404, "no route"),
        "wrong method": (_raw(service, "GET", "/get_reward"), 405, "GET /get_reward"),
        "odd method": (_raw(service, "BREW", "/get_reward"), 405, "BREW"),
        "unknown task": (
            _raw(
                service,
                "POST",
                "/v1/rewards",
                b'{"samples": [{"response": "x", "label": "1", "task": "tetris"}]}',
                Content_Length="64",
            ),
            422,
            "samples.0.task: unknown task 'tetris'",
        ),
    }
    for name, ((status, body), expected_status, message) in cases.items():
        assert status == expected_status, (name, body)
        assert body["status"] == expected_status and message in body["error"], (name, body)


def test_health_and_metrics(service: str) -> None:
    health = requests.get(f"{service}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = requests.get(f"{service}/metrics", timeout=10)
    assert metrics.headers["Content-Type"].startswith("text/plain")
    for name in (
        "lmmr1_verifier_requests_total",
        "lmmr1_verifier_request_duration_seconds_bucket",
        "lmmr1_verifier_samples_total",
        "lmmr1_verifier_reward_bucket",
        "lmmr1_verifier_workers_alive 2.0",
    ):
        assert name in metrics.text


# -- fuzzing -----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
latexish = st.lists(
    st.sampled_from(
        ["<think>", "</think>", "<answer>", "</answer>", r"\boxed{", r"\frac{", "{", "}", "^",
         "_", "(", ")", "[", "]", r"\pi", r"\sqrt", "1", "2", "x", "-", ",", "$", "\\", " ", "B",
         "%", r"^\circ", r"\infty", "<|im_end|>", "<|im_start|>assistant\n", "é", "\x00"]
    ),
    max_size=25,
).map("".join)  # fmt: skip
fuzz = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
_session = requests.Session()


def _post_json(url: str, payload: Any) -> requests.Response:
    """POST like a Python client would: json.dumps writes NaN/Infinity as bare tokens
    (requests' `json=` refuses them), so the server sees those too."""
    return _session.post(
        url, data=json.dumps(payload), timeout=60, headers={"Content-Type": "application/json"}
    )


def _check_answer(response: requests.Response) -> dict[str, Any]:
    assert response.status_code in (200, 400, 413, 422), response.text[:300]
    body: dict[str, Any] = response.json()
    if response.status_code != 200:
        assert body["status"] == response.status_code and body["error"]
    return body


@fuzz
@given(payload=json_values | st.fixed_dictionaries({"query": json_values, "labels": json_values}))
def test_fuzz_any_json_gets_an_answer(service: str, payload: Any) -> None:
    for path in ("/get_reward", "/v1/rewards"):
        _check_answer(_post_json(f"{service}{path}", payload))


@fuzz
@given(body=st.binary(max_size=200))
def test_fuzz_any_bytes_get_an_answer(service: str, body: bytes) -> None:
    _check_answer(_session.post(f"{service}/get_reward", data=body, timeout=60))


@fuzz
@given(
    rows=st.lists(
        st.tuples(latexish, latexish | st.none() | st.floats(allow_nan=False)), max_size=4
    )
)
def test_fuzz_well_shaped_requests_score_every_sample(
    service: str, rows: list[tuple[str, Any]]
) -> None:
    queries = [chatml("q", response) for response, _ in rows]
    labels = [label for _, label in rows]
    payload = {"query": queries, "prompts": ["q"] * len(rows), "labels": labels}
    body = _check_answer(_post_json(f"{service}/get_reward", payload))
    if any(isinstance(label, float) and not math.isfinite(label) for label in labels):
        return  # infinities are not labels: 422
    assert len(body["rewards"]) == len(rows)
    for total, form, accuracy in zip(
        body["rewards"], body["format_rewards"], body["acc_rewards"], strict=True
    ):
        assert form in (0.0, 0.5) and accuracy in (0.0, 1.0) and total == form + accuracy


def test_the_service_is_healthy_after_fuzzing(service: str) -> None:
    _wait_healthy(service)
