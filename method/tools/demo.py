"""The main job on an embedded default, end to end on the CPU in a few minutes:

1. a synthetic TVR corpus with planted signal, generated once into data/demo_tvr/ (reused afterwards);
2. `scripts/train_sharednorm_general.sh` (the paper's best recipe) with the tiny model config;
3. `scripts/inference.sh` on the best checkpoint with `--nms_thd 0.7`;
4. the VCMR / SVMR / VR metrics of the trained model next to those of the untrained one (epoch -1).

    bash scripts/demo.sh [extra train.py flags, e.g. --n_epoch 5]
    bash scripts/demo.sh --own_first_stage    # the two-stage pipeline: the corpus's ranklists are not used

With --own_first_stage (a corpus with a larger training split, data/demo_tvr_first_stage/): the first stage is
trained (scripts/train_first_stage.sh) and ranks the corpus (scripts/rank_first_stage.sh); CONQUER is then
trained and evaluated on those lists and, for comparison, on the corpus's release-style lists; the VR metrics of
both lists are printed next to the end-to-end VCMR of both runs.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import time

from utils.io_utils import load_json
from utils.report import format_metrics_table
from utils.synthetic_tvr import generate_corpus
from utils.run_dir import REPO_ROOT

DEMO_CORPUS = dict(visual_dim=48, text_dim=32, query_dim=32, seed=0)
DEMO_TRAIN_FLAGS = ["--model_config", "config/model_config_tiny.json", "--hidden_dim", "32", "--num_workers", "0",
                    "--n_epoch", "6", "--lr", "1e-3"]
# The learning proof: the trained model must beat the untrained one by a wide margin on these metrics.
MARGIN_METRICS = (("SVMR", "0.5-r1"), ("VCMR", "0.5-r5"))
MIN_RATIO, MIN_GAIN = 3.0, 10.0


def ensure_corpus(corpus_dir, corpus_kwargs):
    """The data config of the corpus in `corpus_dir`, generated unless a previous run left it complete."""
    config_path = os.path.join(corpus_dir, "tvr_data_config.json")
    if os.path.isfile(config_path):  # written last by generate_corpus, so its presence means complete
        print(f"reusing the synthetic corpus in {corpus_dir}")
        return config_path
    print(f"generating a synthetic TVR corpus in {corpus_dir}")
    return generate_corpus(corpus_dir, progress=True, **corpus_kwargs)


def run(command):
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)


def train(data_config, corpus_kwargs, results_root, extra_flags):
    """Train with the shared-normalization general recipe; returns the new run directory."""
    pattern = os.path.join(results_root, "tvr-demo-*")
    before = set(glob.glob(pattern))
    dims = ["--visual_dim", str(corpus_kwargs["visual_dim"]), "--text_dim", str(corpus_kwargs["text_dim"]),
            "--query_dim", str(corpus_kwargs["query_dim"])]
    run(["bash", "scripts/train_sharednorm_general.sh", "demo", "cpu", "--dataset_config", data_config,
         "--results_root", results_root] + dims + DEMO_TRAIN_FLAGS + list(extra_flags))
    (run_dir,) = set(glob.glob(pattern)) - before
    return run_dir


def untrained_metrics(run_dir):
    """The epoch -1 (untrained model) metrics that training logged in eval.log.txt."""
    with open(os.path.join(run_dir, "eval.log.txt")) as f:
        for line in f:
            if " [Epoch] -01 [Metrics] " in line:
                return json.loads(line.split(" [Metrics] ", 1)[1])
    raise RuntimeError(f"{run_dir}/eval.log.txt has no epoch -1 evaluation (was --no_eval_untrained given?)")


def infer(run_dir, data_config):
    """Inference with NMS 0.7 on the best checkpoint -> (metrics without NMS, metrics with NMS)."""
    run(["bash", "scripts/inference.sh", run_dir, "cpu", "--nms_thd", "0.7", "--dataset_config", data_config,
         "--num_workers", "0"])
    stem = os.path.join(run_dir, "inference_tvr_val_None_predictions_VR_SVMR_VCMR_hero")
    return load_json(stem + "_metrics.json"), load_json(stem + "_nms_thd_0.7_metrics.json")


def learning_margin(untrained, trained):
    """[(name, untrained value, trained value, holds)] for the metrics of the learning proof."""
    rows = []
    for task, key in MARGIN_METRICS:
        before, after = untrained[task][key], trained[task][key]
        rows.append((f"{task} {key}", before, after, after >= MIN_RATIO * before and after >= before + MIN_GAIN))
    return rows


def run_demo(corpus_dir, results_root, corpus_kwargs=None, extra_flags=()):
    """The whole pipeline -> (untrained metrics, trained metrics, trained metrics with NMS 0.7, run dir)."""
    corpus_kwargs = dict(DEMO_CORPUS, **(corpus_kwargs or {}))
    data_config = ensure_corpus(corpus_dir, corpus_kwargs)
    run_dir = train(data_config, corpus_kwargs, results_root, extra_flags)
    trained, trained_nms = infer(run_dir, data_config)
    return untrained_metrics(run_dir), trained, trained_nms, run_dir


FIRST_STAGE_CORPUS = dict(DEMO_CORPUS, n_train_videos=1000, n_train_queries=5000)
FIRST_STAGE_FLAGS = ["--hidden_dim", "128", "--bsz", "32", "--num_workers", "0", "--n_epoch", "8", "--max_es_cnt", "2"]


def train_first_stage(data_config, corpus_kwargs, results_root):
    pattern = os.path.join(results_root, "tvr-demo_first_stage-*")
    before = set(glob.glob(pattern))
    dims = ["--visual_dim", str(corpus_kwargs["visual_dim"]), "--text_dim", str(corpus_kwargs["text_dim"]),
            "--query_dim", str(corpus_kwargs["query_dim"])]
    run(["bash", "scripts/train_first_stage.sh", "demo_first_stage", "cpu", "--dataset_config", data_config,
         "--results_root", results_root] + dims + FIRST_STAGE_FLAGS)
    (run_dir,) = set(glob.glob(pattern)) - before
    return run_dir


def run_two_stage_demo(corpus_dir, results_root, extra_flags=()):
    """First stage, ranking, CONQUER on the new lists and on the release-style lists -> printed report."""
    data_config = ensure_corpus(corpus_dir, FIRST_STAGE_CORPUS)
    first_stage_dir = train_first_stage(data_config, FIRST_STAGE_CORPUS, results_root)
    lists_dir = os.path.join(first_stage_dir, "first_stage_ranklists")
    run(["bash", "scripts/rank_first_stage.sh", first_stage_dir, "cpu", "--out_dir", lists_dir])
    list_metrics = load_json(os.path.join(lists_dir, "metrics.json"))["val"]
    own_config = os.path.join(lists_dir, "data_config.json")
    vcmr = {}
    for name, config in (("own first stage", own_config), ("release-style lists", data_config)):
        conquer_dir = train(config, FIRST_STAGE_CORPUS, results_root, extra_flags)
        vcmr[name] = infer(conquer_dir, config)[1]["VCMR"]
    print("\nSynthetic TVR val split, first-stage lists (VR, %):")
    for name, key in (("own first stage", "first_stage"), ("release-style lists", "input_ranklist")):
        m = list_metrics[key]
        print(f"  {name:20s} R@1 {m['r1']:6.2f}  R@10 {m['r10']:6.2f}  R@100 {m['r100']:6.2f}")
    print("End-to-end VCMR of CONQUER on each list (NMS 0.7, %):")
    for name, m in vcmr.items():
        print(f"  {name:20s} " + "  ".join(f"{k} {m[k]:6.2f}" for k in ("0.5-r1", "0.5-r5", "0.7-r1", "0.7-r5")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus_dir", default=os.path.join(REPO_ROOT, "data", "demo_tvr"))
    parser.add_argument("--results_root", default=os.path.join(REPO_ROOT, "results", "demo"))
    parser.add_argument("--own_first_stage", action="store_true",
                        help="train and use this project's first stage instead of the corpus's ranklists")
    args, extra_flags = parser.parse_known_args(argv)
    start = time.time()
    if args.own_first_stage:
        corpus_dir = args.corpus_dir.rstrip(os.sep) + "_first_stage"
        run_two_stage_demo(corpus_dir, args.results_root, extra_flags)
        print(f"\ntotal time: {time.time() - start:.0f} s")
        return
    untrained, trained, trained_nms, run_dir = run_demo(args.corpus_dir, args.results_root, extra_flags=extra_flags)
    columns = {"untrained (epoch -1)": untrained, "trained": trained, "trained, NMS 0.7": trained_nms}
    print("\nSynthetic TVR val split, metrics in %\n" + format_metrics_table(trained, columns))
    print("\nLearning proof (trained >= 3x untrained and >= untrained + 10 points):")
    for name, before, after, holds in learning_margin(untrained, trained):
        print(f"  {name}: {before:.2f} -> {after:.2f}  {'ok' if holds else 'NOT MET'}")
    print(f"\nrun directory: {run_dir}\ntotal time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: step failed with exit code {e.returncode}: {' '.join(e.cmd)}")
