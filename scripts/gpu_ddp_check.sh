#!/usr/bin/env bash
# Device check of DistributedDataParallel on CUDA (NCCL), for a machine with one GPU, in well under 2 minutes:
# on a generated tiny corpus, train the tiny model for one epoch (6 steps, evaluated before and after) under
# `torchrun --nproc_per_node 1` (process group cpu:gloo,cuda:nccl, DDP on cuda:0, sharded evaluation gathered
# on rank 0) and as a plain single process, then compare the weights. With one rank DDP changes no number, so
# the two runs may differ only by CUDA's own nondeterminism.
#   bash scripts/gpu_ddp_check.sh [GPU]     GPU: CUDA device id (default 0), or `cpu` for the same check with gloo
# Needs only torch and the repository's dependencies; prints PASS or FAIL (exit status 1) and the numbers.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
cd "$REPO_ROOT"
GPU="${1:-0}"
TOLERANCE=1e-4  # max |w_ddp - w_single| after 6 Adam steps at lr 1e-3

use_device "$GPU"
export OMP_NUM_THREADS=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m utils.synthetic_tvr --out_dir "$work/corpus" --n_train_videos 24 --n_val_videos 20 --n_test_videos 16 \
  --n_train_queries 48 --n_val_queries 24 --n_test_queries 12 --visual_dim 12 --text_dim 8 --query_dim 8 \
  --min_duration 15 --max_duration 45 --seed 0 >"$work/corpus.out" 2>&1 \
  || { tail -20 "$work/corpus.out"; echo FAIL; exit 1; }
flags=(--dataset_config "$work/corpus/tvr_data_config.json" --model_config config/model_config_tiny.json
       --visual_dim 12 --text_dim 8 --query_dim 8 --hidden_dim 32 --max_ctx_len 30 --num_workers 0 --bsz 8
       --eval_query_bsz 8 --lr 1e-3 --n_epoch 1 --use_interal_vr_scores --stop_task SVMR "${DEVICE_FLAGS[@]}")

start=$SECONDS
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 train.py "${flags[@]}" \
  --results_root "$work/ddp" --exp_id ddp >"$work/ddp.out" 2>&1 || { tail -40 "$work/ddp.out"; echo FAIL; exit 1; }
echo "torchrun (1 process, DDP) run: $((SECONDS - start)) s"
start=$SECONDS
"$PYTHON" train.py "${flags[@]}" --results_root "$work/single" --exp_id single >"$work/single.out" 2>&1 \
  || { tail -40 "$work/single.out"; echo FAIL; exit 1; }
echo "single-process run: $((SECONDS - start)) s"

"$PYTHON" - "$work" "$TOLERANCE" "$GPU" <<'PY'
import glob
import os
import sys

import torch

from method.checkpoint import load_checkpoint

work, tolerance, gpu = sys.argv[1], float(sys.argv[2]), sys.argv[3]
ddp_dir, single_dir = (glob.glob(os.path.join(work, name, "*"))[0] for name in ("ddp", "single"))
problems = []
with open(os.path.join(ddp_dir, "run.log")) as f:
    setup = [line.strip() for line in f if "DistributedDataParallel:" in line]
print("\n".join(setup) or "no DistributedDataParallel line in run.log")
expected = ("backend cpu:gloo,cuda:nccl", "cuda:0 on rank 0") if gpu != "cpu" else ("backend gloo", "cpu on rank 0")
if not setup or not all(text in setup[0] for text in expected):
    problems.append(f"run.log should say {expected}")

ddp, single = (load_checkpoint(os.path.join(d, "last.ckpt")) for d in (ddp_dir, single_dir))
if ddp["global_step"] != single["global_step"] or ddp["global_step"] == 0:
    problems.append(f"global steps {ddp['global_step']} vs {single['global_step']}")
diffs = {name: (ddp["model"][name].float() - weight.float()).abs().max().item()
         for name, weight in single["model"].items()}
worst = max(diffs, key=diffs.get)
identical = sum(diff == 0 for diff in diffs.values())
print(f"weights after {ddp['global_step']} steps: max |ddp - single| = {diffs[worst]:.3g} ({worst}); "
      f"{identical}/{len(diffs)} tensors bitwise identical")
if diffs[worst] > tolerance:
    problems.append(f"max weight difference {diffs[worst]:.3g} > {tolerance}")

for name in ("eval.log.txt", "best_tvr_val_predictions_VCMR_SVMR_VR.json"):
    if not os.path.isfile(os.path.join(ddp_dir, name)):
        problems.append(f"the torchrun run wrote no {name}")
logs = []
for run_dir in (ddp_dir, single_dir):
    with open(os.path.join(run_dir, "eval.log.txt")) as f:
        logs.append([line[19:] for line in f.read().splitlines()])
print("evaluation of the untrained model (epoch -1): "
      + ("identical" if logs[0][:1] == logs[1][:1] else f"differs:\n  ddp    {logs[0][:1]}\n  single {logs[1][:1]}"))
print("FAIL: " + "; ".join(problems) if problems else "PASS")
sys.exit(1 if problems else 0)
PY
