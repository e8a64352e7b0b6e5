"""From begin/end logits to ranked predictions and submission rows.

For one evaluation batch the model gives begin/end logits b, e of shape (B, N, L) over N = 1 + k videos
(index 0: the GT video of the query, 1..k: the first-stage candidates in ranklist order) and, for the
`exclusive` measure, video-scoring logits s of shape (B, N). This module turns them into

* SVMR: the best `max_before_nms` (st, ed) pairs of video 0;
* VR:   the k candidates ordered best first, with their scores;
* VCMR: the best `max_before_nms` (candidate, st, ed) triples over all k candidates;

and converts those into submission rows [video_idx, st_seconds, ed_seconds, score]. Evaluation calls
`rank_batch` once per batch and `prediction_results` once at the end. The three similarity measures share one
code path: `moment_scores` scores every (st, ed) pair, `rank_candidates` orders the candidates,
`select_top_n` picks the best entries of a flattened score matrix.

Ties. Equal scores are common (pairs of padded clips all score 0, and tiny probabilities underflow to 0 in
float32). Their order was implementation-defined in the original; here every selection orders entries by
descending score, then ascending flat index, both in the fast partial selection and in the full sort, so the
two always agree.

On the CPU, `score_batch_band` scores only the valid (st, ed) pairs (2,124 of 10,000 for L = 100,
max_pred_l = 24) and selects among them with numpy; rows whose top n would reach the invalid pairs' constant
score fall back to full scores. On accelerators `score_batch` scores every pair (full scores sort faster
there). The two are tested bitwise equal.
"""
import functools

import numpy as np
import torch

from utils.io_utils import gc_paused
from utils.tvr_format import TASKS

# The original's VERY_NEGATIVE_NUMBER: a disjoint score for pairs outside the length constraint.
DISJOINT_INVALID_SCORE = -1e10


@functools.lru_cache(maxsize=32)
def valid_pair_mask(length, min_pred_l, max_pred_l):
    """(L, L) bool numpy array, True where min_pred_l <= ed - st < max_pred_l (row st, column ed).

    Same set as the original's triu(ones, min_pred_l) * (1 - triu(ones, max_pred_l)). Built once per
    (L, min, max) and returned read-only because it is shared between callers.
    """
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None]  # ed - st
    mask = (offsets >= min_pred_l) & (offsets < max_pred_l)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=32)
def valid_pair_mask_on(length, min_pred_l, max_pred_l, device):
    """`valid_pair_mask` as a torch bool tensor on `device` (cached per device too)."""
    return torch.from_numpy(valid_pair_mask(length, min_pred_l, max_pred_l).copy()).to(device)


def moment_scores(measure, begin_logits, end_logits, valid_mask, video_weights=None):
    """Score every (st, ed) pair of every video.

    Args:
        measure: "general", "exclusive" or "disjoint".
        begin_logits, end_logits: (..., L) float; padded clips already hold -1e4 (model's mask_logits).
        valid_mask: (L, L) bool torch tensor from `valid_pair_mask_on`.
        video_weights: (...) float video scores r (general/exclusive VCMR) or None (SVMR; must be None
            for disjoint).
    Returns:
        (..., L, L) float32, row st, column ed:
        general/exclusive: r * softmax(b)[st] * softmax(e)[ed], 0 where invalid (padded clips get
            probability 0, so they score 0 as well);
        disjoint: b[st] + e[ed] on the raw logits, -1e10 where invalid.
    """
    begin_logits, end_logits = begin_logits.float(), end_logits.float()
    if measure == "disjoint":
        if video_weights is not None:
            raise ValueError("the disjoint measure takes no video weights")
        scores = begin_logits.unsqueeze(-1) + end_logits.unsqueeze(-2)
        return scores.masked_fill(~valid_mask, DISJOINT_INVALID_SCORE)
    begin_probs = torch.softmax(begin_logits, dim=-1)
    end_probs = torch.softmax(end_logits, dim=-1)
    if video_weights is not None:
        # The original evaluates einsum("qvm,qv,qvn->qvmn"): (p_b * r) first, then the outer product.
        begin_probs = begin_probs * video_weights.float().unsqueeze(-1)
    scores = begin_probs.unsqueeze(-1) * end_probs.unsqueeze(-2)
    return scores.masked_fill(~valid_mask, 0.0)


