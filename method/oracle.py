"""The original's slow formulations, kept as oracles: the tests compare the production code against them and
the benchmark uses them as its baseline. Nothing on the training or inference path imports this module.

* `select_top_n_reference`: top-n by a full stable sort (production: partial selection on the CPU).
* `moment_rows_reference`: submission rows zipped row by row in Python (production: one array conversion).
* `temporal_nms_reference`, `nms_per_video_reference`, `apply_nms_reference`: the list-popping NMS, one query
  and one video at a time (production: `utils.temporal_nms`, all queries at once).
"""
import numpy as np

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
