"""python -m lmmr1_trainer.rollout --host "$POD_IP" --port 8000 --config /etc/lmmr1/stage.yaml

Starts a rollout server for the stage (`rollout.mode: separate`): the back end named by
`rollout.backend` (`vllm`, CPU or GPU; `transformers` is a fallback without vLLM) serving
the stage's starting weights (`init_from`, or `--model`), which the trainer replaces after
every update. The weight-update routes need the bearer
token read from `--token-file` (default: `rollout.token_file`, /etc/lmmr1/token/token).
Prints `lmmr1-rollout listening on http://HOST:PORT` once it accepts requests (`--port 0`
picks a free port), stops cleanly on SIGTERM/SIGINT, and exits 78 on a configuration error
with the reason in the termination message (/dev/termination-log) for the operator.
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

from pydantic import ValidationError

from lmmr1_trainer.config import CONFIG_PATH, StageConfig
from lmmr1_trainer.launch import config_error
from lmmr1_trainer.models import ModelSourceError, resolve_model
from lmmr1_trainer.rollout.backends import BackendUnavailable, RolloutBackend, TransformersBackend
from lmmr1_trainer.rollout.server import RolloutServer

logger = logging.getLogger("lmmr1_trainer.rollout")


def _backend(config: StageConfig, model_dir: Path, threads: int | None) -> RolloutBackend:
    rollout = config.rollout
    if rollout.backend == "transformers":
        return TransformersBackend(model_dir, threads=threads)
    from lmmr1_trainer.rollout.vllm_backend import VllmBackend, VllmEngine

    algo = config.algorithm
    on_gpu = config.trainer.gpus_per_node > 0
    engine = VllmEngine(
        model_dir,
        tensor_parallel_size=rollout.tensor_parallel_size,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        cpu_kv_cache_gib=rollout.cpu_kv_cache_gib,
        max_model_len=algo.max_prompt_length + algo.max_generation_length,
        dtype="bfloat16" if on_gpu and algo.bf16 else "float32",
        seed=algo.seed,
    )
    return VllmBackend(engine)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmmr1_trainer.rollout")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", type=Path, default=CONFIG_PATH)
    parser.add_argument("--token-file", type=Path, default=None)
    parser.add_argument("--model", default=None, help="weights to serve (default: init_from)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        config = StageConfig.load(args.config)
        token_file = args.token_file or Path(config.rollout.token_file)
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"{token_file} is empty")
        model_dir = resolve_model(args.model or config.init_from, config.s3)
        backend = _backend(config, model_dir, args.threads)
    except (OSError, ValueError, ValidationError, ModelSourceError, BackendUnavailable) as err:
        return config_error(f"rollout config: {err}")
    server = RolloutServer((args.host, args.port), backend, token)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"lmmr1-rollout listening on {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
