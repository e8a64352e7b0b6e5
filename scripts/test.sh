#!/usr/bin/env bash
# Installs what the tests need (idempotent) and runs the whole test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh
install_project test,corpus,extract,faiss
exec "$PYTHON" -m pytest -q "$@" tests
