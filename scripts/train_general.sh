#!/usr/bin/env bash
# CONQUER, general similarity (first-stage video scores), no shared normalization (neg_video_num 0).
#   bash scripts/train_general.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
start_training_script "$@"

exec "${LAUNCHER[@]}" train.py "${PAPER_FLAGS[@]}" --use_interal_vr_scores --bsz 64 --use_extend_pool 500 --neg_video_num 0 \
  "${DEVICE_FLAGS[@]}" "${@:3}"
