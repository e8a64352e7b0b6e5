"""Temporal non-maximum suppression of a query's cross-video moment list.

For one query: group its rows [video_idx, st, ed, score] by video; per video, sort the moments by score
(stable, descending), repeatedly keep the best remaining one and drop every later moment of that video whose
IoU with it is strictly greater than the threshold, keeping at most 100 per video; then merge the videos'
kept moments by descending score (ties: video of first appearance, then input order) and keep
`max_after_nms`. The IoU uses the hull max(ed) - min(st) as denominator (the true union whenever the
intervals overlap) and is 0 when that is 0. Arithmetic is float64, as the original's on Python floats, so
the kept lists are identical to its list algorithm (kept in method/oracle.py for the tests).

`apply_nms` pads the queries into (Q, R) arrays; step i of `greedy_nms_steps` decides row i of every query
and computes only that row's IoU with the later rows.
"""
import numpy as np

from utils.io_utils import gc_paused

MAX_KEPT_PER_VIDEO = 100


def first_appearance_groups(video, present):
    """Per query, the input position of the first row of each row's video (groups by first appearance).

    Args:
        video: (Q, R) float64 video index per row; present: (Q, R) bool, False on padding.
    Returns:
        (Q, R) int64; padding rows get positions of their own (they never match a present row).
    """
    n_queries, width = video.shape
    video = np.where(present, video, np.inf)
    by_video = np.argsort(video, axis=1, kind="stable")  # equal videos stay in input order
    sorted_video = np.take_along_axis(video, by_video, axis=1)
    run_start = np.ones((n_queries, width), dtype=bool)
    run_start[:, 1:] = sorted_video[:, 1:] != sorted_video[:, :-1]
    run_start |= ~np.take_along_axis(present, by_video, axis=1)
    start_index = np.maximum.accumulate(np.where(run_start, np.arange(width), 0), axis=1)
    groups = np.empty_like(by_video)
    np.put_along_axis(groups, by_video, np.take_along_axis(by_video, start_index, axis=1), axis=1)
    return groups


def greedy_nms_steps(st, ed, group, present, nms_thd, max_kept_per_group):
    """Greedy NMS of many queries at once, rows already in processing order (best first).

    Step i decides row i of every query: kept unless suppressed and unless its group already has
    `max_kept_per_group` kept rows; a kept row then suppresses the later rows of its group with IoU > nms_thd.
    Only the IoU of row i against rows i+1.. is computed, so the work is R^2 / 2 per query in (Q, R) slices.

    Args:
        st, ed: (Q, R) float64; group: (Q, R) int64 group ids in 0..R-1; present: (Q, R) bool.
    Returns:
        (Q, R) bool, the kept rows.
    """
    n_queries, width = st.shape
    suppressed = ~present
    kept = np.zeros((n_queries, width), dtype=bool)
    kept_per_group = np.zeros((n_queries, width), dtype=np.int64)
    queries = np.arange(n_queries)
    for i in range(width):
        row_group = group[:, i]
        keep = ~suppressed[:, i] & (kept_per_group[queries, row_group] < max_kept_per_group)
        kept[:, i] = keep
        kept_per_group[queries, row_group] += keep
        if i + 1 == width or not keep.any():
            continue
        head_st, head_ed = st[:, i, None], ed[:, i, None]
        later_st, later_ed = st[:, i + 1:], ed[:, i + 1:]
        intersection = np.minimum(head_ed, later_ed)
        intersection -= np.maximum(head_st, later_st)
        np.maximum(intersection, 0.0, out=intersection)
        hull = np.maximum(head_ed, later_ed)
        hull -= np.minimum(head_st, later_st)
        iou = np.divide(intersection, hull, out=np.zeros_like(intersection), where=hull != 0)
        suppresses = iou > nms_thd
        suppresses &= group[:, i + 1:] == row_group[:, None]
        suppresses &= keep[:, None]
        suppressed[:, i + 1:] |= suppresses
    return kept


def nms_per_video_batch(query_predictions, nms_thd, max_after_nms=MAX_KEPT_PER_VIDEO,
                        max_kept_per_video=MAX_KEPT_PER_VIDEO):
    """NMS (module docstring) of many queries at once: lists padded to (Q, R) arrays, then `greedy_nms_steps`.

    Args:
        query_predictions: Q lists of [video_idx, st, ed, score] rows.
    Returns:
        Q int64 arrays, the input positions of the rows kept, in output order.
    """
    n_rows = np.array([len(p) for p in query_predictions], dtype=np.int64)
    n_queries, width = len(query_predictions), int(n_rows.max(initial=0))
    if width == 0:
        return [np.zeros(0, dtype=np.int64) for _ in query_predictions]
    present = np.arange(width)[None, :] < n_rows[:, None]  # (Q, R)
    table = np.zeros((n_queries, width, 4), dtype=np.float64)
    rows = [row for p in query_predictions for row in p]
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError:  # rows of different lengths
        values = None
    if values is None or values.shape != (len(rows), 4):
        values = np.array([row[:4] for row in rows], dtype=np.float64)
    table[present] = values
    input_group = first_appearance_groups(table[..., 0], present)
    # Processing order per query: stable by descending score, padding last.
    order = np.argsort(np.where(present, -table[..., 3], np.inf), axis=1, kind="stable")
    st, ed, score = (np.take_along_axis(table[..., c], order, axis=1) for c in (1, 2, 3))
    group = np.take_along_axis(input_group, order, axis=1)
    kept = greedy_nms_steps(st, ed, group, np.take_along_axis(present, order, axis=1), nms_thd, max_kept_per_video)
    # Final order: (kept first, -score, group of first appearance, input position); positions in `order` are
    # already ascending in input position among equal scores.
    final = np.lexsort((np.broadcast_to(np.arange(width), kept.shape), group, -score, ~kept), axis=-1)
    final_rows = np.take_along_axis(order, final, axis=1)
    n_out = np.minimum(kept.sum(axis=1), max_after_nms)
    return [final_rows[q, :n_out[q]] for q in range(n_queries)]


def apply_nms(query_results, nms_thd, max_before_nms, max_after_nms=MAX_KEPT_PER_VIDEO, chunk_elements=2 ** 16):
    """NMS over a task's per-query results; returns new dicts, the input is left untouched.

    Queries are processed by `nms_per_video_batch` in chunks of about `chunk_elements` rows (padded), so each
    greedy step works on cache-sized (Q, R) slices.

    Args:
        query_results: list of {"desc_id", "desc", "predictions": [[video_idx, st, ed, score], ...]}.
        max_before_nms: NMS reads the first max_before_nms predictions of each query.
    """
    inputs = [query["predictions"][:max_before_nms] for query in query_results]
    width = max((len(p) for p in inputs), default=0)
    chunk = max(1, chunk_elements // max(1, width))
    out = []
    with gc_paused():  # only new acyclic lists and dicts: collections would find nothing to free
        for start in range(0, len(inputs), chunk):
            chunk_inputs = inputs[start:start + chunk]
            for query, predictions, rows in zip(query_results[start:start + chunk], chunk_inputs,
                                                nms_per_video_batch(chunk_inputs, nms_thd, max_after_nms)):
                out.append(dict(query, predictions=[list(predictions[i]) for i in rows.tolist()]))
    return out


