"""method/scoring.py: fast paths against plain loop / full-sort formulations, incl. exact ties."""
import numpy as np
import pytest
import torch

from method.oracle import moment_rows_reference, select_top_n_reference
from method.scoring import (DISJOINT_INVALID_SCORE, moment_rows, moment_scores, rank_batch, rank_candidates, score_batch,
                            score_batch_band, select_top_n, select_top_n_partial, valid_pair_mask, valid_pair_mask_on,
                            video_rows)

MASKED_LOGIT = -1e4


# ---------------------------------------------------------------------------------------------------
# Plain formulations

def plain_top_n(values, n):
    """Full Python sort by (descending score, ascending index)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:n]
    return [values[i] for i in order], order


def plain_pair_scores(measure, begin, end, valid, weight=None):
    """One video: loops over (st, ed) with float32 scalar arithmetic, same operation order as documented."""
    length = len(begin)
    if measure != "disjoint":
        p_b = torch.softmax(torch.tensor(begin), dim=0).numpy()
        p_e = torch.softmax(torch.tensor(end), dim=0).numpy()
    scores = np.zeros((length, length), dtype=np.float32)
    for st in range(length):
        for ed in range(length):
            if measure == "disjoint":
                scores[st, ed] = (np.float32(begin[st]) + np.float32(end[ed]) if valid[st, ed]
                                  else np.float32(DISJOINT_INVALID_SCORE))
            elif valid[st, ed]:
                first = p_b[st] if weight is None else np.float32(p_b[st] * np.float32(weight))
                scores[st, ed] = np.float32(first * p_e[ed])
    return scores


def plain_score_batch(measure, begin, end, video_scores, first_stage, use_internal, tasks, n, min_l, max_l):
    """Per query loops: candidate ranking and moment selection with full Python sorts."""
    b, n_videos, length = begin.shape
    k = n_videos - 1
    valid = np.array([[min_l <= ed - st < max_l for ed in range(length)] for st in range(length)])
    out = {task: {} for task in tasks}
    rows = {task: [] for task in tasks}
    for q in range(b):
        if "SVMR" in tasks:
            s = plain_pair_scores(measure, begin[q, 0], end[q, 0], valid).ravel().tolist()
            values, flat = plain_top_n(s, n)
            rows["SVMR"].append((np.array(flat) // length, np.array(flat) % length, np.float32(values)))
        if "VR" not in tasks and "VCMR" not in tasks:
            continue
        if measure == "disjoint":
            per_video = [plain_pair_scores(measure, begin[q, 1 + j], end[q, 1 + j], valid) for j in range(k)]
            vr_scores, order = plain_top_n([float(s.max()) for s in per_video], k)
            layout = list(range(k))
        else:
            if use_internal:
                order, vr_scores = list(range(k)), [float(x) for x in first_stage[q]]
            else:
                probs = torch.softmax(torch.tensor(video_scores[q, 1:]), dim=0).tolist()
                vr_scores, order = plain_top_n(probs, k)
            layout = order
            per_video = [plain_pair_scores(measure, begin[q, 1 + j], end[q, 1 + j], valid, weight=w)
                         for j, w in zip(order, vr_scores)]
        if "VR" in tasks:
            rows["VR"].append((np.array(order), np.float32(vr_scores)))
        if "VCMR" in tasks:
            flat_scores = np.concatenate([s.ravel() for s in per_video]).tolist()
            values, flat = plain_top_n(flat_scores, n)
            flat = np.array(flat)
            rows["VCMR"].append((np.array(layout)[flat // (length * length)], flat % (length * length) // length,
                                 flat % length, np.float32(values)))
    names = {"SVMR": ("st", "ed", "score"), "VR": ("candidate", "score"), "VCMR": ("candidate", "st", "ed", "score")}
    for task in tasks:
        for i, name in enumerate(names[task]):
            out[task][name] = np.stack([r[i] for r in rows[task]])
    return out


def random_logits(rng, b, n_videos, length, short=False, quantize=False):
    """Begin/end logits with padded clips at -1e4; `short`: 1-3 real clips; `quantize`: few distinct values."""
    logits = []
    for _ in range(2):
        x = rng.normal(size=(b, n_videos, length)).astype(np.float32)
        if quantize:
            x = np.round(x).astype(np.float32)
        n_real = rng.integers(1, 4 if short else length + 1, size=(b, n_videos))
        x[np.arange(length)[None, None, :] >= n_real[..., None]] = MASKED_LOGIT
        logits.append(x)
    return logits


# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length,min_l,max_l", [(100, 0, 24), (7, 0, 3), (7, 2, 5), (5, 0, 10), (6, 3, 3)])
def test_valid_pair_mask_matches_triangular_formulation(length, min_l, max_l):
    ones = np.ones((length, length), dtype=np.float32)
    expected = (np.triu(ones, k=min_l) * (1 - np.triu(ones, k=max_l))).astype(bool)
    mask = valid_pair_mask(length, min_l, max_l)
    np.testing.assert_array_equal(mask, expected)
    assert valid_pair_mask(length, min_l, max_l) is mask  # cached
    assert not mask.flags.writeable
    assert torch.equal(valid_pair_mask_on(length, min_l, max_l, torch.device("cpu")), torch.from_numpy(expected))


def test_default_mask_has_2124_pairs():
    assert valid_pair_mask(100, 0, 24).sum() == 2124


@pytest.mark.parametrize("seed", range(6))
def test_select_top_n_equals_full_sort_with_ties(seed):
    rng = np.random.default_rng(seed)
    b, f = 4, int(rng.integers(1, 400))
    values = rng.integers(-3, 4, size=(b, f)).astype(np.float32)  # many exact ties
    values[0] = 0.0  # a row of identical scores
    if f > 3:
        values[1, :3] = -np.inf
    scores = torch.from_numpy(values)
    for n in (1, 5, f // 2 + 1, f, f + 7):
        fast_values, fast_idx = select_top_n_partial(scores, n)
        ref_values, ref_idx = select_top_n_reference(scores, n)
        assert torch.equal(fast_idx, ref_idx) and torch.equal(fast_values, ref_values)
        assert all(torch.equal(a, b) for a, b in zip(select_top_n(scores, n), (fast_values, fast_idx)))
        for row in range(b):
            plain_values, plain_idx = plain_top_n(values[row].tolist(), n)
            assert fast_idx[row].tolist() == plain_idx
            assert fast_values[row].tolist() == plain_values


def test_score_batch_rejects_nan_logits():
    begin = torch.zeros(1, 3, 4)
    begin[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="logits contain NaN"):
        score_batch("disjoint", begin, torch.zeros(1, 3, 4), tasks=("VCMR",), max_before_nms=5, min_pred_l=0,
                    max_pred_l=3)


@pytest.mark.parametrize("measure", ["general", "exclusive", "disjoint"])
@pytest.mark.parametrize("short", [False, True])
def test_moment_scores_equal_loops(measure, short):
    rng = np.random.default_rng(1)
    begin, end = random_logits(rng, 2, 3, 9, short=short)
    valid = valid_pair_mask(9, 0, 4)
    weights = rng.random((2, 3)).astype(np.float32) if measure != "disjoint" else None
    fast = moment_scores(measure, torch.from_numpy(begin), torch.from_numpy(end), torch.from_numpy(valid.copy()),
                         None if weights is None else torch.from_numpy(weights)).numpy()
    for q in range(2):
        for v in range(3):
            w = None if weights is None else weights[q, v]
            np.testing.assert_array_equal(fast[q, v], plain_pair_scores(measure, begin[q, v], end[q, v], valid, w))


CASES = [  # measure, use_internal, short videos, quantized logits
    ("general", True, False, False),
    ("general", True, True, False),
    ("exclusive", False, False, False),
    ("exclusive", False, True, True),
    ("exclusive", True, False, True),
    ("disjoint", False, False, True),
    ("disjoint", True, True, False),
]


@pytest.mark.parametrize("measure,use_internal,short,quantize", CASES)
def test_score_batch_equals_plain_loops(measure, use_internal, short, quantize):
    rng = np.random.default_rng(7)
    b, k, length, n = 3, 4, 8, 40
    begin, end = random_logits(rng, b, 1 + k, length, short=short, quantize=quantize)
    video_scores = np.round(rng.normal(size=(b, 1 + k))).astype(np.float32)  # ties between candidates
    first_stage = np.round(rng.random((b, k)), 1).astype(np.float32)
    tasks = ("VCMR", "SVMR", "VR")
    kwargs = dict(tasks=tasks, max_before_nms=n, min_pred_l=0, max_pred_l=5,
                  video_scores=torch.from_numpy(video_scores) if measure == "exclusive" else None,
                  first_stage_scores=torch.from_numpy(first_stage), use_internal_vr_scores=use_internal)
    fast = score_batch(measure, torch.from_numpy(begin), torch.from_numpy(end), **kwargs)
    full_sort = score_batch(measure, torch.from_numpy(begin), torch.from_numpy(end), select=select_top_n_reference,
                            **kwargs)
    plain = plain_score_batch(measure, begin, end, video_scores, first_stage, use_internal, tasks, n, 0, 5)
    for task in tasks:
        for name, value in plain[task].items():
            np.testing.assert_array_equal(fast[task][name], value, err_msg=f"{task} {name}")
            np.testing.assert_array_equal(full_sort[task][name], value, err_msg=f"{task} {name}")
    if short:  # many pairs score exactly 0 (or the disjoint masked sum): ties reached the top-n
        assert (fast["SVMR"]["score"] == fast["SVMR"]["score"][:, -1:]).sum() > b


BAND_CASES = [(measure, use_internal, short, quantize, lengths)
              for measure, use_internal, short, quantize in CASES
              for lengths in [(8, 0, 5), (12, 2, 6), (5, 0, 24), (6, 7, 9)]]


@pytest.mark.parametrize("measure,use_internal,short,quantize,lengths", BAND_CASES)
def test_score_batch_band_equals_full_sort(measure, use_internal, short, quantize, lengths):
    """Band scoring + partial selection == full scores + full stable sort, bitwise; short videos and quantized
    logits make many valid pairs tie with the invalid pairs' score, so the top-n mixes both."""
    length, min_l, max_l = lengths
    rng = np.random.default_rng(11)
    b, k = 6, 4
    begin, end = random_logits(rng, b, 1 + k, length, short=short, quantize=quantize)
    video_scores = np.round(rng.normal(size=(b, 1 + k))).astype(np.float32)
    first_stage = np.round(rng.normal(size=(b, k)), 1).astype(np.float32)  # negative weights too
    for n in (1, 7, 40, 10_000):
        kwargs = dict(tasks=("VCMR", "SVMR", "VR"), max_before_nms=n, min_pred_l=min_l, max_pred_l=max_l,
                      video_scores=torch.from_numpy(video_scores) if measure == "exclusive" else None,
                      first_stage_scores=torch.from_numpy(first_stage), use_internal_vr_scores=use_internal)
        band = score_batch_band(measure, torch.from_numpy(begin), torch.from_numpy(end), **kwargs)
        assert _same_ranked(rank_batch(measure, torch.from_numpy(begin), torch.from_numpy(end), **kwargs), band)
        full_sort = score_batch(measure, torch.from_numpy(begin), torch.from_numpy(end),
                                select=select_top_n_reference, **kwargs)
        for task, columns in full_sort.items():
            for name, value in columns.items():
                assert band[task][name].dtype == value.dtype, (task, name)
                np.testing.assert_array_equal(band[task][name], value, err_msg=f"{task} {name} n={n}")


