#!/usr/bin/env bash
# Performance benchmark (method/tools/benchmark.py): training step, evaluation throughput and post-processing, each
# as a ratio against its plain formulation, measured on this machine. Flags pass through, e.g.
#   bash scripts/benchmark.sh                      # full run at the paper config (~8 min on 2 CPU cores)
#   bash scripts/benchmark.sh --quick              # smoke run (~20 s)
#   bash scripts/benchmark.sh --device cuda --out benchmark_results/benchmark_cuda.json
set -euo pipefail
source "$(dirname "$0")/_common.sh"
cd "$REPO_ROOT"

exec "$PYTHON" -m method.tools.benchmark "$@"
