"""utils/temporal_nms.py: the batched NMS against the original's list algorithm (method/oracle.py), incl.
adversarial inputs."""
import copy

import numpy as np
import pytest

from method.oracle import (apply_nms_reference, nms_per_video_reference, temporal_iou, temporal_nms_reference)
from utils.temporal_nms import apply_nms, first_appearance_groups, nms_per_video_batch


def original_style_nms(predictions, nms_threshold, max_after_nms=100):
    """The greedy loop written the way the original's list-popping implementation works."""
    if len(predictions) == 1:
        return predictions
    predictions = sorted(predictions, key=lambda x: x[2], reverse=True)
    starts, ends, scores = [p[0] for p in predictions], [p[1] for p in predictions], [p[2] for p in predictions]
    kept = []
    while len(starts) > 1 and len(kept) < max_after_nms:
        idx = 1
        while idx < len(starts):
            if temporal_iou([starts[0], ends[0]], [starts[idx], ends[idx]]) > nms_threshold:
                starts.pop(idx), ends.pop(idx), scores.pop(idx)
            else:
                idx += 1
        kept.append([starts.pop(0), ends.pop(0), scores.pop(0)])
    if len(kept) < max_after_nms and starts:
        kept.append([starts.pop(0), ends.pop(0), scores.pop(0)])
    return kept


def random_moments(rng, n, n_scores=5, grid=1.5):
    """Moments on a clip grid (many exactly equal IoUs), scores from a few values (many ties)."""
    st = rng.integers(0, 12, size=n)
    length = rng.integers(0, 6, size=n)  # includes zero-length moments
    scores = rng.integers(0, n_scores, size=n) / n_scores
    return [[float(s * grid), float((s + l) * grid), float(c)] for s, l, c in zip(st, length, scores)]


def nms_per_video(predictions, nms_thd, max_after_nms=100):
    """Production NMS (`apply_nms`) of one query's [video_idx, st, ed, score] rows."""
    query = {"desc_id": 0, "desc": "", "predictions": predictions}
    return apply_nms([query], nms_thd, max_before_nms=len(predictions), max_after_nms=max_after_nms)[0]["predictions"]


def temporal_nms(moments, nms_thd, max_after_nms=100):
    """Production NMS of one video's [st, ed, score] moments."""
    return [row[1:] for row in nms_per_video([[0] + list(m) for m in moments], nms_thd, max_after_nms)]


def test_iou_hull_denominator_and_zero_denominator():
    assert temporal_iou([0, 3], [0, 6]) == 0.5
    assert temporal_iou([0, 1], [2, 3]) == 0  # disjoint: intersection clipped at 0
    assert temporal_iou([2, 2], [2, 2]) == 0  # zero hull
    assert temporal_nms([[2.0, 2.0, 0.9], [2.0, 2.0, 0.8]], 0.0) == [[2.0, 2.0, 0.9], [2.0, 2.0, 0.8]]


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("thd", [0.0, 0.5, 0.7, 1.0 / 3.0])
def test_nms_equals_greedy_on_random_moments(seed, thd):
    rng = np.random.default_rng(seed)
    moments = random_moments(rng, int(rng.integers(1, 60)))
    expected = original_style_nms(copy.deepcopy(moments), thd)
    assert temporal_nms(moments, thd) == expected
    assert temporal_nms_reference(moments, thd) == expected


def test_iou_exactly_at_threshold_is_kept():
    moments = [[0.0, 6.0, 0.9], [0.0, 3.0, 0.8]]  # IoU exactly 0.5
    assert temporal_nms(moments, 0.5) == moments
    assert temporal_nms(moments, 0.49) == [[0.0, 6.0, 0.9]]


def test_identical_scores_keep_input_order_and_nested_intervals():
    moments = [[0.0, 3.0, 0.5], [0.0, 9.0, 0.5], [1.5, 3.0, 0.5], [0.0, 3.0, 0.5], [6.0, 9.0, 0.5]]
    # [0,3] suppresses the identical [0,3] (IoU 1) and its nested half [1.5,3] (IoU 0.5 > 0.4), not [0,9]
    # (IoU 1/3), which then keeps [6,9] (IoU 1/3).
    expected = [[0.0, 3.0, 0.5], [0.0, 9.0, 0.5], [6.0, 9.0, 0.5]]
    assert temporal_nms(moments, 0.4) == expected == temporal_nms_reference(moments, 0.4)


def test_at_most_100_kept_per_video():
    moments = [[float(i), float(i) + 0.5, 1.0 - i / 1000] for i in range(150)]  # disjoint, nothing suppressed
    kept = temporal_nms(moments, 0.5)
    assert kept == moments[:100] == original_style_nms(moments, 0.5)
    assert len(temporal_nms(moments, 0.5, max_after_nms=20)) == 20


