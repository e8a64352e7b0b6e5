#!/usr/bin/env bash
# CONQUER on ActivityNet Captions (visual only: no subtitles), general similarity, shared-normalization training.
#   bash scripts/train_anet.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
# Build the corpus first (README "Your own corpus"), set root_path in config/anet_data_config.json, and
# run the first stage on it (scripts/train_first_stage.sh, scripts/rank_first_stage.sh).
#
# clip_length 3.0 with max_ctx_len 100: 100 clips is the most the model config's position embeddings take,
#   and ActivityNet videos run about two minutes on average, up to ~12; 3-second clips let those 100 clips
#   cover 5 minutes, so almost every moment is reachable (the build command prints how many videos are
#   longer), while ActivityNet moments (tens of seconds on average) still span several clips.
# VISUAL_DIM / QUERY_DIM: the dims your features have (the build command prints them).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
start_training_script "$@"

exec "${LAUNCHER[@]}" train.py "${PAPER_FLAGS[@]}" --dataset_config config/anet_data_config.json --dset_name anet \
  --ctx_mode visual --clip_length 3.0 --max_ctx_len 100 --visual_dim "${VISUAL_DIM:-4352}" --query_dim "${QUERY_DIM:-768}" \
  --use_interal_vr_scores --bsz 16 --use_extend_pool 1000 --neg_video_num 3 \
  "${DEVICE_FLAGS[@]}" "${@:3}"
