"""Benchmark section `first_stage_scores`: which first-stage score CONQUER's general measure should multiply.

    python -m method.tools.benchmark --sections first_stage_scores [--first_stage_scores_conquer_epochs 6]

With --use_interal_vr_scores the general measure ranks a query's moments by r * p_begin * p_end, r the
ranklist's score of the moment's video. The learned first stage's own score s is a cosine-like value in [-1, 1]:
a negative r turns the order of that video's moments upside down, and a small spread of r lets the moment
probabilities override the first stage. The variants, each written into the val ranklist:

* raw:      r = s (what rank_first_stage writes);
* exp(s/T): r = exp((s - 1) / T), T the model's temperature: positive, and proportional to exp(s / T), the
  model's own softmax probability of the video among the query's candidates (the shift by 1 changes no query's
  order; it keeps r <= 1, so r fits float32, as CONQUER reads it, even at T = 0.01).

End to end on the synthetic corpus of `demo.sh --own_first_stage` (utils/synthetic_tvr.py: 1,000 train videos /
5,000 queries, val 150 / 200): the first stage (hidden 128, batch 32) is trained through train.py and ranks train
and val (method.rank_first_stage); CONQUER (scripts/train_sharednorm_general.sh, config/model_config_tiny.json,
CPU) is trained once, on the first --first_stage_scores_conquer_queries queries of train_select100 and the raw
lists (training reads only the lists' order; the
checkpoint kept is the best on raw val VCMR, which favours raw if anything), and its checkpoint is evaluated
(scripts/inference.sh, NMS 0.7) on each variant's val lists, so the figures differ by the score alone. Takes
~15 min on 2 idle CPU cores, 35+ min on a loaded machine (CONQUER's epochs are most of it).
"""
import os

import numpy as np
import torch

from method.rank_first_stage import load_first_stage
from method.tools import demo
from method.tools.benchmark_first_stage import trained_first_stage
from utils.feature_stores import RanklistStore, write_ranklist_store
from utils.io_utils import load_json, load_jsonl, save_json, save_jsonl
from utils.synthetic_tvr import generate_corpus

SMOKE_BY_DEFAULT = False  # trains a first stage and a CONQUER run: minutes even at --quick sizes
CORPUS = dict(demo.FIRST_STAGE_CORPUS)
QUICK_CORPUS = dict(CORPUS, n_train_videos=40, n_train_queries=160, n_val_videos=30, n_val_queries=60)
VCMR_KEYS = ("0.5-r1", "0.5-r5", "0.7-r1", "0.7-r5")


def variant_scores(written, temperature):
    """{variant: per-entry scores} from the scores rank_first_stage wrote (the model's own s)."""
    raw = np.asarray(written, dtype=np.float64)
    return {"raw": raw, "exp(s/T)": np.exp((raw - 1.0) / temperature)}


def write_variants(lists_dir, temperature, out_dir, n_train_queries):
    """One data config per variant: the ranking's config with its val ranklist rescored and its training file cut
    to its first n_train_queries rows (CONQUER's epochs are the cost of this section) -> {variant: path}."""
    config = load_json(os.path.join(lists_dir, "data_config.json"))
    train_path = os.path.join(out_dir, "train_subset.jsonl")
    os.makedirs(out_dir)
    save_jsonl(load_jsonl(config["train_data_path"])[:n_train_queries], train_path)
    config["train_data_path"] = train_path
    store = RanklistStore(config["eval_first_VR_ranklist_path_hero"])
    rescored = {}  # variant -> {desc_id: [(video_idx, score)]}
    for desc_id in store.keys():
        ranked = store.get(desc_id)
        for name, scores in variant_scores([s for _, s in ranked], temperature).items():
            rescored.setdefault(name, {})[desc_id] = [(idx, float(s)) for (idx, _), s in zip(ranked, scores)]
    paths = {}
    for i, (name, lists) in enumerate(rescored.items()):
        store_path = os.path.join(out_dir, f"val_variant{i}")
        write_ranklist_store(store_path, lists)
        paths[name] = os.path.join(out_dir, f"data_config_variant{i}.json")
        save_json(dict(config, eval_first_VR_ranklist_path_hero=store_path), paths[name], save_pretty=True)
    return paths


def run(args):
    """-> {"first_stage": val VR of the lists, "temperature", "vcmr": {variant: VCMR of the checkpoint on its
    lists}}."""
    from method.rank_first_stage import parse_args, rank_corpus
    corpus = QUICK_CORPUS if args.quick else CORPUS
    work = args.work_dir
    data_config = generate_corpus(os.path.join(work, "scores_corpus"), **corpus)
    fs_dir, _, _, fs_seconds = trained_first_stage(data_config, corpus, os.path.join(work, "scores_runs"),
                                                   torch.device("cpu"), n_epoch=1 if args.quick else
                                                   args.first_stage_scores_first_stage_epochs, hidden_dim=128)
    lists_dir, metrics = rank_corpus(parse_args(["--model_dir", fs_dir, "--splits", "train", "val",
                                                 "--out_dir", os.path.join(work, "scores_lists")]))
    model, _ = load_first_stage(fs_dir, torch.device("cpu"))
    temperature = float(model.temperature().detach())
    configs = write_variants(lists_dir, temperature, os.path.join(work, "scores_variants"),
                             args.first_stage_scores_conquer_queries)
    epochs = ["--n_epoch", "1" if args.quick else str(args.first_stage_scores_conquer_epochs)]
    run_dir = demo.train(configs["raw"], corpus, os.path.join(work, "scores_conquer"), epochs)
    vcmr = {name: {k: demo.infer(run_dir, config)[1]["VCMR"][k] for k in VCMR_KEYS} for name, config in configs.items()}
    return {"corpus": corpus, "first_stage": metrics["val"]["first_stage"], "temperature": round(temperature, 4),
            "first_stage_train_s": round(fs_seconds, 1), "vcmr": vcmr}


def add_arguments(parser):
    parser.add_argument("--first_stage_scores_first_stage_epochs", type=int, default=8)
    parser.add_argument("--first_stage_scores_conquer_epochs", type=int, default=2)
    parser.add_argument("--first_stage_scores_conquer_queries", type=int, default=800,
                        help="training queries of CONQUER (the first ones of train_select100)")


def table_rows(results):
    m = results["first_stage"]
    rows = [f"First-stage score in CONQUER's general measure (synthetic val, first stage R@1 {m['r1']:.2f} R@10 "
            f"{m['r10']:.2f} R@100 {m['r100']:.2f}, T {results['temperature']}); VCMR, NMS 0.7, %:",
            f"  {'score r':10s} " + " ".join(f"{k:>7s}" for k in VCMR_KEYS)]
    for name, values in results["vcmr"].items():
        rows.append(f"  {name:10s} " + " ".join(f"{values[k]:7.2f}" for k in VCMR_KEYS))
    return rows
