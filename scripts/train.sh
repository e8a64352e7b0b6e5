#!/usr/bin/env bash
# The default training recipe: shared-normalization training with the general similarity measure
# (same flags as scripts/train_sharednorm_general.sh).
#   bash scripts/train.sh EXP_ID GPU|cpu [extra train.py flags, which override these]
set -euo pipefail
exec bash "$(dirname "$0")/train_sharednorm_general.sh" "$@"
