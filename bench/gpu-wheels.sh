#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/gpu.sh needs on a lent GPU machine, which has no network,
# torch/transformers/safetensors/numpy but neither DeepSpeed nor pydantic (the trainer's
# config and rollout protocol need it). Run it here, on a machine that reaches PyPI:
#
#   bash bench/gpu-wheels.sh          # then carry `.whl` with the run; gpu.sh installs them
#
# DeepSpeed is published as an sdist only: it is built here into a pure-Python wheel with
# DS_BUILD_OPS=0 (no CUDA extensions; the trainer hands DeepSpeed torch's AdamW, so none is
# needed). Versions are those of the project's virtualenv, so the device runs what the tests
# ran. vLLM cannot travel: its wheel alone is far above the 64 MiB a run may carry, so the
# lent machine measures the transformers rollout back end and the vLLM figure comes from a
# cluster image that has the `gpu` extra.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-$(bash scripts/venv.sh dev,operator,verifier,trainer | tail -n1)/bin/python}"
dest="$root/.whl"
limit=$((64 * 1024 * 1024))
# The device image is Python 3.12 on x86-64 (see the device notes); pure-Python wheels match
# any of these tags, pydantic-core needs the cp312 manylinux one.
platform=(--python-version 3.12 --implementation cp --only-binary=:all:
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

version() { "$python" -c "import importlib.metadata as m; print(m.version('$1'))"; }

mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each: two of one package stop the whole install
pins=()
for package in pydantic pydantic-core annotated-types typing-inspection hjson; do
  pins+=("$package==$(version "$package")")
done
echo "gpu-wheels: downloading ${pins[*]}" >&2
"$python" -m pip download -q --no-deps "${platform[@]}" -d "$dest" "${pins[@]}"

deepspeed="deepspeed==$(version deepspeed)"
echo "gpu-wheels: building $deepspeed (DS_BUILD_OPS=0, pure Python)" >&2
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$build" "$deepspeed"
for wheel in "$build"/*.whl; do
  case "$(basename "$wheel")" in
    *-py3-none-any.whl) mv "$wheel" "$dest/" ;;
    *) echo "gpu-wheels: $(basename "$wheel") is not pure Python: it would not load there" >&2
       exit 1 ;;
  esac
done

# What travels: the working tree (tracked + untracked, not ignored) plus the carried .whl/.
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -n1 | cut -f1)
wheels=$(du -cb "$dest"/*.whl | tail -n1 | cut -f1)
ls -l "$dest"/*.whl >&2
total=$((tree + wheels))
echo "gpu-wheels: wheels $((wheels / 1024)) KiB + working tree $((tree / 1024)) KiB" \
  "= $((total / 1024)) KiB of the $((limit / 1024)) KiB a run may carry" >&2
if ((total > limit)); then
  echo "gpu-wheels: over the 64 MiB limit: carry fewer wheels" >&2
  exit 1
fi
