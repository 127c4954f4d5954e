#!/usr/bin/env bash
# Create or update the project's virtualenv and print its path on the last line.
#
#   bash scripts/venv.sh [extras]     # default extras: dev
#
# The virtualenv lives outside the clone (${LMMR1_CACHE:-~/.cache/lmmr1}/venv) so that CI's
# fresh clones and later sessions reuse the multi-GB torch install; pip only installs what
# is missing. The project itself is installed editable from the current clone each time.
set -euo pipefail
extras="${1:-dev}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LMMR1_VENV:-${LMMR1_CACHE:-$HOME/.cache/lmmr1}/venv}"

command -v python3 >/dev/null || { echo "venv: python3 not found: install Python >= 3.11" >&2; exit 127; }
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "venv: Python >= 3.11 required, found $(python3 -V)" >&2; exit 1; }
if [[ ! -x "$venv/bin/python" ]]; then
  echo "venv: creating $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
fi
# A stamp of pyproject.toml + extras skips pip entirely when nothing changed.
stamp="$venv/.lmmr1-$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)-${extras//,/_}"
if [[ ! -f "$stamp" ]] || ! "$venv/bin/python" -c 'import lmmr1_operator' 2>/dev/null \
   || [[ "$("$venv/bin/python" -c 'import lmmr1_operator, os; print(os.path.dirname(os.path.dirname(os.path.dirname(lmmr1_operator.__file__))))')" != "$root" ]]; then
  echo "venv: installing lmmr1[$extras] into $venv" >&2
  if [[ ",$extras," == *",trainer,"* || ",$extras," == *",gpu,"* ]]; then
    # DeepSpeed's setup imports torch, so torch (the PyPI default build; it also runs on
    # CPU) goes in first and DeepSpeed is built against it without build isolation.
    # Keep these pins equal to the `trainer` extra in pyproject.toml.
    "$venv/bin/pip" install -q "torch==2.14.0" "torchvision==0.29.0" >&2
    "$venv/bin/pip" install -q --no-build-isolation "deepspeed==0.19.8" >&2
  fi
  "$venv/bin/pip" install -q -e "$root[$extras]" >&2
  touch "$stamp"
fi
echo "$venv"
