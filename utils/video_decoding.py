"""Streaming video decoding on a clip grid, with PyAV.

A video of duration T seconds has `n_clips = ceil(T / clip_length)` clips; clip i covers
[i * clip_length, min((i + 1) * clip_length, T)), the last one possibly shorter. Each clip is represented by
`frames_per_clip` frames, sampled at the centres of equal parts of the clip: the frame shown on screen at
time t is the last frame whose presentation time is <= t (the first frame stands in before it starts, the
last one stays on screen to the end). Times come from each frame's pts and time base, never from frame
counts, so variable-frame-rate files land on the same grid as constant-rate ones. Times are measured from
the video stream's start time; T is the video stream's duration (the container's when the stream has none).

Decoding is streamed: frames are decoded one by one and only the sampled ones are converted to RGB, so a
video of any length needs memory for one chunk of clips at a time. A display rotation stored with the stream
(phone videos) is applied, so frames come out the way players show them. Audio streams are ignored.

PyAV (the `extract` extras) is imported by the functions that decode, so that `VIDEO_EXTENSIONS`, the one list
of what counts as a video file, is importable from a core install (the search server serves these files).
"""
import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np

from utils.errors import ConquerError

# Browser-playable containers first: where a video has files in several, the search page serves the first.
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".ts", ".wmv", ".3gp")


class VideoDecodeError(ConquerError):
    """A video file cannot be opened or decoded; the message names the file."""


@dataclass(frozen=True)
class ClipChunk:
    """Consecutive clips of one video: clips [first_clip, first_clip + len(frames)).

    frames: (n_clips, frames_per_clip, H, W, 3) uint8 RGB, rotated for display.
    frame_times: (n_clips, frames_per_clip) float64, presentation times in seconds of the frames used.
    """
    first_clip: int
    frames: np.ndarray
    frame_times: np.ndarray


def video_file(folder, video_name):
    """The file of `video_name` in `folder` (<video_name><extension>, the first of VIDEO_EXTENSIONS that exists),
    or None."""
    for extension in VIDEO_EXTENSIONS:
        path = os.path.join(folder, video_name + extension)
        if os.path.isfile(path):
            return path
    return None


def count_clips(duration, clip_length):
    """ceil(duration / clip_length); float noise in the duration (e.g. 3.0000001 s) does not add a clip."""
    return math.ceil(round(duration / clip_length, 6))


def clip_sample_times(duration, clip_length, frames_per_clip):
    """(n_clips, frames_per_clip) sample times in seconds: the centres of `frames_per_clip` equal parts of
    each clip; the last clip stops at `duration`."""
    starts = np.arange(count_clips(duration, clip_length)) * clip_length
    ends = np.minimum(starts + clip_length, duration)
    fractions = (np.arange(frames_per_clip) + 0.5) / frames_per_clip
    return starts[:, None] + (ends - starts)[:, None] * fractions[None, :]


def probe_duration(path):
    """Duration in seconds of the first video stream of `path`."""
    with _open(path) as container:
        return stream_duration(path, container, container.streams.video[0])


def iter_clip_chunks(path, clip_length, frames_per_clip, clips_per_chunk):
    """Yield the ClipChunks of `path` in order, `clips_per_chunk` clips each (the last one may be shorter)."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        duration = stream_duration(path, container, stream)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        targets = clip_sample_times(duration, clip_length, frames_per_clip).reshape(-1)
        chunk_size = clips_per_chunk * frames_per_clip
        picked, picked_times = [], []
        first_clip = 0

        def flush():
            nonlocal first_clip
            frames = np.stack(_same_size(path, picked)).reshape(-1, frames_per_clip, *picked[0].shape)
            chunk = ClipChunk(first_clip, frames, np.asarray(picked_times).reshape(-1, frames_per_clip))
            first_clip += len(frames)
            picked.clear()
            picked_times.clear()
            return chunk

        shown = None  # the frame on screen so far: (time, av.VideoFrame, its RGB array once converted)
        k = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                time = float(frame.pts * frame.time_base) - start
                current = [time, frame, None]
                while k < len(targets) and time > targets[k]:
                    chosen = shown if shown is not None else current
                    picked.append(_rgb(chosen))
                    picked_times.append(chosen[0])
                    k += 1
                    if len(picked) == chunk_size:
                        yield flush()
                shown = current
        except av.FFmpegError as e:
            raise VideoDecodeError(f"{path}: decoding failed: {e}") from None
        if shown is None:
            raise VideoDecodeError(f"{path}: the video stream has no decodable frame")
        while k < len(targets):
            picked.append(_rgb(shown))
            picked_times.append(shown[0])
            k += 1
            if len(picked) == chunk_size:
                yield flush()
        if picked:
            yield flush()


def _rgb(shown):
    """RGB array of a (time, frame, rgb) entry, converted once and cached in the entry."""
    if shown[2] is None:
        frame = shown[1]
        rgb = frame.to_ndarray(format="rgb24")
        # The display matrix rotates the stored picture counter-clockwise by `rotation` degrees for display.
        quarter_turns = round(frame.rotation / 90) % 4
        shown[2] = np.ascontiguousarray(np.rot90(rgb, k=quarter_turns)) if quarter_turns else rgb
    return shown[2]


def _same_size(path, frames):
    if any(f.shape != frames[0].shape for f in frames):
        raise VideoDecodeError(f"{path}: the frame size changes within the video; re-encode it at one size")
    return frames


@contextlib.contextmanager
def open_media(path, error_class):
    """av.open for reading (closed on exit); a file that cannot be opened is an `error_class` naming it."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise error_class(f"{path}: cannot open as a media file: {e}") from None
    try:
        yield container
    finally:
        container.close()


@contextlib.contextmanager
def _open(path):
    """`open_media` of a file that must have a video stream; failures are VideoDecodeErrors naming the file."""
    with open_media(path, VideoDecodeError) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: has no video stream")
        yield container


def stream_duration(path, container, stream, error_class=VideoDecodeError):
    """Seconds of `stream` (else of the container) of an open file; a missing or non-positive one is an
    `error_class` naming the file."""
    import av

    if stream.duration is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        raise error_class(f"{path}: neither its {stream.type} stream nor the container states a duration")
    if not duration > 0:
        raise error_class(f"{path}: duration is {duration} s; expected > 0")
    return duration