def sort_descending(scores):
    """Stable descending sort along dim 1: (values, indices), ties in ascending index order."""
    return torch.sort(scores, dim=1, descending=True, stable=True)


def rank_candidates(measure, *, video_scores=None, first_stage_scores=None, use_internal_vr_scores=False,
                    candidate_moment_scores=None):
    """Order the k first-stage candidates of each query and give their video scores.

    Args:
        video_scores: (B, 1+k) VS-head logits (exclusive), index 0 is the GT video.
        first_stage_scores: (B, k) first-stage (HERO) scores in ranklist order.
        use_internal_vr_scores: general/exclusive: use `first_stage_scores` as they are, in ranklist order.
        candidate_moment_scores: (B, k, L, L) disjoint scores of the candidates, in ranklist order.
    Returns:
        order: (B, k) int64, candidate positions (0..k-1 in ranklist order), best first;
        scores: (B, k) float32, the video score of each candidate in that order.
    """
    if measure == "disjoint":
        per_candidate = candidate_moment_scores.flatten(start_dim=2).max(dim=-1).values
        scores, order = sort_descending(per_candidate)
        return order, scores
    if use_internal_vr_scores:
        batch_size, k = first_stage_scores.shape
        order = torch.arange(k, device=first_stage_scores.device).expand(batch_size, k)
        return order, first_stage_scores.float()
    if video_scores is None:
        raise ValueError(f"similarity_measure {measure!r} without use_interal_vr_scores needs the video-scoring "
                         "head's scores, but the model returned none (only the exclusive model has that head)")
    scores, order = sort_descending(torch.softmax(video_scores[:, 1:].float(), dim=1))
    return order, scores


def select_top_n(scores, n):
    """The first n entries of each row in (descending score, ascending index) order.

    On CPU by partial selection: torch.topk finds the n-th largest value t of each row; every entry > t is
    taken, plus the entries == t of smallest index up to n in total; only those n are then sorted, much less
    work than a full sort of every row. On CUDA a full stable sort is faster than the selection's several
    kernels and is used instead. Both give the same result.

    Args:
        scores: (B, F) float tensor without NaN (`score_batch` checks the logits).
        n: entries wanted per row; min(n, F) are returned.
    Returns:
        values (B, n') float, flat indices (B, n') int64.
    """
    if scores.is_cuda:
        values, indices = sort_descending(scores)
        return values[:, :n], indices[:, :n]
    return select_top_n_partial(scores, n)