def _same_ranked(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[t][c], b[t][c]) for t in a for c in a[t])


def test_score_batch_band_at_benchmark_scale():
    rng = np.random.default_rng(5)
    begin, end = (torch.from_numpy(x) for x in random_logits(rng, 5, 11, 100))
    kwargs = dict(tasks=("VCMR", "SVMR", "VR"), max_before_nms=200, min_pred_l=0, max_pred_l=24,
                  first_stage_scores=torch.rand(5, 10), use_internal_vr_scores=True)
    band = score_batch_band("general", begin, end, **kwargs)
    full_sort = score_batch("general", begin, end, select=select_top_n_reference, **kwargs)
    for task, columns in full_sort.items():
        for name, value in columns.items():
            np.testing.assert_array_equal(band[task][name], value, err_msg=f"{task} {name}")


def test_score_batch_task_subsets_and_fewer_pairs_than_n():
    rng = np.random.default_rng(3)
    begin, end = (torch.from_numpy(x) for x in random_logits(rng, 2, 3, 4))
    first_stage = torch.rand(2, 2)
    common = dict(max_before_nms=200, min_pred_l=0, max_pred_l=24, first_stage_scores=first_stage,
                  use_internal_vr_scores=True)
    only_vcmr = score_batch("general", begin, end, tasks=("VCMR",), **common)
    everything = score_batch("general", begin, end, tasks=("VCMR", "SVMR", "VR"), **common)
    assert set(only_vcmr) == {"VCMR"}
    assert only_vcmr["VCMR"]["score"].shape == (2, 2 * 16)  # only k*L*L = 32 entries exist
    for name in ("candidate", "st", "ed", "score"):
        np.testing.assert_array_equal(only_vcmr["VCMR"][name], everything["VCMR"][name])
    assert everything["SVMR"]["st"].shape == (2, 16)
    np.testing.assert_array_equal(everything["VR"]["candidate"], [[0, 1], [0, 1]])


