#!/usr/bin/env bash
# Performance benchmark (method/tools/benchmark.py): training step, evaluation throughput and post-processing, each
# as a ratio against its plain formulation, plus the corpus builder and feature extraction, measured on this
# machine. Flags pass through, e.g.
#   bash scripts/benchmark.sh                      # every section at full size (paper config for the model)
#   bash scripts/benchmark.sh --quick              # smoke run of every section at tiny sizes (~30 s)
#   bash scripts/benchmark.sh --sections post corpus
#   bash scripts/benchmark.sh --device cuda --out benchmark_results/benchmark_cuda.json
set -euo pipefail
source "$(dirname "$0")/_common.sh"
cd "$REPO_ROOT"

exec "$PYTHON" -m method.tools.benchmark "$@"
