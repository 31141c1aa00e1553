#!/usr/bin/env bash
# Create .venv and install gemmalab with every backend this platform can run, plus the dev tools and the
# test oracles (pytest, ruff, transformers, trl for the distillation divergences, peft for the adapters, mlx-lm). Idempotent: when
# nothing it depends on changed, a second run only checks the environment and takes seconds.
#
#   macOS on Apple Silicon : MLX (Metal) + PyTorch (MPS)
#   Linux                  : MLX CPU build + PyTorch + JAX (CPU)
#
# Environment:
#   PYTHON              interpreter to build the venv from (default: python3)
#   GEMMALAB_TORCH      pip requirement for PyTorch (default on Linux: torch==2.13.0, the CPU build the
#                       project's machines carry; on a CUDA machine set e.g. GEMMALAB_TORCH=torch)
#   GEMMALAB_VENV       where the venv lives (default: .venv beside this script)
set -euo pipefail

cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${GEMMALAB_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.gemmalab-setup-stamp

fail() { echo "setup.sh: $*" >&2; exit 1; }
step() { echo "setup.sh: $*"; }
trap 'fail "failed at line $LINENO (see the output above); fix the cause and run ./setup.sh again"' ERR

command -v "$PYTHON" >/dev/null 2>&1 || fail "no $PYTHON on PATH: install Python 3.10 or newer, or set PYTHON=/path/to/python3"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || fail "$("$PYTHON" --version 2>&1) is too old: gemmalab needs Python 3.10 or newer (set PYTHON=...)"

OS=$(uname -s)
ARCH=$(uname -m)
case "$OS/$ARCH" in
  Darwin/arm64)
    BACKEND_REQS=("mlx>=0.22" "mlx-lm" "${GEMMALAB_TORCH:-torch}")
    ;;
  Linux/*)
    BACKEND_REQS=("mlx[cpu]>=0.22" "mlx-lm" "${GEMMALAB_TORCH:-torch==2.13.0}" "jax" "optax")
    ;;
  Darwin/*)
    BACKEND_REQS=("${GEMMALAB_TORCH:-torch}" "jax" "optax")  # Intel Macs: MLX needs Apple Silicon
    ;;
  *)
    fail "unsupported platform $OS/$ARCH: gemmalab sets up on macOS and Linux"
    ;;
esac

# Everything the result depends on: a change to any of it re-runs the install.
WANT=$(printf '%s\n' "$OS/$ARCH" "${BACKEND_REQS[@]}" "$("$PYTHON" --version 2>&1)" | cat - pyproject.toml setup.sh | cksum)

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && "$VENV/bin/python" -c 'import gemmalab, pytest' >/dev/null 2>&1; then
  step "environment is up to date ($VENV)"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV" || fail "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

step "installing backends: ${BACKEND_REQS[*]}"
"${PIP[@]}" install --quiet "${BACKEND_REQS[@]}"
step "installing gemmalab (editable) with its dev tools and test oracles"
"${PIP[@]}" install --quiet -e ".[dev]"

step "checking the installed backends"
"$VENV/bin/python" - <<'PY'
import sys
import gemmalab
found = gemmalab.backends()
print(f"setup.sh: usable backends: {', '.join(found) or 'none'}")
sys.exit(0 if found else 1)
PY

echo "$WANT" > "$STAMP"
step "done: activate with 'source $VENV/bin/activate', or use make (make test, make demo)"
