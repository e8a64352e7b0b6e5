"""Temporal non-maximum suppression of moment predictions (SPEC §9.5.3-9.5.4).

Per video: sort the moments by score (stable, descending), repeatedly keep the best remaining one and drop
every later moment whose IoU with it is strictly greater than the threshold, keeping at most 100. The IoU
uses the hull max(ed) - min(st) as denominator (the true union whenever the intervals overlap) and is 0 when
that is 0. Arithmetic is float64, as the original's on Python floats, so the kept lists are identical.

`temporal_nms` is the vectorised form (one pairwise IoU matrix, then a greedy pass over booleans);
`temporal_nms_reference` is the plain list algorithm; tests check they agree. `apply_nms` runs
`nms_per_video_batch` (queries padded into (Q, R) arrays; step i of `greedy_nms_steps` decides row i of every
query and computes only that row's IoU with the later rows); `apply_nms_reference` is the query-by-query list
formulation.
"""
import numpy as np

from utils.scoring import gc_paused

MAX_KEPT_PER_VIDEO = 100


def temporal_iou_matrix(starts, ends):
    """(n, n) float64 IoU between all pairs of intervals [starts[i], ends[i]] (hull denominator)."""
    starts, ends = np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    intersection = np.maximum(0.0, np.minimum(ends[:, None], ends[None, :])
                              - np.maximum(starts[:, None], starts[None, :]))
    hull = np.maximum(ends[:, None], ends[None, :]) - np.minimum(starts[:, None], starts[None, :])
    return np.divide(intersection, hull, out=np.zeros_like(intersection), where=hull != 0)


def _greedy_keep(suppresses, group=None, max_kept=MAX_KEPT_PER_VIDEO):
    """Greedy pass over items already in processing order -> positions of the kept items.

    An item is kept unless an earlier kept item suppresses it (`suppresses[i, j]`: kept i removes j), and at
    most `max_kept` are kept per group (`group` None: one group).
    """
    n = len(suppresses)
    group = np.zeros(n, dtype=np.int64) if group is None else group
    kept_per_group = np.zeros(n, dtype=np.int64)
    suppressed = np.zeros(n, dtype=bool)
    kept = []
    for i in range(n):
        if suppressed[i] or kept_per_group[group[i]] == max_kept:
            continue
        kept.append(i)
        kept_per_group[group[i]] += 1
        suppressed |= suppresses[i]
    return np.array(kept, dtype=np.int64)


def temporal_nms(predictions, nms_thd, max_after_nms=MAX_KEPT_PER_VIDEO):
    """NMS of one video's moments.

    Args:
        predictions: list of [st, ed, score].
        nms_thd: drop a moment whose IoU with a kept, better one is > nms_thd.
        max_after_nms: keep at most this many.
    Returns:
        list of [st, ed, score], kept moments best first (ties in input order).
    """
    if len(predictions) <= 1:
        return [list(p) for p in predictions]
    table = np.array([p[:3] for p in predictions], dtype=np.float64)
    order = np.argsort(-table[:, 2], kind="stable")
    iou = temporal_iou_matrix(table[order, 0], table[order, 1])
    kept = order[_greedy_keep(iou > nms_thd, max_kept=max_after_nms)]
    return [list(predictions[i][:3]) for i in kept]


def temporal_iou(a, b):
    """IoU of two [st, ed] intervals with the hull denominator (0 when it is 0)."""
    intersection = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    hull = max(a[1], b[1]) - min(a[0], b[0])
    return 0 if hull == 0 else 1.0 * intersection / hull


def temporal_nms_reference(predictions, nms_thd, max_after_nms=MAX_KEPT_PER_VIDEO):
    """Plain greedy formulation of `temporal_nms` (list pops, pairwise IoU one at a time)."""
    remaining = sorted(predictions, key=lambda p: p[2], reverse=True)  # Python's sort is stable
    kept = []
    while remaining and len(kept) < max_after_nms:
        head = remaining.pop(0)
        remaining = [p for p in remaining if temporal_iou(head, p) <= nms_thd]
        kept.append(list(head[:3]))
    return kept


def nms_per_video(predictions, nms_thd, max_after_nms=MAX_KEPT_PER_VIDEO, max_kept_per_video=MAX_KEPT_PER_VIDEO):
    """NMS of one query's cross-video moment list (SPEC §9.5.3), vectorised over all its videos at once.

    Equivalent to: group rows by video (groups in order of first appearance), `temporal_nms` per group,
    concatenate the groups, stable sort by score descending, keep `max_after_nms`. A single IoU matrix
    restricted to same-video pairs gives the same per-group greedy passes; the final order reproduces the
    concatenation's tie order (group of first appearance, then input order).

    Args:
        predictions: list of [video_idx, st, ed, score] (already cut to the rows NMS should read).
    Returns:
        list of [video_idx, st, ed, score].
    """
    if not predictions:
        return []
    table = np.array([p[:4] for p in predictions], dtype=np.float64)  # video_idx, st, ed, score
    _, first_row, group = np.unique(table[:, 0], return_index=True, return_inverse=True)
    group = np.argsort(np.argsort(first_row))[group]  # groups numbered by first appearance
    order = np.argsort(-table[:, 3], kind="stable")
    suppresses = (temporal_iou_matrix(table[order, 1], table[order, 2]) > nms_thd) & (
        group[order, None] == group[None, order])
    kept = order[_greedy_keep(suppresses, group=group[order], max_kept=max_kept_per_video)]
    # Final order (-score, group of first appearance, input position): `kept` is in (-score, input position)
    # order already, so a stable lexsort on the first two keys suffices.
    final = kept[np.lexsort((group[kept], -table[kept, 3]))][:max_after_nms]
    return [list(predictions[i]) for i in final]


def nms_per_video_reference(predictions, nms_thd, max_after_nms=MAX_KEPT_PER_VIDEO,
                            max_kept_per_video=MAX_KEPT_PER_VIDEO):
    """Plain formulation of `nms_per_video`: explicit grouping, per-group greedy NMS, concatenation, sort."""
    groups = {}
    for p in predictions:
        groups.setdefault(p[0], []).append(list(p[1:4]))
    merged = []
    for video_idx, group in groups.items():
        merged += [[video_idx] + p for p in temporal_nms_reference(group, nms_thd, max_kept_per_video)]
    return sorted(merged, key=lambda p: p[3], reverse=True)[:max_after_nms]


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
    """`nms_per_video` of many queries at once: lists padded to (Q, R) arrays, then `greedy_nms_steps`.

    Args:
        query_predictions: Q lists of [video_idx, st, ed, score] rows.
    Returns:
        Q int64 arrays, the input positions of the rows `nms_per_video` returns, in its order.
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


def apply_nms_reference(query_results, nms_thd, max_before_nms, max_after_nms=MAX_KEPT_PER_VIDEO):
    """Plain formulation of `apply_nms`: `nms_per_video_reference` query by query."""
    return [dict(query, predictions=nms_per_video_reference(query["predictions"][:max_before_nms], nms_thd,
                                                            max_after_nms))
            for query in query_results]
