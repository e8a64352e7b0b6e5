"""Windows: how a video longer than the model's `max_ctx_len` clips is read.

A video of n clips is read as windows of L = max_ctx_len clips that start every `stride` clips (`--window_stride`);
the last window ends at the video's last clip. A video of n <= L clips is one window starting at clip 0, exactly
as without windows, and stride 0 keeps the original's truncation: one window, the first L clips. Every stage names
a window by (video name, start clip); its clips are rows [start, start + L) of the stored video, read as a slice
of the video's features, never stored separately.

Clip indices inside a window are relative to its start; `to_video_clips` maps them back to the video. Moments
are (st, ed) clip pairs with ed inclusive, as the labels of utils/tvr_format.py.
"""
import random
from typing import NamedTuple


class WindowError(ValueError):
    """A window layout that cannot be built (bad stride or length)."""


class Window(NamedTuple):
    video_name: str
    start: int  # first clip of the window in the video


def check_stride(stride, max_ctx_len, flag="--window_stride"):
    """Raise WindowError unless stride is 0 (truncate) or in [1, max_ctx_len]."""
    if isinstance(stride, bool) or not isinstance(stride, int) or not (stride == 0 or 1 <= stride <= max_ctx_len):
        raise WindowError(f"{flag} {stride!r}: expected 0 (read only the first --max_ctx_len clips, as the original) "
                          f"or a clip count in [1, --max_ctx_len {max_ctx_len}]")


def window_starts(n_clips, max_ctx_len, stride):
    """Start clips of the windows of a video of n_clips: [0] when it fits (or stride 0), else 0, stride, 2 stride,
    ... and a last window ending at the last clip."""
    check_stride(stride, max_ctx_len)
    if stride == 0 or n_clips <= max_ctx_len:
        return [0]
    last = n_clips - max_ctx_len
    return list(range(0, last, stride)) + [last]


def video_windows(video_name, n_clips, max_ctx_len, stride):
    """The `Window`s of one video, in start order."""
    return [Window(video_name, start) for start in window_starts(n_clips, max_ctx_len, stride)]


def window_clip_count(n_clips, start, max_ctx_len):
    """Clips of the video inside the window that starts at `start`."""
    return max(0, min(max_ctx_len, n_clips - start))


def overlaps_moment(start, max_ctx_len, st, ed):
    """Whether the window [start, start + L) shares a clip with the moment [st, ed]."""
    return start <= ed and st < start + max_ctx_len


def containing_starts(starts, max_ctx_len, st, ed):
    """The starts of the windows that hold the whole moment [st, ed]."""
    return [start for start in starts if start <= st and ed < start + max_ctx_len]


def most_covering_start(starts, max_ctx_len, st, ed):
    """The start of the window that holds most clips of [st, ed]; the earliest on ties."""
    coverage = [min(ed, start + max_ctx_len - 1) - max(st, start) + 1 for start in starts]
    return starts[coverage.index(max(coverage))]


def gt_window(starts, max_ctx_len, st, ed, choose):
    """The training window of a GT moment [st, ed] (video clips) -> (start, (st, ed) in window clips, cut).

    A window holding the whole moment, picked by `choose` (e.g. random.choice) among all such windows: evaluation
    meets the moment at every offset of a window, so training shows it at every offset too (always taking the
    first such window would always show it near the window's end). A moment longer than any window is cut to the
    window covering most of it (`cut` True), its label clipped to that window.
    """
    containing = containing_starts(starts, max_ctx_len, st, ed)
    if containing:
        start = choose_one(containing, choose)
        return start, (st - start, ed - start), False
    start = most_covering_start(starts, max_ctx_len, st, ed)
    return start, (max(st - start, 0), min(ed - start, max_ctx_len - 1)), True


def choose_one(options, choose=random.choice):
    """One of `options` by `choose`; a single option is taken without calling it, so that a corpus whose videos
    fit one window draws the same random numbers with windows as without."""
    return options[0] if len(options) == 1 else choose(options)


def to_video_clips(start, st, ed):
    """Window clip indices (st, ed) of the window at `start` -> video clip indices."""
    return start + st, start + ed
