#!/usr/bin/env bash
# Installs what the tests need (idempotent) and runs the whole test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Use the active Python if it can install packages; otherwise make a local .venv.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  [ -d .venv ] || python3 -m venv .venv
  PYTHON=.venv/bin/python
fi

# torch is pinned only when it is missing: on this project's machines 2.13.0 is a local CPU wheel,
# while an unpinned request would download a multi-GB CUDA build. An existing torch is kept as is.
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"

exec "$PYTHON" -m pytest -q "$@" tests
