#!/usr/bin/env bash
# CONQUER on ActivityNet Captions (visual only: no subtitles), the paper's best recipe (scripts/train_sharednorm_general.sh) with
# this corpus's preset.
#   bash scripts/train_anet.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
# Build the corpus first (README "Your own videos", docs/own_corpus.md), set root_path in config/anet_data_config.json, and
# run the first stage on it (scripts/train_first_stage.sh, scripts/rank_first_stage.sh).
#
# clip_length 3.0 with max_ctx_len 100: 100 clips is the most the model config's position embeddings take,
#   and ActivityNet videos run about two minutes on average, up to ~12; 3-second clips let those 100 clips
#   cover 5 minutes, so almost every moment is reachable (the build command prints how many videos are
#   longer), while ActivityNet moments (tens of seconds on average) still span several clips.
# VISUAL_DIM / QUERY_DIM: the dims your features have (the build command prints them).
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: bash $0 EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags]" >&2; exit 2; }
exec bash "$(dirname "$0")/train_sharednorm_general.sh" "$1" "$2" --dataset_config config/anet_data_config.json \
  --dset_name anet --train_set_honours_options --ctx_mode visual --clip_length 3.0 --max_ctx_len 100 --visual_dim "${VISUAL_DIM:-4352}" --query_dim "${QUERY_DIM:-768}" "${@:3}"