@pytest.mark.parametrize("seed", range(30))
def test_per_video_nms_equals_grouped_reference(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 120))
    videos = rng.integers(0, 4, size=n)
    predictions = [[int(v)] + m for v, m in zip(videos, random_moments(rng, n, n_scores=3))]
    for thd in (0.5, 0.7):
        expected = nms_per_video_reference(predictions, thd)
        assert nms_per_video(predictions, thd) == expected
        assert nms_per_video(predictions, thd, max_after_nms=7) == expected[:7]


def test_per_video_tie_order_follows_group_of_first_appearance():
    # Video 2 appears first, so after concatenating groups [2: X, Z], [1: Y] and a stable sort, Z precedes Y.
    x, y, z = [2, 0.0, 3.0, 0.9], [1, 0.0, 3.0, 0.5], [2, 6.0, 9.0, 0.5]
    assert nms_per_video([x, y, z], 0.7) == [x, z, y] == nms_per_video_reference([x, y, z], 0.7)


def test_per_video_nms_suppresses_only_within_a_video():
    predictions = [[5, 0.0, 3.0, 0.9], [6, 0.0, 3.0, 0.8], [5, 0.0, 3.0, 0.7]]
    assert nms_per_video(predictions, 0.5) == [[5, 0.0, 3.0, 0.9], [6, 0.0, 3.0, 0.8]]


def test_apply_nms_reads_first_rows_and_leaves_input_untouched():
    query = {"desc_id": 1, "desc": "d", "predictions": [[5, 0.0, 3.0, 0.9], [5, 0.0, 3.0, 0.8], [5, 6.0, 9.0, 0.7]]}
    before = copy.deepcopy(query)
    out = apply_nms([query], 0.5, max_before_nms=2)
    assert query == before
    assert out == [{"desc_id": 1, "desc": "d", "predictions": [[5, 0.0, 3.0, 0.9]]}]
    assert list(out[0]) == ["desc_id", "desc", "predictions"]


def random_query(rng, n_max=120, n_videos=4, n_scores=3):
    n = int(rng.integers(0, n_max))
    videos = rng.integers(0, n_videos, size=n)
    return [[int(v)] + m for v, m in zip(videos, random_moments(rng, n, n_scores=n_scores))]


@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_equals_per_query_reference(seed):
    """Many queries at once (ragged, empty, ties, identical intervals, IoU exactly at the threshold) vs the
    grouped list reference; small chunks so several chunks and paddings are exercised."""
    rng = np.random.default_rng(500 + seed)
    queries = [dict(desc_id=i, desc="d", predictions=random_query(rng)) for i in range(40)]
    queries.append(dict(desc_id=40, desc="d", predictions=[[3, 0.0, 3.0, 0.5]] * 5))  # identical rows
    queries.append(dict(desc_id=41, desc="d", predictions=[[3, 0.0, 3.0, 0.5], [3, 1.0, 3.0, 0.5]]))  # IoU 2/3
    for thd in (0.5, 2 / 3, 0.7):
        for max_before, max_after in ((200, 100), (50, 100), (200, 7)):
            expected = apply_nms_reference(queries, thd, max_before, max_after)
            for chunk_elements in (1, 1000, 2 ** 16):  # 1, about 8 and all queries per chunk
                assert apply_nms(queries, thd, max_before, max_after, chunk_elements=chunk_elements) == expected


def test_batched_nms_keeps_at_most_100_per_video_of_long_inputs():
    """nms_input_full: 150 non-overlapping rows of one video and 50 of another -> 100 + 50 kept, top 100 out."""
    one = [[7, float(i), float(i) + 0.5, 1.0 - i / 1000] for i in range(150)]
    other = [[8, float(i), float(i) + 0.5, 0.95 - i / 100] for i in range(50)]
    rng = np.random.default_rng(1)
    predictions = [row for i in rng.permutation(200) for row in [(one + other)[i]]]
    for max_after in (100, 200):
        expected = nms_per_video_reference(predictions, 0.5, max_after_nms=max_after)
        rows = nms_per_video_batch([predictions, predictions[:3]], 0.5, max_after_nms=max_after)
        assert [predictions[i] for i in rows[0]] == expected
        assert [predictions[i] for i in rows[1]] == nms_per_video_reference(predictions[:3], 0.5)
    assert len(expected) == 150 and sum(row[0] == 7 for row in expected) == 100


@pytest.mark.parametrize("seed", range(3))
def test_first_appearance_groups_equal_a_plain_scan(seed):
    rng = np.random.default_rng(900 + seed)
    n_rows = rng.integers(0, 30, size=25)
    video = rng.integers(0, 5, size=(25, 30)).astype(np.float64)
    present = np.arange(30)[None, :] < n_rows[:, None]
    groups = first_appearance_groups(video, present)
    for q in range(25):
        first = {}
        for j in range(n_rows[q]):
            first.setdefault(video[q, j], j)
            assert groups[q, j] == first[video[q, j]]
        padding_groups = groups[q, n_rows[q]:]
        assert not np.isin(padding_groups, groups[q, :n_rows[q]]).any()