def test_internal_vr_scores_keep_ranklist_order():
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    order, vr = rank_candidates("general", first_stage_scores=scores, use_internal_vr_scores=True)
    assert order.tolist() == [[0, 1, 2]] and torch.equal(vr, scores)


def test_general_without_video_scores_is_an_error():
    with pytest.raises(ValueError, match="use_interal_vr_scores"):
        rank_candidates("general", video_scores=None, first_stage_scores=torch.rand(1, 3))


def test_moment_rows_float32_and_float64_recipes():
    video_idx = np.array([[7, 8]])
    st, ed = np.array([[2, 3]]), np.array([[5, 3]])
    scores = np.array([[0.5, 0.25]], dtype=np.float32)
    rows = moment_rows(video_idx, st, ed, scores, 1.5)
    assert rows == [[[7, 3.0, 9.0, 0.5], [8, 4.5, 6.0, 0.25]]]  # ts [3.2, 7.6] -> (2, 5) -> [3.0, 9.0] s
    assert all(type(r[0]) is int and all(type(x) is float for x in r[1:]) for r in rows[0])
    # cl = 0.1 is not exact: float32 st*cl and ed*cl+cl differ from float64 st*cl and (ed+1)*cl.
    cl = 0.1
    r32 = moment_rows(video_idx, st, ed, scores, cl)[0][0]
    r64 = moment_rows(video_idx, st, ed, scores, cl, seconds_dtype=np.float64)[0][0]
    assert r32[1:3] == [float(np.float32(2) * np.float32(cl)), float(np.float32(5) * np.float32(cl) + np.float32(cl))]
    assert r64[1:3] == [2 * cl, 6 * cl]
    assert r32[1:3] != r64[1:3]


