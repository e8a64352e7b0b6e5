#!/usr/bin/env bash
# Rank every query of the corpus with a trained first stage; writes the ranklists in the release layout, the
# select100 training file, a data config for CONQUER and the VR metrics (method/rank_first_stage.py). By default
# the splits that have queries are ranked; the last line printed is "Train with: --dataset_config PATH".
#   bash scripts/rank_first_stage.sh RUN_DIR GPU|cpu [--splits train val] [--out_dir DIR] [--faiss]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [[ $# -lt 2 ]]; then
  die "usage: bash $0 RUN_DIR GPU|cpu [extra method.rank_first_stage flags]"
fi
model_dir="$(cd "$1" && pwd)" || die "RUN_DIR '$1' is not a directory"
use_device "$2"
cd "$REPO_ROOT"
exec "$PYTHON" -m method.rank_first_stage --model_dir "$model_dir" "${DEVICE_FLAGS[@]}" "${@:3}"
