#!/usr/bin/env bash
# CONQUER on DiDeMo (visual only: DiDeMo has no subtitles), the paper's best recipe (scripts/train_sharednorm_general.sh) with
# this corpus's preset.
#   bash scripts/train_didemo.sh EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags, which override these]
# Build the corpus first (README "Your own videos", docs/own_corpus.md), set root_path in config/didemo_data_config.json, and
# run the first stage on it (scripts/train_first_stage.sh, scripts/rank_first_stage.sh).
#
# clip_length 2.5: half of DiDeMo's 5-second annotation segment (as XML used for DiDeMo), so every segment
#   boundary is a clip boundary and a moment maps to whole clips.
# max_ctx_len 12: annotations cover the first 30 s of a video (longer videos were cut to 30 s for
#   annotation), i.e. 12 clips of 2.5 s; later clips can never hold a moment.
# VISUAL_DIM / QUERY_DIM: the dims your features have (the build command prints them); defaults are the
#   release's ResNet+SlowFast (4352) and RoBERTa (768).
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: bash $0 EXP_ID GPU|GPU,GPU,...|cpu [extra train.py flags]" >&2; exit 2; }
exec bash "$(dirname "$0")/train_sharednorm_general.sh" "$1" "$2" --dataset_config config/didemo_data_config.json \
  --dset_name didemo --train_set_honours_options --ctx_mode visual --clip_length 2.5 --max_ctx_len 12 --visual_dim "${VISUAL_DIM:-4352}" --query_dim "${QUERY_DIM:-768}" "${@:3}"
