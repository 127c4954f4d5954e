#!/usr/bin/env bash
# The GPU benchmark: rollout tokens/s, DeepSpeed update seconds per step and weight-sync
# seconds on Qwen2.5-VL-3B's architecture with random weights (no network needed).
#
#   bash bench/gpu.sh [--tiny] [--out DIR] [flags of bench/lmmr1_bench/gpu.py]
#
# On a lent GPU machine (Python 3.12, torch, transformers; no deepspeed, pydantic or vllm):
# run `bash bench/gpu-wheels.sh` here first and carry `.whl` with the run; this script
# installs those wheels into a scratch folder. Results go to $OUT (else ./bench-gpu-out):
# gpubench.json, gpubench.md and one log per phase. Capped at 8 minutes in all. `--tiny`
# runs the same code on CPU with a tiny model (tests/integration/test_trainer_gpubench.py).
# Environment: PYTHON (default python3); LMMR1_GPUBENCH_WHEELS=0 never installs .whl/ (by
# default it is installed only where pydantic, hjson or deepspeed is missing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
started=$SECONDS
has_packages() {
  "$python" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(p) for p in ("pydantic", "hjson", "deepspeed")))'
}
if [[ "${LMMR1_GPUBENCH_WHEELS:-1}" != 0 ]] && compgen -G "$root/.whl/*.whl" >/dev/null \
   && ! has_packages; then
  site="${TMPDIR:-/tmp}/lmmr1-gpubench-site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$root"/.whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu.sh: installed $(ls "$root"/.whl/*.whl | wc -l) wheels from .whl/ in $((SECONDS - started)) s"
fi
export PYTHONPATH="$root/trainer_image:$root/bench${PYTHONPATH:+:$PYTHONPATH}"
# The Python side keeps to its own budget (--budget-s, 420 s); this is the backstop that
# keeps the whole script under 8 minutes. SIGTERM lets it write its report first.
exec timeout --kill-after=10 $((470 - (SECONDS - started))) "$python" -m lmmr1_bench.gpu "$@"
