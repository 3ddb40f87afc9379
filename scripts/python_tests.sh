#!/usr/bin/env bash
# Build the Python package (python/) as a wheel, install it into a virtual
# environment, and run its tests (python/tests). Run after `cargo test`,
# whose binary (target/debug/moescope) the CLI-parity tests compare with.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${MOESCOPE_VENV:-target/py-venv}"
python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found; the Python package's tests need Python ≥ 3.9 (set PYTHON=...)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "maturin>=1.9,<2" "numpy>=1.21" pytest pandas

# A debug-profile wheel: it reuses what `cargo test` compiled (release is
# for users: `pip install ./python`).
rm -rf target/wheels
"$venv/bin/maturin" build --quiet --locked --profile dev -m python/Cargo.toml -o target/wheels
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps target/wheels/moescope-*.whl

venv_python="$(cd "$venv" && pwd)/bin/python"
export MOESCOPE_BIN="${MOESCOPE_BIN:-$PWD/target/debug/moescope}"
# Run from python/tests, so that the installed package (not the source
# folder python/moescope, which lacks the compiled extension) is imported.
cd python/tests
"$venv_python" -m pytest -q -p no:cacheprovider .