@pytest.mark.parametrize("shape", [(3, 7), (2, 0), (0, 5)])
@pytest.mark.parametrize("seconds_dtype", [np.float32, np.float64])
def test_moment_rows_equal_plain_zip_with_types(shape, seconds_dtype):
    rng = np.random.default_rng(2)
    video_idx, st = rng.integers(0, 3000, shape), rng.integers(0, 100, shape)
    ed = st + rng.integers(0, 24, shape)
    scores = rng.random(shape).astype(np.float32)
    for cl in (1.5, 0.1):
        fast = moment_rows(video_idx, st, ed, scores, cl, seconds_dtype=seconds_dtype)
        plain = moment_rows_reference(video_idx, st, ed, scores, cl, seconds_dtype=seconds_dtype)
        assert fast == plain and len(fast) == shape[0]
        assert [[list(map(type, r)) for r in q] for q in fast] == [[list(map(type, r)) for r in q] for q in plain]


def test_video_rows_use_integer_zero_times():
    rows = video_rows(np.array([[3, 1]]), np.array([[0.75, 0.5]], dtype=np.float32))
    assert rows == [[[3, 0, 0, 0.75], [1, 0, 0, 0.5]]]
    assert type(rows[0][0][1]) is int


# ---------------------------------------------------------------------------------------------------
# Windowed ranking

