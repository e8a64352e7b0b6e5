#!/usr/bin/env bash
# From a folder of video files and two trained runs to a search index (method/index_videos.py): clip features,
# subtitles by speech recognition when the runs read them, a corpus without annotations, the index; it prints the
# command that serves it. Rerun it after adding or removing videos: only the new ones are processed.
#   bash scripts/index_videos.sh VIDEOS OUT_DIR --first_stage RUN --conquer RUN [--gpu ID|ID,ID,...|cpu]
#                                [--whisper_model openai/whisper-small] [--language en] [--num_beams 1]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [[ $# -lt 2 ]]; then
  die "usage: bash $0 VIDEOS OUT_DIR --first_stage RUN --conquer RUN [--gpu ID|ID,ID,...|cpu]"
fi
cd "$REPO_ROOT"
exec "$PYTHON" -m method.index_videos "$@"
