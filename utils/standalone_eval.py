"""TVR retrieval metrics: VCMR / SVMR recall at IoU thresholds, VR recall, by query type.

A prediction row is [video_idx, st, ed, score]; only the first 100 rows of a query and their first three
fields are read (as the original: 3-field rows, extra fields and malformed rows past the 100th are accepted),
and a desc_id listed twice in a task is scored with its last entry, with a warning. A row is *matched* when its video is the query's GT video, and *correct at θ* when it is
matched and its IoU with the GT moment is >= θ (float32 IoU with the hull denominator, 0 when that is 0).
DiDeMo-style queries with a list of >= 4 GT moments need IoU >= θ with at least 2 of them. A GT row with
`"ts_min_overlaps": n` lists any number of moments in `ts` and needs IoU >= θ with n of them: QVHighlights
rows with several relevant windows carry n = 1, so a row is correct when its best-IoU window reaches θ, as
in the official QVHighlights metric.

* VCMR  "<θ>-r<k>": share of queries with a correct row among their first k rows.
* SVMR  "<θ>-r<k>": the same among the first k *matched* rows.
* VR    "r<k>":     share of queries with a matched row among their first k rows.
Percentages are round(100 * x, 2) in numpy float64, as the original's. With `use_desc_type` (TVR) the same
counts per query type v / t / vt follow, plus "desc_type_ratio"; a type without queries gives NaN (0/0), as
in the original.

All queries are evaluated at once on zero-padded (queries, rows) arrays.

CLI: python -m utils.standalone_eval --submission_path S --gt_path G --save_path O [--not_verbose]
"""
import argparse
import json
import logging
import sys

import numpy as np

from utils.errors import CLI_ERROR_EXIT_STATUS, ConquerError, run_cli
from utils.io_utils import DataFileError, load_json, load_jsonl, save_json
from utils.tvr_format import (IOU_THRESHOLDS, MAX_PREDICTIONS_PER_QUERY, MULTI_MOMENT_MIN_COUNT,
                              MULTI_MOMENT_MIN_OVERLAPS, QUERY_TYPES, RECALL_TOPK, TASKS)

logger = logging.getLogger(__name__)


# The GT row key giving how many of the moments listed in `ts` a correct row must overlap by θ.
TS_MIN_OVERLAPS = "ts_min_overlaps"


class SubmissionError(ConquerError):
    """The submission does not match the GT or is malformed; the message names the task and desc_id."""


class GroundTruthError(ConquerError):
    """A GT row lacks what the evaluation needs; the message names the desc_id and key."""


def rounded_percentage(fraction):
    """round(100 * x, 2) with numpy float64 rounding (what the original's metrics went through)."""
    return float(round(np.float64(fraction) * 100, 2))


def _ratio(count, total):
    return float("nan") if total == 0 else np.float64(count) / total


def temporal_iou_float32(pred_st, pred_ed, gt_st, gt_ed):
    """Elementwise float32 IoU (hull denominator, 0 where it is 0); arguments broadcast."""
    intersection = np.maximum(np.float32(0), np.minimum(pred_ed, gt_ed) - np.maximum(pred_st, gt_st))
    hull = np.maximum(pred_ed, gt_ed) - np.minimum(pred_st, gt_st)
    return np.divide(intersection, hull, out=np.zeros_like(intersection), where=hull != 0)


def _is_number(x):
    # bool counts: the original converts rows with np.array(..., dtype=float32), which takes it as 0/1.
    return isinstance(x, (int, float))


def _row_fields(row):
    """The first three fields of a row, or None when the row has fewer than three or they are not numbers."""
    if not isinstance(row, (list, tuple)) or len(row) < 3 or not all(_is_number(x) for x in row[:3]):
        return None
    return row[:3]


def prediction_matrix(rows, task_type, desc_id, max_pred=MAX_PREDICTIONS_PER_QUERY):
    """One query's first `max_pred` rows as a float32 (n, 3) [video_idx, st, ed].

    As the original, only those rows and only their first three fields are read: a 3-field row, extra
    fields and anything past row `max_pred` are accepted; a read row whose first three fields are not
    numbers is an error.
    """
    if not isinstance(rows, list):
        raise SubmissionError(f"{task_type}: desc_id {desc_id}: 'predictions' must be a list of rows "
                              f"[video_idx, st, ed, score], got {type(rows).__name__}")
    fields = [_row_fields(row) for row in rows[:max_pred]]
    bad = next((j for j, f in enumerate(fields) if f is None), None)
    if bad is not None:
        raise SubmissionError(f"{task_type}: desc_id {desc_id}: prediction row {bad} is {rows[bad]!r}; "
                              f"expected [video_idx, st, ed, ...] with three numbers first")
    return np.array(fields, dtype=np.float32).reshape(len(fields), 3)