def random_windowed_batch(rng, batch_size=3, k=3, length=6, stride=3, max_windows=4, quantize=False):
    """Logits of window slots of the GT video (0) and k candidates, each video with 1..max_windows windows of
    `length` clips every `stride` clips (a last window shorter when the video ends inside it is impossible by
    construction: short videos are a single window with fewer real clips)."""
    slots = []
    for _ in range(batch_size):
        query = []
        for video in range(k + 1):
            n_windows = int(rng.integers(1, max_windows + 1))
            if n_windows == 1:
                query.append((video, 0, int(rng.integers(1, length + 1))))
            else:
                n_clips = length + stride * (n_windows - 2) + int(rng.integers(1, stride + 1))
                starts = list(range(0, n_clips - length, stride)) + [n_clips - length]
                query += [(video, start, length) for start in starts]
        slots.append(query)
    n = max(len(q) for q in slots)
    slot_video = np.full((batch_size, n), -1, dtype=np.int64)
    slot_start = np.zeros((batch_size, n), dtype=np.int64)
    slot_length = np.zeros((batch_size, n), dtype=np.int64)
    for i, query in enumerate(slots):
        for j, (video, start, real) in enumerate(query):
            slot_video[i, j], slot_start[i, j], slot_length[i, j] = video, start, real
    logits = rng.normal(size=(2, batch_size, n, length)).astype(np.float32)
    if quantize:
        logits = np.round(logits)
    logits[:, np.arange(length)[None, None, :] >= slot_length[:, :, None]] = MASKED_LOGIT
    video_scores = np.round(rng.normal(size=(batch_size, n)), 1).astype(np.float32)
    first_stage = np.round(rng.random((batch_size, k)), 1).astype(np.float32)
    return (torch.from_numpy(logits[0]), torch.from_numpy(logits[1]), slot_video, slot_start, slot_length,
            torch.from_numpy(video_scores), torch.from_numpy(first_stage))


WINDOWED_CASES = [("general", True, False), ("general", True, True), ("exclusive", False, False),
                  ("exclusive", False, True), ("exclusive", True, False), ("disjoint", False, False),
                  ("disjoint", False, True)]


@pytest.mark.parametrize("measure,use_internal,quantize", WINDOWED_CASES)
def test_rank_windowed_batch_equals_plain_loops(measure, use_internal, quantize):
    from method.oracle import rank_windowed_reference
    from method.scoring import rank_windowed_batch
    rng = np.random.default_rng(3)
    begin, end, slot_video, slot_start, slot_length, video_scores, first_stage = random_windowed_batch(
        rng, quantize=quantize)
    kwargs = dict(tasks=("VCMR", "SVMR", "VR"), max_before_nms=30, min_pred_l=0, max_pred_l=4,
                  video_scores=video_scores if measure == "exclusive" else None, first_stage_scores=first_stage,
                  use_internal_vr_scores=use_internal)
    fast = rank_windowed_batch(measure, begin, end, slot_video, slot_start, slot_length, **kwargs)
    plain = rank_windowed_reference(measure, begin, end, slot_video, slot_start, slot_length, **kwargs)
    merged_somewhere = False
    for i, expected in enumerate(plain):
        assert [(c, s) for c, s in zip(fast["VR"]["candidate"][i], fast["VR"]["score"][i])] == expected["VR"]
        count = fast["SVMR"]["count"][i]
        svmr = list(zip(fast["SVMR"]["st"][i, :count], fast["SVMR"]["ed"][i, :count], fast["SVMR"]["score"][i, :count]))
        assert svmr == expected["SVMR"]
        count = fast["VCMR"]["count"][i]
        vcmr = list(zip(fast["VCMR"]["candidate"][i, :count], fast["VCMR"]["st"][i, :count],
                        fast["VCMR"]["ed"][i, :count], fast["VCMR"]["score"][i, :count]))
        assert vcmr == expected["VCMR"]
        assert len(set((c, st, ed) for c, st, ed, _ in vcmr)) == len(vcmr)  # one row per moment
        merged_somewhere |= any(slot_start[i] > 0)
    assert merged_somewhere


