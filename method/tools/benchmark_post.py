"""Benchmark section `post`: scores -> top-N -> temporal NMS -> metrics on the val split of a corpus generated
from the real TVR annotations (--real_annotations: 10,895 queries, 2,179 videos; random logits), the production
path of `method.evaluation.eval_epoch` vs the original's formulations kept in method/oracle.py. The outputs
(submissions, NMS submissions, metrics) must be identical.

    python -m method.tools.benchmark --sections post
"""
import json
import logging
import os
import time

import numpy as np
import torch

from method.dataset import start_end_collate
from method.tools.benchmark import ROW, SIZES, TVR_VAL_VIDEOS, dataset_for, production_options
from utils.synthetic_tvr import generate_corpus
from utils.tvr_format import IOU_THRESHOLDS, MAX_PREDICTIONS_PER_QUERY, TASKS

logger = logging.getLogger(__name__)

TVR_VAL_QUERIES = 10895
QUICK_QUERIES = 60


def val_batches(args, opt):
    """The val split of a corpus generated with tiny features (from the real annotations at full size) as
    query batches: (metas, first-stage scores (B, k)) from the evaluation dataset, random begin/end logits
    (B, 1+k, L) with -1e4 on each video's padded clips as the model gives them; and the dataset."""
    real = None if args.quick else args.real_annotations
    n_val = (QUICK_QUERIES, 20) if args.quick else (TVR_VAL_QUERIES, TVR_VAL_VIDEOS)
    data_config = generate_corpus(os.path.join(args.work_dir, "post_corpus"), n_train_videos=10, n_train_queries=10,
                                  n_val_videos=n_val[1], n_val_queries=n_val[0], n_test_videos=10, n_test_queries=5,
                                  visual_dim=4, text_dim=4, query_dim=4, real_annotations=real)
    dataset = dataset_for(opt, data_config, is_eval=True, mode="val")
    n_clips = {name: len(dataset.video_store.get(name)) for name in dataset.video2idx}
    rng = np.random.default_rng(0)
    batches = []
    for start in range(0, len(dataset), opt.eval_query_bsz):
        metas, inputs = start_end_collate([dataset.get_query_item(i) for i in
                                           range(start, min(start + opt.eval_query_bsz, len(dataset)))])
        valid = np.array([[n_clips[name] for name in [m["vid_name"]] + m["sample_vid_name_list"]] for m in metas])
        padded = np.arange(opt.max_ctx_len) >= valid[:, :, None]
        begin, end = (torch.from_numpy(np.where(padded, -1e4, rng.normal(0, 3, padded.shape)).astype(np.float32))
                      for _ in range(2))
        batches.append(dict(metas=metas, begin=begin.to(args.device), end=end.to(args.device),
                            first_stage=inputs["inference_vr_scores"].to(args.device)))
    return batches, dataset


def postprocess(batches, dataset, opt, fast):
    """Scores -> ranked rows -> top-100 submission -> NMS -> metrics, timed per stage (score_and_select, rows,
    nms, metrics). fast: what `eval_epoch` runs (`rank_batch`, rows built once for all queries, vectorised NMS,
    the evaluator's bulk conversion, the garbage collector paused); plain: the original's formulations (full
    scores and a full sort of max_before_nms rows, rows zipped per batch, list NMS query by query, the
    evaluator converting query by query)."""
    from method.evaluation import nms_submission, ranked_rows_needed, top_n_submission
    from method.oracle import apply_nms_reference, moment_rows_reference, select_top_n_reference
    from method.scoring import prediction_results, rank_batch, score_batch
    from utils.io_utils import gc_paused
    from utils.standalone_eval import eval_retrieval

    times, clock = {}, [time.perf_counter()]

    def lap(stage):
        now = time.perf_counter()
        times[stage] = times.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    def ranked(batch, rank, n_ranked, **select):
        return rank(opt.similarity_measure, batch["begin"], batch["end"], tasks=TASKS, max_before_nms=n_ranked,
                    min_pred_l=opt.min_pred_l, max_pred_l=opt.max_pred_l, first_stage_scores=batch["first_stage"],
                    use_internal_vr_scores=opt.use_interal_vr_scores, **select)

    def metrics(submission, **bulk):
        return eval_retrieval(submission, dataset.query_data, iou_thds=IOU_THRESHOLDS, use_desc_type=True, **bulk)

    top_n = MAX_PREDICTIONS_PER_QUERY
    if fast:
        ranked_batches = [ranked(batch, rank_batch, ranked_rows_needed(opt, top_n)) for batch in batches]
        lap("score_and_select")
        results = prediction_results(ranked_batches, [m for batch in batches for m in batch["metas"]],
                                     dataset.video2idx, opt.clip_length)
        lap("rows")
        with gc_paused():
            submission = top_n_submission(results, top_n)
            nms = nms_submission(submission, submission, opt.nms_thd, opt.max_before_nms, top_n)
            lap("nms")
            outputs = (submission, nms, metrics(submission), metrics(nms))
            lap("metrics")
    else:
        results = {task: [] for task in TASKS}
        for batch in batches:
            batch_ranked = ranked(batch, score_batch, opt.max_before_nms, select=select_top_n_reference)
            lap("score_and_select")
            batch_results = prediction_results([batch_ranked], batch["metas"], dataset.video2idx, opt.clip_length,
                                               build_moment_rows=moment_rows_reference)
            for task in TASKS:
                results[task] += batch_results[task]
            lap("rows")
        results["video2idx"] = dataset.video2idx
        submission = top_n_submission(results, top_n)
        nms = {"video2idx": dataset.video2idx, "VR": submission["VR"]}
        for task in ("SVMR", "VCMR"):
            nms[task] = apply_nms_reference(submission[task], opt.nms_thd, opt.max_before_nms, top_n)
        lap("nms")
        outputs = (submission, nms, metrics(submission, bulk_conversion=False), metrics(nms, bulk_conversion=False))
        lap("metrics")
    times["total"] = sum(times.values())
    return times, json.dumps(outputs)  # through JSON: NaN metrics compare equal


def run(args):
    opt = production_options(SIZES["quick" if args.quick else "paper"], args.device, nms_thd=0.7)[0]  # paper's NMS
    batches, dataset = val_batches(args, opt)
    runs, outputs = {}, {}
    for key in ("plain", "fast"):
        logger.info("post: %s", key)
        runs[key], outputs[key] = postprocess(batches, dataset, opt, fast=key == "fast")
    identical = outputs["plain"] == outputs["fast"]
    ratios = {f"{stage}_speedup": runs["plain"][stage] / runs["fast"][stage]
              for stage in ("score_and_select", "nms", "total")}
    return dict(runs=runs, n_queries=len(dataset), n_videos=len(dataset.video2idx),
                annotations=(args.real_annotations if args.real_annotations and not args.quick else "synthetic"),
                identical_outputs=identical, ratios=ratios,
                targets={"total time >= 5x faster than plain": ratios["total_speedup"] >= 5.0,
                         "identical outputs fast/plain": identical})



def table_rows(p):
    lines = [f"post-processing ({p['n_queries']} queries, {p['n_videos']} videos, {p['annotations']})",
             ROW.format("", "plain", "fast", "speedup")]
    for stage in ("score_and_select", "rows", "nms", "metrics", "total"):
        plain_s, fast_s = p["runs"]["plain"][stage], p["runs"]["fast"][stage]
        lines.append(ROW.format(stage, f"{plain_s:.2f} s", f"{fast_s:.2f} s", f"{plain_s / fast_s:.2f}"))
    return lines + [ROW.format("identical outputs", "", "", "yes" if p["identical_outputs"] else "NO")]
