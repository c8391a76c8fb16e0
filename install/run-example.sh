#!/usr/bin/env bash
# Set up .venv if needed, then run the built-in example (PySCF targets -> training ->
# test-set errors -> predicted cube file). Extra arguments go to the example script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash install/setup.sh
exec .venv/bin/python examples/water/run.py "$@"
