#!/usr/bin/env bash
# CONQUER, disjoint similarity (raw begin + end logits), shared-normalization training.
#   bash scripts/train_sharednorm_disjoint.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
start_training_script "$@"

exec "${LAUNCHER[@]}" train.py "${PAPER_FLAGS[@]}" --bsz 16 --use_extend_pool 1000 --neg_video_num 3 --similarity_measure disjoint \
  "${DEVICE_FLAGS[@]}" "${@:3}"
