"""utils/windows.py: window layout, GT-window choice and negatives against plain definitions."""
import random

import pytest

from utils.windows import (WindowError, check_stride, containing_starts, gt_window, overlaps_moment, to_video_clips,
                           video_windows, window_clip_count, window_starts)


def plain_starts(n_clips, length, stride):
    """Definition: starts 0, stride, ... below the last full window's start, then the last full window."""
    if stride == 0 or n_clips <= length:
        return [0]
    starts, start = [], 0
    while start + length < n_clips:
        starts.append(start)
        start += stride
    if starts[-1] != n_clips - length:
        starts.append(n_clips - length)
    return starts


@pytest.mark.parametrize("n_clips", [1, 5, 20, 21, 29, 30, 31, 40, 41, 97, 2400])
@pytest.mark.parametrize("stride", [0, 1, 7, 10, 20])
def test_window_starts_cover_every_clip_and_end_at_the_last(n_clips, stride):
    length = 20
    starts = window_starts(n_clips, length, stride)
    assert starts == plain_starts(n_clips, length, stride)
    if stride == 0:
        assert starts == [0]
        return
    covered = set()
    for start in starts:
        covered.update(range(start, start + window_clip_count(n_clips, start, length)))
    assert covered == set(range(n_clips))
    assert starts == sorted(set(starts))
    assert max(starts) + min(length, n_clips) == n_clips  # the last window ends at the last clip
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_a_video_that_fits_is_one_window_at_zero():
    assert video_windows("v", 100, 100, 50) == [("v", 0)]
    assert window_starts(101, 100, 50) == [0, 1]
    assert window_starts(250, 100, 50) == [0, 50, 100, 150]


@pytest.mark.parametrize("stride", [-1, 21, 1.5, True])
def test_bad_stride_is_one_line_naming_the_flag(stride):
    with pytest.raises(WindowError, match="--window_stride"):
        check_stride(stride, 20)


def test_gt_window_contains_the_moment_and_varies_its_offset():
    starts = window_starts(300, 100, 25)
    seen = set()
    rng = random.Random(0)
    for _ in range(200):
        start, (st, ed), cut = gt_window(starts, 100, 120, 130, rng.choice)
        assert not cut and start <= 120 and 130 < start + 100
        assert to_video_clips(start, st, ed) == (120, 130)
        seen.add(start)
    assert seen == set(containing_starts(starts, 100, 120, 130)) and len(seen) > 1


def test_a_moment_longer_than_a_window_is_cut_to_the_most_covering_window():
    starts = window_starts(300, 20, 10)
    start, (st, ed), cut = gt_window(starts, 20, 35, 70, random.choice)
    coverage = {s: len(set(range(s, s + 20)) & set(range(35, 71))) for s in starts}
    assert cut and coverage[start] == max(coverage.values()) and start == min(
        s for s in starts if coverage[s] == max(coverage.values()))
    assert (st, ed) == (max(35 - start, 0), min(70 - start, 19))


def test_overlap_is_sharing_a_clip():
    assert overlaps_moment(0, 20, 19, 25) and not overlaps_moment(0, 20, 20, 25)
    assert overlaps_moment(30, 20, 10, 30) and not overlaps_moment(31, 20, 10, 30)
