"""The original's slow formulations, kept as oracles: the tests compare the production code against them and
the benchmark uses them as its baseline. Nothing on the training or inference path imports this module.

* `select_top_n_reference`: top-n by a full stable sort (production: partial selection on the CPU).
* `moment_rows_reference`: submission rows zipped row by row in Python (production: one array conversion).
* `temporal_nms_reference`, `nms_per_video_reference`, `apply_nms_reference`: the list-popping NMS, one query
  and one video at a time (production: `utils.temporal_nms`, all queries at once).
* `score_all_reference`: the whole (queries, videos) first-stage score matrix (production:
  `method.first_stage.rank_videos`, the top k of one query chunk at a time).
* `rank_windowed_reference`: windowed ranking by loops over windows and pairs and a dict of merged moments
  (production: `method.scoring.rank_windowed_batch`, array operations per query).
"""
import numpy as np
import torch

from method.first_stage import video_max, window_score_chunks
from method.scoring import moment_seconds, sort_descending
from utils.temporal_nms import MAX_KEPT_PER_VIDEO


def select_top_n_reference(scores, n):
    """Plain formulation of `select_top_n`: a full stable descending sort, then the first n."""
    values, indices = sort_descending(scores)
    return values[:, :n], indices[:, :n]


def moment_rows_reference(video_idx, st, ed, scores, clip_length, seconds_dtype=np.float32):
    """Plain formulation of `moment_rows`: columns to Python lists, zipped row by row."""
    st_seconds, ed_seconds = moment_seconds(st, ed, clip_length, seconds_dtype)
    columns = (np.asarray(video_idx).tolist(), st_seconds.tolist(), ed_seconds.tolist(),
               np.asarray(scores, dtype=np.float32).tolist())
    return [[list(row) for row in zip(*query_columns)] for query_columns in zip(*columns)]


def temporal_iou(a, b):
    """IoU of two [st, ed] intervals with the hull denominator (0 when it is 0)."""
    intersection = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    hull = max(a[1], b[1]) - min(a[0], b[0])
    return 0 if hull == 0 else 1.0 * intersection / hull


def temporal_nms_reference(predictions, nms_thd, max_after_nms=MAX_KEPT_PER_VIDEO):
    """Greedy NMS of one video's [st, ed, score] moments: list pops, pairwise IoU one at a time."""
    remaining = sorted(predictions, key=lambda p: p[2], reverse=True)  # Python's sort is stable
    kept = []
    while remaining and len(kept) < max_after_nms:
        head = remaining.pop(0)
        remaining = [p for p in remaining if temporal_iou(head, p) <= nms_thd]
        kept.append(list(head[:3]))
    return kept


def nms_per_video_reference(predictions, nms_thd, max_after_nms=MAX_KEPT_PER_VIDEO,
                            max_kept_per_video=MAX_KEPT_PER_VIDEO):
    """NMS of one query's [video_idx, st, ed, score] rows: explicit grouping by video, per-video greedy NMS,
    concatenation in order of first appearance, stable sort by score."""
    groups = {}
    for p in predictions:
        groups.setdefault(p[0], []).append(list(p[1:4]))
    merged = []
    for video_idx, group in groups.items():
        merged += [[video_idx] + p for p in temporal_nms_reference(group, nms_thd, max_kept_per_video)]
    return sorted(merged, key=lambda p: p[3], reverse=True)[:max_after_nms]


def apply_nms_reference(query_results, nms_thd, max_before_nms, max_after_nms=MAX_KEPT_PER_VIDEO):
    """`utils.temporal_nms.apply_nms`, query by query with `nms_per_video_reference`."""
    return [dict(query, predictions=nms_per_video_reference(query["predictions"][:max_before_nms], nms_thd,
                                                            max_after_nms))
            for query in query_results]


def rank_windowed_reference(measure, begin_logits, end_logits, slot_video, slot_start, slot_length, *, tasks,
                            max_before_nms, min_pred_l, max_pred_l, video_scores=None, first_stage_scores=None,
                            use_internal_vr_scores=False):
    """Plain formulation of `method.scoring.rank_windowed_batch`: every window, every (st, ed) pair in loops, a
    dict from (video, video st, video ed) to its best score, then one sort per query.

    Returns per query {"VR": [(candidate, score)], "SVMR": [(st, ed, score)], "VCMR": [(candidate, st, ed,
    score)]} (the tasks asked for), best first, st / ed in clips of the whole video.
    """
    terms = [np.asarray(torch.softmax(x.float(), dim=-1) if measure != "disjoint" else x.float())
             for x in (begin_logits, end_logits)]
    k = first_stage_scores.shape[1] if first_stage_scores is not None else int(np.max(slot_video))
    results = []
    for i in range(begin_logits.shape[0]):
        slots = [j for j in range(slot_video.shape[1]) if slot_video[i, j] >= 0]

        def pair_scores(video, weight=None):
            found = {}
            for j in (j for j in slots if slot_video[i, j] == video):
                for st in range(slot_length[i, j]):
                    for ed in range(st, slot_length[i, j]):
                        if not min_pred_l <= ed - st < max_pred_l:
                            continue
                        b, e = terms[0][i, j, st], terms[1][i, j, ed]
                        score = b + e if measure == "disjoint" else (b if weight is None else b * weight) * e
                        key = (slot_start[i, j] + st, slot_start[i, j] + ed)
                        found[key] = max(found.get(key, -np.inf), score)
            return found

        if measure == "disjoint":
            video_score = [max(pair_scores(c + 1).values(), default=-np.inf) for c in range(k)]
        elif use_internal_vr_scores:
            video_score = [float(x) for x in first_stage_scores[i]]
        else:
            logits = video_scores[i].float().numpy()
            best = [max(logits[j] for j in slots if slot_video[i, j] == c + 1) for c in range(k)]
            video_score = torch.softmax(torch.tensor(best, dtype=torch.float32), dim=0).tolist()
        order = list(range(k)) if use_internal_vr_scores and measure != "disjoint" else \
            sorted(range(k), key=lambda c: (-video_score[c], c))
        result = {}
        if "VR" in tasks:
            result["VR"] = [(c, np.float32(video_score[c])) for c in order]
        if "SVMR" in tasks:
            found = pair_scores(0)
            ranked = sorted(found, key=lambda key: (-found[key], key))[:max_before_nms]
            result["SVMR"] = [(st, ed, found[(st, ed)]) for st, ed in ranked]
        if "VCMR" in tasks:
            position = {c: (c if measure == "disjoint" else order.index(c)) for c in range(k)}
            found = {}
            for c in range(k):
                weight = None if measure == "disjoint" else np.float32(video_score[c])
                found.update({(c,) + key: score for key, score in pair_scores(c + 1, weight).items()})
            ranked = sorted(found, key=lambda key: (-found[key], position[key[0]], key[1], key[2]))[:max_before_nms]
            result["VCMR"] = [key + (found[key],) for key in ranked]
        results.append(result)
    return results


@torch.inference_mode()
def score_all_reference(query_emb, bank, query_chunk=1024, video_bucket=512, progress=True):
    """(Q, V) scores of every query against every video of `bank`: the max over the video's windows of
    FirstStageRetriever.score, held whole (`rank_videos` keeps the top k per query chunk)."""
    scores = torch.empty(query_emb["query"].shape[0], len(bank), device=query_emb["query"].device)
    for start, stop, window_scores in window_score_chunks(query_emb, bank, query_chunk, video_bucket, progress):
        scores[start:stop] = video_max(window_scores, bank.window_video, len(bank))
    return scores
