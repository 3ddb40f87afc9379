#!/usr/bin/env bash
# The whole test suite (the README's test command): cargo's tests, then the
# Python package's, built as a wheel into a virtual environment and tested
# with pytest against float64 references and the CLI that cargo just built.
#
#   scripts/test.sh [cargo test arguments]
#
# The virtual environment is $MOESCOPE_VENV (default target/py-venv); it is
# made with python3 when missing and reused after.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --locked "$@"
scripts/python_tests.sh
