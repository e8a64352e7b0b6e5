#!/usr/bin/env bash
# Installs what the tests need (idempotent) and runs the whole test suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh
install_project test,corpus,extract,search,search-test,faiss
# The search page is tested in a headless Chromium (about 25 s to install once, Debian packages).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
exec "$PYTHON" -m pytest -q "$@" tests
