"""python -m lmmr1_trainer.verifier --host "$POD_IP" --port 5000 --prompt-template chatml

Starts the rule-based verifier service (the trainer pod's native sidecar). It binds to
`--host` (default 127.0.0.1; in the pod, the pod IP from the downward API), starts the worker
pool, prints one line `lmmr1-verifier listening on http://HOST:PORT` to stdout once it accepts
requests (`--port 0` picks a free port and prints it), and stops cleanly on SIGTERM/SIGINT.

Settings come from `--config FILE` (JSON or YAML, the `VerifierConfig` model) and the flags
below, flags winning. A bad setting or argument (an unknown flag included: an operator newer
than the image) exits with status 78 (EX_CONFIG) and a message naming the field, on stderr
and in the termination message (/dev/termination-log), so the operator fails the run at
once instead of restarting the sidecar.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from lmmr1_trainer.launch import config_error
from lmmr1_trainer.verifier.config import (
    AnswerSource,
    ConfigError,
    PromptTemplate,
    RewardProfile,
    UnparseableLabelPolicy,
    VerifierConfig,
    load_config,
)

logger = logging.getLogger("lmmr1_trainer.verifier")

# flag dest → path in VerifierConfig
_FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "profile": ("profile",),
    "host": ("host",),
    "port": ("port",),
    "prompt_template": ("prompt_template",),
    "workers": ("pool", "workers"),
    "worker_memory_mb": ("pool", "worker_memory_mb"),
    "unparseable_label_policy": ("unparseable_label_policy",),
    "format_weight": ("weights", "format"),
    "accuracy_weight": ("weights", "accuracy"),
    "allow_whitespace_between_blocks": ("format", "allow_whitespace_between_blocks"),
    "default_task": ("accuracy", "default_task"),
    "answer_source": ("accuracy", "answer_source"),
    "math_timeout_s": ("accuracy", "math_timeout_s"),
    "sample_timeout_s": ("limits", "sample_timeout_s"),
    "request_deadline_s": ("limits", "request_deadline_s"),
    "max_response_chars": ("limits", "max_response_chars"),
    "max_request_bytes": ("limits", "max_request_bytes"),
    "max_batch_size": ("limits", "max_batch_size"),
    "plugin": ("plugins",),
}


class _Parser(argparse.ArgumentParser):
    """Bad arguments are a configuration error (exit 78 from `main`), not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise ConfigError(f"arguments: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m lmmr1_trainer.verifier",
        description="Rule-based reward service for LMM-R1 (format + accuracy rewards).",
    )
    add = parser.add_argument
    add("--config", type=Path, help="VerifierConfig as a JSON or YAML file")
    add(
        "--profile",
        choices=[p.value for p in RewardProfile],
        help="the scoring rules' defaults (default lmm-r1: the reference exactly)",
    )
    add("--host", help="address to bind (default 127.0.0.1; in a pod: its IP)")
    add("--port", type=int, help="port to bind (default 5000; 0 picks a free one)")
    add("--prompt-template", choices=[t.value for t in PromptTemplate], help="default chatml")
    add("--workers", type=int, help="verifier processes (default 2, at least 1)")
    add("--worker-memory-mb", type=int, help="address-space limit per worker (default 2048)")
    add(
        "--unparseable-label-policy",
        choices=[p.value for p in UnparseableLabelPolicy],
        help="accuracy for labels that do not parse (default: the profile's; lmm-r1: one)",
    )
    add("--format-weight", type=float, help="weight of the format reward (default 0.5)")
    add("--accuracy-weight", type=float, help="weight of the accuracy reward (default 1.0)")
    add(
        "--allow-whitespace-between-blocks",
        action="store_const",
        const=True,
        help="accept whitespace between </think> and <answer> (LMM-R1 does not)",
    )
    add("--default-task", help="verifier for samples without a task (default: the profile's)")
    add(
        "--answer-source",
        choices=[s.value for s in AnswerSource],
        help="default: the profile's (lmm-r1: full_response)",
    )
    add("--math-timeout-s", type=int, help="math-verify's own timeout per call (default 5)")
    add("--sample-timeout-s", type=float, help="wall-clock limit per sample (default 15)")
    add("--request-deadline-s", type=float, help="wall-clock limit per request (default 150)")
    add("--max-response-chars", type=int, help="longer responses score 0 (default 65536)")
    add("--max-request-bytes", type=int, help="larger bodies get 413 (default 64 MiB)")
    add("--max-batch-size", type=int, help="larger batches get 413 (default 4096)")
    add("--plugin", action="append", help="module registering extra verifiers (repeatable)")
    add("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def config_from_args(args: argparse.Namespace) -> VerifierConfig:
    overrides: dict[str, Any] = {}
    for dest, path in _FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        target = overrides
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
    return load_config(args.config, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ConfigError as exc:
        return config_error(f"verifier {exc}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        return config_error(f"verifier config: {exc}")
    if config.pool.workers < 1:
        # Inline scoring runs in request threads, where nothing can bound its time.
        return config_error("verifier config: pool.workers: the service needs at least 1 worker")
    # Imported here so `--help` and config errors stay fast (math-verify loads sympy).
    from lmmr1_trainer.verifier.engine import Verifier
    from lmmr1_trainer.verifier.pool import PoolStartError
    from lmmr1_trainer.verifier.rewards import UnknownTaskError
    from lmmr1_trainer.verifier.server import VerifierMetrics, VerifierServer

    metrics = VerifierMetrics()
    try:
        verifier = Verifier(config, on_restart=lambda r: metrics.worker_restarts.labels(r).inc())
        verifier.start()
    except (ImportError, UnknownTaskError) as exc:  # a plug-in or task that does not exist
        return config_error(f"verifier: {exc}")
    except PoolStartError as exc:  # e.g. a slow node: the kubelet restarts the sidecar
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        server = VerifierServer(config, verifier, metrics)
    except OSError as exc:
        verifier.close()
        print(f"error: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"lmmr1-verifier listening on {server.url}", flush=True)
    logger.info(
        "profile %s, prompt template %s, %d workers, unparseable labels score %s, weights %s",
        config.profile.value,
        config.prompt_template.value,
        config.pool.workers,
        config.unparseable_label_policy.value,
        config.weights.model_dump(),
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        verifier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