def select_top_n_partial(scores, n):
    """`select_top_n` by partial selection (see there); no host-device synchronisation on any device."""
    batch_size, n_flat = scores.shape
    n = min(n, n_flat)
    if n == 0 or batch_size == 0:
        return scores[:, :n], torch.zeros((batch_size, n), dtype=torch.long, device=scores.device)
    nth_largest = torch.topk(scores, n, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    above = scores > nth_largest
    tied = scores == nth_largest
    n_tied_wanted = n - above.sum(dim=1, keepdim=True)
    selected = above | (tied & (tied.cumsum(dim=1) <= n_tied_wanted))
    # Exactly n per row, listed row-major, so ascending within each row.
    indices = torch.nonzero_static(selected, size=batch_size * n, fill_value=0)[:, 1].view(batch_size, n)
    values, order = sort_descending(scores.gather(1, indices))
    return values, indices.gather(1, order)


@functools.lru_cache(maxsize=32)
def valid_pair_band(length, min_pred_l, max_pred_l):
    """(st, ed) int64 arrays of the valid pairs in ascending flat index st * L + ed (read-only, cached)."""
    st, ed = np.nonzero(valid_pair_mask(length, min_pred_l, max_pred_l))
    st.setflags(write=False)
    ed.setflags(write=False)
    return st, ed


def clip_terms(measure, logits):
    """Per-clip factors of the moment scores, (..., L) float32 numpy: softmax probabilities (general,
    exclusive) or the raw logits (disjoint), by the same torch operations as `moment_scores`."""
    logits = logits.float()
    return _numpy(logits if measure == "disjoint" else torch.softmax(logits, dim=-1))


def band_moment_scores(measure, begin_terms, end_terms, band, video_weights=None):
    """`moment_scores` at the valid pairs only, bitwise equal (same float32 operations, same order).

    Args:
        begin_terms, end_terms: (..., L) from `clip_terms`; band: `valid_pair_band`;
        video_weights: (...) float32 numpy or None.
    Returns:
        (..., P) float32 numpy, P = len(band[0]).
    """
    st, ed = band
    if measure == "disjoint":
        return begin_terms[..., st] + end_terms[..., ed]
    if video_weights is not None:
        begin_terms = begin_terms * video_weights[..., None]
    return begin_terms[..., st] * end_terms[..., ed]


def select_top_n_band(band_values, band_flat, n, n_flat, invalid_score, full_scores):
    """`select_top_n` of a (B, n_flat) score matrix known only at its valid entries (all others = invalid_score).

    Partial selection (np.partition) of the n best valid entries per row, ties at the n-th value broken by
    ascending flat index, then a stable sort of those n. A row is exact when its n-th value beats
    `invalid_score` (no invalid entry can enter its top n); other rows (few valid pairs, e.g. very short
    videos, or scores tied with the invalid score) are recomputed by `select_top_n_partial` on
    `full_scores(row_indices)` -> (r, n_flat) torch scores.

    Args:
        band_values: (B, P) float32 numpy scores of the valid entries, in ascending flat index order.
        band_flat: (P,) int64 flat index of each valid entry.
    Returns:
        values (B, n') float32, flat indices (B, n') int64 (numpy), n' = min(n, n_flat).
    """
    batch_size, n_band = band_values.shape
    n = min(n, n_flat)
    values = np.zeros((batch_size, n), dtype=np.float32)
    flat = np.zeros((batch_size, n), dtype=np.int64)
    exact = np.zeros(batch_size, dtype=bool)
    if 0 < n <= n_band:
        nth_largest = np.partition(band_values, n_band - n, axis=1)[:, n_band - n, None]
        selected = band_values >= nth_largest
        over = np.flatnonzero(selected.sum(axis=1) > n)  # rows with more ties at the n-th value than wanted
        if len(over):
            tied = band_values[over] == nth_largest[over]
            n_tied_wanted = n - (band_values[over] > nth_largest[over]).sum(axis=1, keepdims=True)
            selected[over] &= ~tied | (np.cumsum(tied, axis=1) <= n_tied_wanted)
        rows = np.arange(batch_size)[:, None]
        # Exactly n per row, ascending flat index within each row (flatnonzero: one index array, unlike nonzero).
        positions = np.flatnonzero(selected).reshape(batch_size, n) - rows * n_band
        selected_values = band_values[rows, positions]
        order = np.argsort(-selected_values, axis=1, kind="stable")
        values = selected_values[rows, order]
        flat = band_flat[positions[rows, order]]
        exact = values[:, -1] > invalid_score if n_band < n_flat else np.ones(batch_size, dtype=bool)
    elif n == 0:
        exact[:] = True
    redo = np.flatnonzero(~exact)
    if len(redo):
        redo_values, redo_flat = select_top_n_partial(full_scores(torch.from_numpy(redo)), n)
        values[redo], flat[redo] = _numpy(redo_values), _numpy(redo_flat)
    return values, flat


def score_batch_band(measure, begin_logits, end_logits, *, tasks, max_before_nms, min_pred_l, max_pred_l,
                     video_scores=None, first_stage_scores=None, use_internal_vr_scores=False):
    """`score_batch` computing moment scores on the valid pairs only (CPU): about 2,124 of 10,000 pairs for
    L = 100, min_pred_l = 0, max_pred_l = 24. Same arguments and bitwise the same result as `score_batch`."""
    logits = [begin_logits, end_logits] + ([video_scores] if video_scores is not None else [])
    if any(bool(torch.isnan(x).any()) for x in logits):
        raise ValueError("the model's logits contain NaN: cannot rank predictions")
    length = begin_logits.shape[-1]
    band = valid_pair_band(length, min_pred_l, max_pred_l)
    band_flat = band[0] * length + band[1]
    pairs_per_video = length * length
    invalid_score = DISJOINT_INVALID_SCORE if measure == "disjoint" else 0.0
    valid = valid_pair_mask_on(length, min_pred_l, max_pred_l, begin_logits.device)
    begin_terms, end_terms = clip_terms(measure, torch.stack((begin_logits, end_logits)))  # one torch call
    out = {}

    if "SVMR" in tasks:
        gt_begin, gt_end = begin_logits[:, 0], end_logits[:, 0]
        values, flat = select_top_n_band(
            band_moment_scores(measure, begin_terms[:, 0], end_terms[:, 0], band), band_flat, max_before_nms,
            pairs_per_video,
            invalid_score, lambda redo: moment_scores(measure, gt_begin[redo], gt_end[redo], valid).flatten(1))
        out["SVMR"] = {"st": flat // length, "ed": flat % length, "score": values}

    if "VR" in tasks or "VCMR" in tasks:
        candidate_begin, candidate_end = begin_logits[:, 1:], end_logits[:, 1:]
        k = candidate_begin.shape[1]
        if measure == "disjoint":
            candidate_values = band_moment_scores(measure, begin_terms[:, 1:], end_terms[:, 1:], band)  # (B, k, P)
            per_candidate = candidate_values.max(axis=-1, initial=-np.inf)
            if len(band_flat) < pairs_per_video:
                per_candidate = np.maximum(per_candidate, np.float32(invalid_score))
            video_score, order = sort_descending(torch.from_numpy(per_candidate))
            layout = torch.arange(k).expand_as(order)
            weights = None
        else:
            order, video_score = rank_candidates(
                measure, video_scores=video_scores, first_stage_scores=first_stage_scores,
                use_internal_vr_scores=use_internal_vr_scores)
            layout, weights = order, video_score.float()
            ordered = (np.arange(order.shape[0])[:, None], 1 + _numpy(order))  # candidates in VR order
            candidate_values = band_moment_scores(measure, begin_terms[ordered], end_terms[ordered], band,
                                                  video_weights=_numpy(weights))
        if "VR" in tasks:
            out["VR"] = {"candidate": _numpy(order), "score": _numpy(video_score)}
        if "VCMR" in tasks:
            batch_size = candidate_values.shape[0]
            video_flat = (np.arange(k)[:, None] * pairs_per_video + band_flat[None, :]).reshape(-1)
            values, flat = select_top_n_band(
                candidate_values.reshape(batch_size, -1), video_flat, max_before_nms, k * pairs_per_video,
                invalid_score,
                lambda redo: moment_scores(
                    measure, candidate_begin[redo[:, None], layout[redo]], candidate_end[redo[:, None], layout[redo]],
                    valid, video_weights=None if weights is None else weights[redo]).flatten(1))
            out["VCMR"] = {"candidate": np.take_along_axis(_numpy(layout), flat // pairs_per_video, axis=1),
                           "st": flat % pairs_per_video // length, "ed": flat % length, "score": values}
    return out


def score_batch(measure, begin_logits, end_logits, *, tasks, max_before_nms, min_pred_l, max_pred_l,
                video_scores=None, first_stage_scores=None, use_internal_vr_scores=False, select=select_top_n):
    """Rank the predictions of one evaluation batch.

    Args:
        begin_logits, end_logits: (B, 1+k, L); index 0 = GT video, 1..k = candidates in ranklist order.
        tasks: subset of ("VCMR", "SVMR", "VR").
        video_scores: (B, 1+k) VS-head logits or None; first_stage_scores: (B, k).
        select: top-n function (`select_top_n`; the benchmark passes method/oracle.py's full sort).
    Returns:
        dict of numpy arrays, one entry per requested task; n = min(max_before_nms, pairs available):
        "SVMR": {"st", "ed": (B, n) int64 clip indices, "score": (B, n) float32} on video 0;
        "VR":   {"candidate": (B, k) int64 positions in the ranklist (0..k-1), "score": (B, k) float32};
        "VCMR": {"candidate", "st", "ed": (B, n) int64, "score": (B, n) float32}.
    """
    logits = [begin_logits, end_logits] + ([video_scores] if video_scores is not None else [])
    if torch.stack([torch.isnan(x).any() for x in logits]).any():
        raise ValueError("the model's logits contain NaN: cannot rank predictions")
    length = begin_logits.shape[-1]
    valid = valid_pair_mask_on(length, min_pred_l, max_pred_l, begin_logits.device)
    out = {}

    if "SVMR" in tasks:
        gt_scores = moment_scores(measure, begin_logits[:, 0], end_logits[:, 0], valid)  # (B, L, L)
        values, flat = select(gt_scores.flatten(start_dim=1), max_before_nms)
        out["SVMR"] = {"st": _numpy(flat // length), "ed": _numpy(flat % length), "score": _numpy(values)}

    if "VR" in tasks or "VCMR" in tasks:
        candidate_begin, candidate_end = begin_logits[:, 1:], end_logits[:, 1:]
        if measure == "disjoint":
            candidate_scores = moment_scores(measure, candidate_begin, candidate_end, valid)  # (B, k, L, L)
            order, video_score = rank_candidates(measure, candidate_moment_scores=candidate_scores)
            layout = torch.arange(order.shape[1], device=order.device).expand_as(order)  # ranklist order
        else:
            order, video_score = rank_candidates(
                measure, video_scores=video_scores, first_stage_scores=first_stage_scores,
                use_internal_vr_scores=use_internal_vr_scores)
            # As the original, the candidates are laid out in VR order before flattening (this only
            # matters for the order of exactly tied scores).
            rows = torch.arange(order.shape[0], device=order.device).unsqueeze(1)
            candidate_scores = moment_scores(measure, candidate_begin[rows, order], candidate_end[rows, order],
                                             valid, video_weights=video_score)
            layout = order
        if "VR" in tasks:
            out["VR"] = {"candidate": _numpy(order), "score": _numpy(video_score)}
        if "VCMR" in tasks:
            values, flat = select(candidate_scores.flatten(start_dim=1), max_before_nms)
            pairs_per_video = length * length
            out["VCMR"] = {"candidate": _numpy(layout.gather(1, flat // pairs_per_video)),
                           "st": _numpy(flat % pairs_per_video // length), "ed": _numpy(flat % length),
                           "score": _numpy(values)}
    return out


def rank_batch(measure, begin_logits, end_logits, *, tasks, max_before_nms, min_pred_l, max_pred_l,
               video_scores=None, first_stage_scores=None, use_internal_vr_scores=False):
    """Rank one evaluation batch: `score_batch_band` for logits on the CPU, `score_batch` on accelerators (same
    arguments, bitwise the same result; see `score_batch` for them and the output)."""
    rank = score_batch_band if begin_logits.device.type == "cpu" else score_batch
    return rank(measure, begin_logits, end_logits, tasks=tasks, max_before_nms=max_before_nms,
                min_pred_l=min_pred_l, max_pred_l=max_pred_l, video_scores=video_scores,
                first_stage_scores=first_stage_scores, use_internal_vr_scores=use_internal_vr_scores)


def rank_windowed_batch(measure, begin_logits, end_logits, slot_video, slot_start, slot_length, *, tasks,
                        max_before_nms, min_pred_l, max_pred_l, video_scores=None, first_stage_scores=None,
                        use_internal_vr_scores=False):
    """Rank one evaluation batch whose videos are read as windows (utils/windows.py), in video terms.

    Each query has N window slots (padded to the batch's largest count); a slot is one window of the GT video
    (video 0) or of candidate c (video c, 1..k in ranklist order). Moment scores are those of `rank_batch`,
    computed inside each window (its own softmax) on the pairs of real clips with a valid length, then mapped to
    clips of the whole video; a moment found in several overlapping windows is one moment with its best score
    (merged before ranking). A video's score is its best window's: the max of its windows' video-scoring logits
    before the softmax over the k candidates (exclusive), its first-stage score (general with
    use_internal_vr_scores) or its best moment (disjoint). Ties are broken as in `rank_batch`: candidates in VR
    order (disjoint: ranklist order), then start clip, then end clip.

    Args:
        begin_logits, end_logits: (B, N, L); video_scores: (B, N) VS-head logits per slot or None.
        slot_video: (B, N) int64 numpy, -1 for padding; slot_start: (B, N) first clip of each window in its video;
        slot_length: (B, N) real clips of each window.
        first_stage_scores: (B, k).
    Returns:
        as `score_batch`, with st / ed clip indices of the whole video, and for SVMR and VCMR "count" (B,): the
        rows of each query that hold moments (a short video may have fewer than max_before_nms valid pairs; the
        rest of the row is padding).
    """
    logits = [begin_logits, end_logits] + ([video_scores] if video_scores is not None else [])
    if any(bool(torch.isnan(x).any()) for x in logits):
        raise ValueError("the model's logits contain NaN: cannot rank predictions")
    batch_size, _, length = begin_logits.shape
    k = int(slot_video.max(initial=0))
    if first_stage_scores is not None:
        k = first_stage_scores.shape[1]
    begin_terms, end_terms = clip_terms(measure, torch.stack((begin_logits, end_logits)))
    band_st, band_ed = valid_pair_band(length, min_pred_l, max_pred_l)
    logit_values = None if video_scores is None else _numpy(video_scores.float())
    n_clips = int((slot_start + length).max(initial=length))  # key base: no video of the batch has more clips
    moments = {task: [] for task in ("SVMR", "VCMR") if task in tasks}
    video_ranking = []
    for i in range(batch_size):
        pairs = _window_pairs(slot_video[i], slot_start[i], slot_length[i], band_st, band_ed)
        if "SVMR" in tasks:
            moments["SVMR"].append(_merged_top_n(measure, begin_terms[i], end_terms[i], pairs, None, None, n_clips,
                                                 max_before_nms))
        if "VR" in tasks or "VCMR" in tasks:
            order, scores = _windowed_candidate_order(
                measure, begin_terms[i], end_terms[i], pairs, slot_video[i], k,
                None if logit_values is None else logit_values[i],
                None if first_stage_scores is None else first_stage_scores[i], use_internal_vr_scores)
            video_ranking.append((order, scores))
        if "VCMR" in tasks:
            # Candidates in VR order (disjoint: ranklist order) break ties, as in rank_batch.
            layout = np.arange(k) if measure == "disjoint" else np.argsort(order, kind="stable")
            weights = None if measure == "disjoint" else scores[layout]
            moments["VCMR"].append(_merged_top_n(measure, begin_terms[i], end_terms[i], pairs, layout, weights,
                                                 n_clips, max_before_nms))
    out = {}
    if "VR" in tasks:
        out["VR"] = {"candidate": np.stack([order for order, _ in video_ranking]),
                     "score": np.stack([scores for _, scores in video_ranking]).astype(np.float32)}
    for task, rows in moments.items():
        out[task] = _stack_moments(rows, max_before_nms, with_candidate=task == "VCMR")
    return out


def _window_pairs(slot_video, slot_start, slot_length, band_st, band_ed):
    """The scored pairs of one query's slots: {"slot", "video" (candidate 0..k), "st", "ed" (window clips),
    "video_st", "video_ed" (video clips)} as flat int64 arrays, real clips and valid lengths only."""
    real = slot_video >= 0
    slots = np.flatnonzero(real)
    within = band_ed[None, :] < slot_length[slots, None]  # (n_slots, P): pairs of real clips
    slot_of, pair = np.nonzero(within)
    slot = slots[slot_of]
    st, ed = band_st[pair], band_ed[pair]
    return dict(slot=slot, video=slot_video[slot], st=st, ed=ed, video_st=slot_start[slot] + st,
                video_ed=slot_start[slot] + ed)


def _pair_scores(measure, begin_terms, end_terms, pairs, keep, weights=None):
    """Moment scores (float32) of the pairs selected by `keep`, by the float32 operations of
    `band_moment_scores`."""
    slot, st, ed = pairs["slot"][keep], pairs["st"][keep], pairs["ed"][keep]
    if measure == "disjoint":
        return begin_terms[slot, st] + end_terms[slot, ed]
    begin = begin_terms[slot, st]
    if weights is not None:
        begin = begin * weights
    return begin * end_terms[slot, ed]


def _merged_top_n(measure, begin_terms, end_terms, pairs, layout, weights, n_clips, n):
    """The best n moments of one query after merging its windows, on the GT video (`layout` None: SVMR) or on
    the candidates (`layout` (k,): each candidate's position in the tie order; `weights` (k,) video scores or
    None) -> (candidate (m,) ranklist positions (0 for the GT video), video st, video ed, scores), m <= n, best
    first."""
    if layout is None:
        keep = np.flatnonzero(pairs["video"] == 0)
        candidate = np.zeros(len(keep), dtype=np.int64)
        scores = _pair_scores(measure, begin_terms, end_terms, pairs, keep)
        position = candidate
    else:
        keep = np.flatnonzero(pairs["video"] > 0)
        candidate = pairs["video"][keep] - 1
        scores = _pair_scores(measure, begin_terms, end_terms, pairs, keep,
                              None if weights is None else weights[candidate].astype(np.float32))
        position = layout[candidate]
    video_st, video_ed = pairs["video_st"][keep], pairs["video_ed"][keep]
    keys = (position * n_clips + video_st) * n_clips + video_ed
    best = _top_distinct_keys(keys, scores, n)
    return candidate[best], video_st[best], video_ed[best], scores[best]


def _top_distinct_keys(keys, scores, n, oversample=4):
    """Positions of the n best distinct keys, each at its best score, ordered by (descending score, ascending
    key).

    Sorting every pair of every window is the cost, so the entries above the (oversample * n)-th largest score
    t are merged first; that is exact when they hold n distinct keys (every key of the top n then has its best
    score above t, and every other key ranks below them), else all entries are merged.
    """
    candidates = np.arange(len(scores))
    if len(scores) > oversample * n > 0:
        threshold = np.partition(scores, len(scores) - oversample * n)[len(scores) - oversample * n]
        above = np.flatnonzero(scores > threshold)
        if len(np.unique(keys[above])) >= n:
            candidates = above
    keys, scores = keys[candidates], scores[candidates]
    by_key = np.lexsort((-scores, keys))  # each key's best score first
    first = np.ones(len(by_key), dtype=bool)
    first[1:] = keys[by_key][1:] != keys[by_key][:-1]
    merged = by_key[first]
    return candidates[merged[np.lexsort((keys[merged], -scores[merged]))[:n]]]


def _windowed_candidate_order(measure, begin_terms, end_terms, pairs, slot_video, k, logits, first_stage_scores,
                              use_internal_vr_scores):
    """VR of one query over video scores taken from its windows -> (order (k,) candidate positions best first,
    scores (k,) float32 in that order)."""
    if measure == "disjoint":
        keep = np.flatnonzero(pairs["video"] > 0)
        per_candidate = np.full(k, -np.inf, dtype=np.float32)
        np.maximum.at(per_candidate, pairs["video"][keep] - 1, _pair_scores(measure, begin_terms, end_terms, pairs,
                                                                           keep))
        values, order = sort_descending(torch.from_numpy(per_candidate)[None])
        return _numpy(order[0]), _numpy(values[0])
    if use_internal_vr_scores:
        return np.arange(k), _numpy(first_stage_scores.float())
    if logits is None:
        raise ValueError(f"similarity_measure {measure!r} without use_interal_vr_scores needs the video-scoring "
                         "head's scores, but the model returned none (only the exclusive model has that head)")
    best = np.full(k, -np.inf, dtype=np.float32)
    candidate_slots = np.flatnonzero(slot_video > 0)
    np.maximum.at(best, slot_video[candidate_slots] - 1, logits[candidate_slots])
    values, order = sort_descending(torch.softmax(torch.from_numpy(best), dim=0)[None])
    return _numpy(order[0]), _numpy(values[0])


def _stack_moments(query_rows, n, with_candidate):
    """Per-query (position, st, ed, scores) of up to n moments -> arrays (B, n) padded with zeros, "count" (B,)."""
    batch_size = len(query_rows)
    columns = {name: np.zeros((batch_size, n), dtype=np.int64) for name in ("candidate", "st", "ed")}
    columns["score"] = np.zeros((batch_size, n), dtype=np.float32)
    counts = np.zeros(batch_size, dtype=np.int64)
    for i, (position, st, ed, scores) in enumerate(query_rows):
        m = len(scores)
        counts[i] = m
        for name, values in zip(("candidate", "st", "ed", "score"), (position, st, ed, scores)):
            columns[name][i, :m] = values
    if not with_candidate:
        del columns["candidate"]
    return dict(columns, count=counts)


def concatenate_ranked(ranked_batches):
    """`rank_batch` outputs of consecutive batches -> one output over all their queries."""
    if not ranked_batches:
        return {}
    return {task: {name: np.concatenate([ranked[task][name] for ranked in ranked_batches])
                   for name in columns}
            for task, columns in ranked_batches[0].items()}


def moment_rows(video_idx, st, ed, scores, clip_length, seconds_dtype=np.float32):
    """Submission rows [video_idx, st_seconds, ed_seconds, score] for a batch of queries.

    ed is inclusive, so a moment spans [st * cl, (ed + 1) * cl). The original computes VCMR seconds in
    float32 as st * cl and ed * cl + cl, and SVMR seconds in float64 as st * cl and (ed + 1) * cl (its SVMR
    triples were stacked into a float64 array); `seconds_dtype` picks the recipe. Both agree for cl = 1.5.

    The columns fill one (B, n, 4) object array whose `tolist` builds all rows in C (2x faster than zipping
    Python lists, as method/oracle.py does); the garbage collector is paused meanwhile, since these millions of
    new acyclic lists would otherwise trigger repeated full collections.

    Args:
        video_idx, st, ed: (B, n) integer arrays; scores: (B, n) float32.
    Returns:
        list of B lists of n rows [int, float, float, float].
    """
    st_seconds, ed_seconds = moment_seconds(st, ed, clip_length, seconds_dtype)
    table = np.empty(np.shape(st) + (4,), dtype=object)
    table[..., 0] = np.asarray(video_idx)
    table[..., 1] = st_seconds
    table[..., 2] = ed_seconds
    table[..., 3] = np.asarray(scores, dtype=np.float32)
    with gc_paused():
        return table.tolist()


def moment_seconds(st, ed, clip_length, seconds_dtype):
    if np.dtype(seconds_dtype) == np.float32:
        clip = np.float32(clip_length)
        return st.astype(np.float32) * clip, ed.astype(np.float32) * clip + clip
    if np.dtype(seconds_dtype) == np.float64:
        return st.astype(np.float64) * clip_length, (ed.astype(np.float64) + 1) * clip_length
    raise ValueError(f"seconds_dtype must be float32 or float64, got {seconds_dtype!r}")


def video_rows(video_idx, scores):
    """VR submission rows [video_idx, 0, 0, score] for a batch of queries: (B, k) arrays -> B lists."""
    return [[[v, 0, 0, s] for v, s in zip(query_videos, query_scores)]
            for query_videos, query_scores in zip(np.asarray(video_idx).tolist(),
                                                  np.asarray(scores, dtype=np.float32).tolist())]


def _numpy(tensor):
    return tensor.detach().cpu().numpy()


def prediction_results(ranked_batches, metas, video2idx, clip_length, build_moment_rows=moment_rows):
    """`rank_batch` outputs of consecutive batches and the metas of their queries -> {task: [{"desc_id", "desc",
    "predictions"}, ...]} for the non-empty tasks in TASKS order, then "video2idx". The rows of all queries are
    built in one conversion (much cheaper than per batch: see `moment_rows`); `build_moment_rows` has its
    arguments (the benchmark passes method/oracle.py's row-by-row formulation)."""
    ranked = concatenate_ranked(ranked_batches)
    with gc_paused():  # millions of new acyclic lists: collections would find nothing to free
        rows = _prediction_rows(ranked, metas, video2idx, clip_length, build_moment_rows)
        results = {task: [dict(desc_id=meta["desc_id"], desc=meta["desc"], predictions=query_rows)
                          for meta, query_rows in zip(metas, rows[task])]
                   for task in TASKS if rows.get(task)}
    results["video2idx"] = video2idx
    return results


def _prediction_rows(ranked, metas, video2idx, clip_length, build_moment_rows):
    """`rank_batch` output of B queries -> {task: B lists of submission rows}."""
    rows = {}
    if "SVMR" in ranked:
        r = ranked["SVMR"]
        gt_video = np.array([[video2idx[meta["vid_name"]]] for meta in metas], dtype=np.int64)
        rows["SVMR"] = build_moment_rows(np.broadcast_to(gt_video, r["st"].shape), r["st"], r["ed"], r["score"],
                                         clip_length, seconds_dtype=np.float64)
    candidate_video = np.array([[video2idx[name] for name in meta["sample_vid_name_list"]] for meta in metas],
                               dtype=np.int64).reshape(len(metas), -1)
    if "VR" in ranked:
        r = ranked["VR"]
        rows["VR"] = video_rows(np.take_along_axis(candidate_video, r["candidate"], axis=1), r["score"])
    if "VCMR" in ranked:
        r = ranked["VCMR"]
        rows["VCMR"] = build_moment_rows(np.take_along_axis(candidate_video, r["candidate"], axis=1), r["st"],
                                         r["ed"], r["score"], clip_length, seconds_dtype=np.float32)
    for task in ("SVMR", "VCMR"):
        if task in ranked and "count" in ranked[task]:  # windowed ranking: rows past the count are padding
            rows[task] = [query_rows[:count] for query_rows, count in zip(rows[task], ranked[task]["count"].tolist())]
    return rows
