#!/usr/bin/env bash
# Performance benchmark (method/tools/benchmark.py): training step, evaluation throughput and post-processing, each
# as a ratio against its plain formulation, plus the corpus builder, feature extraction, the first stage, search
# and long videos (windows vs truncation, end to end through the public commands), measured on this machine.
# Flags pass through, e.g.
#   bash scripts/benchmark.sh                      # every section at full size (paper config for the model)
#   bash scripts/benchmark.sh --quick              # smoke run of every section at tiny sizes
#   bash scripts/benchmark.sh --sections post corpus
#   bash scripts/benchmark.sh --sections long_videos --long_videos_out_dir results/long_videos   # keeps its runs
#   bash scripts/benchmark.sh --device cuda --out benchmark_results/benchmark_cuda.json
set -euo pipefail
source "$(dirname "$0")/_common.sh"
cd "$REPO_ROOT"

exec "$PYTHON" -m method.tools.benchmark "$@"
