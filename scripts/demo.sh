#!/usr/bin/env bash
# The main job on an embedded default, on the CPU, in a few minutes: generate a synthetic TVR corpus
# (once, into data/demo_tvr/), train CONQUER with the shared-normalization general recipe and the tiny
# model config, run inference with NMS 0.7, and print the trained model's metrics next to the untrained ones.
#   bash scripts/demo.sh [extra train.py flags, e.g. --n_epoch 8]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh
install_project
exec "$PYTHON" -m method.tools.demo "$@"