def prediction_table(query_rows, task_type, desc_ids, max_pred=MAX_PREDICTIONS_PER_QUERY, bulk=True):
    """`prediction_matrix` of many queries, zero-padded: (Q, P, 3) float32 [video_idx, st, ed] and (Q, P) bool
    (True on real rows), P the longest kept list.

    With `bulk` the kept rows of all queries go through one np.array call; when that does not give numeric
    rows (or without `bulk`: the original's formulation), the queries are converted one by one by
    `prediction_matrix`, which names the bad row.
    """
    table = _bulk_rows(query_rows, max_pred) if bulk else None
    if table is None:
        matrices = [prediction_matrix(rows, task_type, desc_id, max_pred)
                    for rows, desc_id in zip(query_rows, desc_ids)]
        table = np.concatenate(matrices) if matrices else np.zeros((0, 3), dtype=np.float32)
    kept = np.array([min(len(rows), max_pred) for rows in query_rows], dtype=np.int64)
    starts = np.cumsum(kept) - kept
    is_row = np.arange(int(kept.max(initial=0)))[None, :] < kept[:, None]
    preds = np.zeros(is_row.shape + (3,), dtype=np.float32)  # zero padding is never matched
    positions = (starts[:, None] + np.arange(is_row.shape[1])[None, :])[is_row]
    preds[is_row] = table[positions].astype(np.float32)
    return preds, is_row


def _bulk_rows(query_rows, max_pred):
    """The first three fields of every kept row of all queries as one (N, 3) numeric array, or None unless
    every kept row has three numbers first."""
    if not all(isinstance(rows, list) for rows in query_rows):
        return None
    rows = [row[:3] if isinstance(row, (list, tuple)) else row for query in query_rows for row in query[:max_pred]]
    if not rows:
        return np.zeros((0, 3), dtype=np.float32)
    try:
        table = np.array(rows)
    except (ValueError, TypeError):
        return None
    return table if table.ndim == 2 and table.shape[1] == 3 and table.dtype.kind in "biuf" else None


def _gt_moments(gt_item):
    """GT moments of one query as a list of (st, ed), and how many of them a correct row overlaps by θ: one pair
    (1); the DiDeMo form, a list of >= 4 pairs (2); a list of pairs with `ts_min_overlaps` n (n)."""
    desc_id = gt_item.get("desc_id")
    if "ts" not in gt_item:
        raise GroundTruthError(f"GT desc_id {desc_id}: no 'ts' (moment) to evaluate VCMR/SVMR against")
    ts = gt_item["ts"]
    min_overlaps = gt_item.get(TS_MIN_OVERLAPS)
    try:
        if min_overlaps is not None or len(ts) >= MULTI_MOMENT_MIN_COUNT:
            moments = [(float(st), float(ed)) for st, ed in ts]
        else:
            st, ed = ts
            moments = [(float(st), float(ed))]
    except (TypeError, ValueError):
        raise GroundTruthError(f"GT desc_id {desc_id}: 'ts' must be [st, ed], a list of >= {MULTI_MOMENT_MIN_COUNT} "
                               f"[st, ed] pairs, or with {TS_MIN_OVERLAPS!r} a list of [st, ed] pairs; got "
                               f"{ts!r}") from None
    if min_overlaps is None:
        return moments, MULTI_MOMENT_MIN_OVERLAPS if len(moments) > 1 else 1
    if isinstance(min_overlaps, bool) or not isinstance(min_overlaps, int) or not 1 <= min_overlaps <= len(moments):
        raise GroundTruthError(f"GT desc_id {desc_id}: {TS_MIN_OVERLAPS!r} must be an integer from 1 to the "
                               f"{len(moments)} moments of 'ts', got {min_overlaps!r}")
    return moments, min_overlaps