@pytest.mark.parametrize("measure,use_internal,quantize", WINDOWED_CASES)
def test_rank_windowed_batch_on_single_windows_equals_rank_batch(measure, use_internal, quantize):
    """Videos that fit a window: the same moments, scores and order as rank_batch (full-length videos, where
    every pair rank_batch returns is a valid pair of real clips)."""
    from method.scoring import rank_windowed_batch
    rng = np.random.default_rng(5)
    b, k, length = 3, 4, 8
    begin, end = rng.normal(size=(2, b, 1 + k, length)).astype(np.float32)
    if quantize:
        begin, end = np.round(begin), np.round(end)
    video_scores = torch.from_numpy(np.round(rng.normal(size=(b, 1 + k))).astype(np.float32))
    first_stage = torch.from_numpy(np.round(rng.random((b, k)) + 0.1, 1).astype(np.float32))
    kwargs = dict(tasks=("VCMR", "SVMR", "VR"), max_before_nms=25, min_pred_l=0, max_pred_l=5,
                  video_scores=video_scores if measure == "exclusive" else None, first_stage_scores=first_stage,
                  use_internal_vr_scores=use_internal)
    expected = rank_batch(measure, torch.from_numpy(begin), torch.from_numpy(end), **kwargs)
    slot_video = np.tile(np.arange(1 + k), (b, 1))
    windowed = rank_windowed_batch(measure, torch.from_numpy(begin), torch.from_numpy(end), slot_video,
                                   np.zeros_like(slot_video), np.full_like(slot_video, length), **kwargs)
    for task, columns in expected.items():
        for name, value in columns.items():
            np.testing.assert_array_equal(windowed[task][name], value, err_msg=f"{task} {name}")
    assert (windowed["VCMR"]["count"] == 25).all()


def test_windowed_rows_are_cut_at_the_count():
    from method.scoring import prediction_results
    ranked = {"SVMR": {"st": np.array([[1, 0], [2, 3]]), "ed": np.array([[1, 0], [4, 5]]),
                       "score": np.array([[0.5, 0], [0.4, 0.3]], dtype=np.float32), "count": np.array([1, 2])}}
    metas = [dict(desc_id=i, desc="", vid_name="a", sample_vid_name_list=[]) for i in range(2)]
    results = prediction_results([ranked], metas, {"a": 7}, 1.5)
    assert [len(q["predictions"]) for q in results["SVMR"]] == [1, 2]
    assert results["SVMR"][1]["predictions"][1] == [7, 4.5, 9.0, np.float32(0.3)]


@pytest.mark.parametrize("n_keys,n,hot", [(50, 10, False), (400, 30, True), (12, 10, True), (3000, 100, False)])
def test_top_distinct_keys_equals_a_full_merge(n_keys, n, hot):
    """The pre-selection of the best entries gives the full merge's result, also when the entries above the
    threshold repeat few keys (fallback) and with tied scores."""
    from method.scoring import _top_distinct_keys
    rng = np.random.default_rng(n_keys)
    keys = rng.integers(0, n_keys, size=4000)
    scores = np.round(rng.random(4000), 2).astype(np.float32)
    if hot:  # the best entries all repeat one key: the pre-selection holds too few keys
        keys[:200], scores[:200] = 7, 2.0
    best = {}
    for key, score in zip(keys.tolist(), scores.tolist()):
        best[key] = max(best.get(key, -1.0), score)
    expected = sorted(best, key=lambda key: (-best[key], key))[:n]
    found = _top_distinct_keys(keys, scores, n)
    assert keys[found].tolist() == expected
    assert scores[found].tolist() == [best[key] for key in expected]
