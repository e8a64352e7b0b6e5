"""Temporal non-maximum suppression of moment predictions (SPEC §9.5.3-9.5.4).

Per video: sort the moments by score (stable, descending), repeatedly keep the best remaining one and drop
every later moment whose IoU with it is strictly greater than the threshold, keeping at most 100. The IoU
uses the hull max(ed) - min(st) as denominator (the true union whenever the intervals overlap) and is 0 when
that is 0. Arithmetic is float64, as the original's on Python floats, so the kept lists are identical.

`temporal_nms` is the vectorised form (one pairwise IoU matrix, then a greedy pass over booleans);
`temporal_nms_reference` is the plain list algorithm; tests check they agree. `apply_nms` runs
`nms_per_video_batch` (all queries of a chunk padded into (Q, R, R) arrays, R greedy steps over Q at once);
`apply_nms_reference` is the query-by-query list formulation.
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


def nms_per_video_batch(query_predictions, nms_thd, max_after_nms=MAX_KEPT_PER_VIDEO,
                        max_kept_per_video=MAX_KEPT_PER_VIDEO):
    """`nms_per_video` of many queries at once: lists padded to (Q, R) arrays, the greedy passes run as R
    vectorised steps over all Q queries.

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
    # Processing order per query: stable by descending score, padding last.
    order = np.argsort(np.where(present, -table[..., 3], np.inf), axis=1, kind="stable")
    video, st, ed, score = (np.take_along_axis(table[..., c], order, axis=1) for c in range(4))
    present = np.take_along_axis(present, order, axis=1)
    # A row's group: the input position of the first row of its video (orders groups by first appearance).
    same_video = (table[:, :, None, 0] == table[:, None, :, 0])
    first_row = np.take_along_axis(np.argmax(same_video, axis=2), order, axis=1)
    intersection = np.maximum(0.0, np.minimum(ed[:, :, None], ed[:, None, :]) - np.maximum(st[:, :, None], st[:, None, :]))
    hull = np.maximum(ed[:, :, None], ed[:, None, :]) - np.minimum(st[:, :, None], st[:, None, :])
    iou = np.divide(intersection, hull, out=np.zeros_like(intersection), where=hull != 0)
    suppresses = (iou > nms_thd) & (first_row[:, :, None] == first_row[:, None, :])  # (Q, R, R)
    suppressed = ~present
    kept = np.zeros((n_queries, width), dtype=bool)
    kept_per_group = np.zeros((n_queries, width), dtype=np.int64)
    queries = np.arange(n_queries)
    for i in range(width):
        group = first_row[:, i]
        keep = ~suppressed[:, i] & (kept_per_group[queries, group] < max_kept_per_video)
        kept[:, i] = keep
        kept_per_group[queries, group] += keep
        suppressed |= suppresses[:, i, :] & keep[:, None]
    # Final order: (kept first, -score, group of first appearance, input position); positions in `order` are
    # already ascending in input position among equal scores.
    final = np.lexsort((np.broadcast_to(np.arange(width), kept.shape), first_row, -score, ~kept), axis=-1)
    final_rows = np.take_along_axis(order, final, axis=1)
    n_out = np.minimum(kept.sum(axis=1), max_after_nms)
    return [final_rows[q, :n_out[q]] for q in range(n_queries)]


def apply_nms(query_results, nms_thd, max_before_nms, max_after_nms=MAX_KEPT_PER_VIDEO, chunk_elements=2 ** 22):
    """NMS over a task's per-query results; returns new dicts, the input is left untouched.

    Queries are processed by `nms_per_video_batch` in chunks whose (Q, R, R) IoU arrays hold about
    `chunk_elements` entries.

    Args:
        query_results: list of {"desc_id", "desc", "predictions": [[video_idx, st, ed, score], ...]}.
        max_before_nms: NMS reads the first max_before_nms predictions of each query.
    """
    inputs = [query["predictions"][:max_before_nms] for query in query_results]
    width = max((len(p) for p in inputs), default=0)
    chunk = max(1, chunk_elements // max(1, width * width))
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