def _require(gt_item, key):
    if key not in gt_item:
        raise GroundTruthError(f"GT desc_id {gt_item.get('desc_id')}: missing key {key!r}")
    return gt_item[key]


def _predictions_by_desc_id(task_results, task_type):
    if not isinstance(task_results, list):
        raise SubmissionError(f"{task_type}: expected a list of per-query dicts, got {type(task_results).__name__}")
    by_desc_id = {}
    for j, entry in enumerate(task_results):
        if not isinstance(entry, dict) or "desc_id" not in entry or "predictions" not in entry:
            raise SubmissionError(f"{task_type}: entry {j} must be a dict with 'desc_id' and 'predictions'")
        if entry["desc_id"] in by_desc_id:
            logger.warning("%s: desc_id %s appears more than once; its last entry is scored (as the original)",
                           task_type, entry["desc_id"])
        by_desc_id[entry["desc_id"]] = entry["predictions"]
    return by_desc_id


def eval_by_task_type(task_results, video2idx, ground_truth, task_type, iou_thds=IOU_THRESHOLDS,
                      recall_topks=RECALL_TOPK, max_pred_per_query=MAX_PREDICTIONS_PER_QUERY, match_number=True,
                      use_desc_type=True, bulk_conversion=True):
    """Metrics of one task. Returns (metrics, metrics_by_type) as insertion-ordered dicts."""
    if task_type not in TASKS:
        raise ValueError(f"task_type must be one of {TASKS}, got {task_type!r}")
    predictions = _predictions_by_desc_id(task_results, task_type)
    gt_by_desc_id = {_require(e, "desc_id"): e for e in ground_truth}  # GT order; a repeated id keeps its last row
    if match_number:
        missing = next((d for d in gt_by_desc_id if d not in predictions), None)
        if missing is not None:
            raise SubmissionError(f"{task_type}: no predictions for GT desc_id {missing} "
                                  f"(desc_ids of predictions and GT must match)")
        extra = next((d for d in predictions if d not in gt_by_desc_id), None)
        if extra is not None:
            raise SubmissionError(f"{task_type}: desc_id {extra} is not in the GT "
                                  f"(desc_ids of predictions and GT must match)")
    gt_items = [e for d, e in gt_by_desc_id.items() if d in predictions]
    n_queries = len(gt_items)
    needs_moments = task_type != "VR"

    preds, is_row = prediction_table([predictions[e["desc_id"]] for e in gt_items], task_type,
                                     [e["desc_id"] for e in gt_items], max_pred_per_query, bulk=bulk_conversion)

    gt_video = np.zeros(n_queries, dtype=np.float32)
    for q, e in enumerate(gt_items):
        vid_name = _require(e, "vid_name")
        if vid_name not in video2idx:
            raise SubmissionError(f"video2idx has no entry for GT video {vid_name!r} (desc_id {e['desc_id']})")
        gt_video[q] = video2idx[vid_name]
    matched = (preds[:, :, 0] == gt_video[:, None]) & is_row  # (Q, P)

    corrects = []  # per θ: (Q, P) bool
    if needs_moments:
        gt = [_gt_moments(e) for e in gt_items]  # per query: (moments, how many a correct row overlaps)
        n_moments = max([len(m) for m, _ in gt], default=0)
        gt_ts = np.zeros((n_queries, n_moments, 2), dtype=np.float32)
        is_moment = np.zeros((n_queries, n_moments), dtype=bool)
        for q, (m, _) in enumerate(gt):
            gt_ts[q, :len(m)] = m
            is_moment[q, :len(m)] = True
        overlaps_needed = np.array([n for _, n in gt], dtype=np.int64)
        iou = temporal_iou_float32(preds[:, :, None, 1], preds[:, :, None, 2],
                                   gt_ts[:, None, :, 0], gt_ts[:, None, :, 1])  # (Q, P, G)
        iou = iou * matched[:, :, None]
        for thd in iou_thds:
            n_overlaps = np.sum((iou >= np.float32(thd)) & is_moment[:, None, :], axis=2)
            corrects.append(n_overlaps >= overlaps_needed[:, None])

    def hits_within(k):
        """Per θ (or once for VR): (Q,) bool, the query has a hit among the rows that count for top-k."""
        if task_type == "VCMR":
            return [c[:, :k].any(axis=1) for c in corrects]
        if task_type == "SVMR":
            within = matched & (np.cumsum(matched, axis=1) <= k)  # the first k matched rows
            return [(c & within).any(axis=1) for c in corrects]
        return [matched[:, :k].any(axis=1)]

    hits = {k: hits_within(k) for k in recall_topks}
    metrics, metrics_by_type = {}, {}
    labels = [f"{thd}-" for thd in iou_thds] if needs_moments else [""]
    for i, label in enumerate(labels):
        for k in recall_topks:
            metrics[f"{label}r{k}"] = rounded_percentage(_ratio(hits[k][i].sum(), n_queries))
    if use_desc_type:
        types = np.array([_require(e, "type") for e in gt_items], dtype=object)
        unknown = next((e for e in gt_items if e["type"] not in QUERY_TYPES), None)
        if unknown is not None:
            raise GroundTruthError(f"GT desc_id {unknown['desc_id']}: 'type' must be one of {QUERY_TYPES}, "
                                   f"got {unknown['type']!r}")
        for desc_type in QUERY_TYPES:
            of_type = types == desc_type
            for i, label in enumerate(labels):
                for k in recall_topks:
                    metrics_by_type[f"{desc_type}-{label}r{k}"] = rounded_percentage(
                        _ratio(np.sum(hits[k][i] & of_type), of_type.sum()))
        metrics_by_type["desc_type_ratio"] = "v {} t {} vt {}".format(
            *[rounded_percentage(_ratio(np.sum(types == t), n_queries)) for t in QUERY_TYPES])
    return metrics, metrics_by_type


def eval_retrieval(submission, ground_truth, iou_thds=IOU_THRESHOLDS, verbose=False, match_number=True,
                   use_desc_type=True, bulk_conversion=True):
    """Metrics of every task present in `submission` (order VCMR, SVMR, VR), then their by-type metrics.

    Args:
        submission: {"video2idx": {name: idx}, task: [{"desc_id", "desc", "predictions"}, ...], ...}.
        ground_truth: annotation rows (dicts with desc_id, vid_name, ts, type).
        match_number: require the desc_ids of every task to equal the GT's (False only for debugging).
        bulk_conversion: convert the rows of all queries at once (`prediction_table`); False converts them
            query by query, as the original (the plain formulation the benchmark compares against).
    """
    if not isinstance(submission, dict) or not isinstance(submission.get("video2idx"), dict):
        raise SubmissionError("the submission must be a dict with a 'video2idx' mapping {video name: index}")
    tasks = [t for t in TASKS if t in submission]
    if verbose:
        logger.info("Evaluating tasks %s on %d GT queries", tasks, len(ground_truth))
    eval_metrics, by_type = {}, {}
    for task_type in tasks:
        eval_metrics[task_type], by_type[task_type + "_by_type"] = eval_by_task_type(
            submission[task_type], submission["video2idx"], ground_truth, task_type, iou_thds=iou_thds,
            match_number=match_number, use_desc_type=use_desc_type, bulk_conversion=bulk_conversion)
    if use_desc_type:
        eval_metrics.update(by_type)
    return eval_metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description="TVR evaluation: VCMR / SVMR / VR recall of a submission file")
    parser.add_argument("--submission_path", required=True, help="submission JSON (video2idx + task lists)")
    parser.add_argument("--gt_path", required=True, help="GT annotation jsonl")
    parser.add_argument("--save_path", required=True, help="where to write the metrics JSON")
    parser.add_argument("--not_verbose", action="store_true", help="do not print the metrics")
    args = parser.parse_args(argv)
    try:
        submission = load_json(args.submission_path)
        ground_truth = load_jsonl(args.gt_path)
        metrics = eval_retrieval(submission, ground_truth, verbose=not args.not_verbose)
    except (SubmissionError, GroundTruthError) as e:
        parser.exit(CLI_ERROR_EXIT_STATUS, f"error: {args.submission_path} vs {args.gt_path}: {e}\n")
    except DataFileError as e:
        parser.exit(CLI_ERROR_EXIT_STATUS, f"error: {e}\n")
    save_json(metrics, args.save_path, save_pretty=True)
    if not args.not_verbose:
        print(json.dumps(metrics, indent=4))
    return metrics


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    run_cli(main)
