"""Streaming audio decoding with PyAV: a video's sound track as mono float32 blocks at one sampling rate.

    info = probe_media(path)                     # info.duration (s), info.has_audio
    for block in iter_audio_blocks(path, sampling_rate=16000, block_seconds=300):
        block.start, block.end, block.samples    # seconds on the video's timeline; (n,) float32 in [-1, 1]

The first audio stream is decoded, mixed down to mono and resampled by `av.AudioResampler` (libswresample),
and handed out in blocks of at most `block_seconds`, so a recording of any length needs memory for about one
block. A block ends in the middle of the quietest 10 ms (lowest mean square) of its last QUIET_SEARCH_SECONDS,
so that a cut between blocks rarely splits a word. The blocks cover the decoded audio exactly once, in order:
each starts where the previous one ended.

Times are on the timeline of utils/video_decoding.py, so that subtitles line up with the clip features: seconds
from the video stream's start, and the duration is the video stream's (the container's when the stream states
none). A file without a video stream is timed by its audio stream the same way. The first block starts
at the first audio frame's presentation time (a track may start late); later samples follow at the sampling
rate, and a hole in the track's timestamps longer than GAP_TOLERANCE_SECONDS is filled with silence, so the
samples stay in sync with the picture.

PyAV (the `extract` extras) is imported by the functions that decode, as in utils/video_decoding.py.
"""
from dataclasses import dataclass

import numpy as np

from utils.errors import ConquerError
from utils.video_decoding import open_media, stream_duration

QUIET_SEARCH_SECONDS = 2.0
QUIET_WINDOW_SECONDS = 0.01
GAP_TOLERANCE_SECONDS = 0.05


class AudioDecodeError(ConquerError):
    """A media file or its audio stream cannot be opened or decoded; the message names the file."""


@dataclass(frozen=True)
class MediaInfo:
    duration: float   # seconds: the video stream's (see the module docstring)
    has_audio: bool


@dataclass(frozen=True)
class AudioBlock:
    """Consecutive mono samples of a sound track: samples[0] is heard at `start` seconds on the video's timeline."""
    start: float
    samples: np.ndarray  # (n,) float32
    sampling_rate: int

    @property
    def end(self):
        return self.start + len(self.samples) / self.sampling_rate


def probe_media(path):
    """MediaInfo of `path`."""
    with open_media(path, AudioDecodeError) as container:
        return MediaInfo(_duration(path, container), bool(container.streams.audio))


def iter_audio_blocks(path, sampling_rate, block_seconds):
    """Yield the AudioBlocks of the first audio stream of `path`, mono at `sampling_rate` Hz, each at most
    `block_seconds` long, in order. Nothing for a track that decodes to no samples."""
    block_size = max(1, round(block_seconds * sampling_rate))
    window = max(1, round(QUIET_WINDOW_SECONDS * sampling_rate))
    search = min(round(QUIET_SEARCH_SECONDS * sampling_rate), block_size // 2)
    pieces, n_buffered = [], 0
    start = None
    for first_time, samples in _decode_mono(path, sampling_rate):
        if start is None:
            start = first_time
        pieces.append(samples)
        n_buffered += len(samples)
        while n_buffered >= block_size:
            buffered = np.concatenate(pieces)
            cut = _quiet_cut(buffered, block_size, search, window)
            yield AudioBlock(start, buffered[:cut], sampling_rate)
            start += cut / sampling_rate
            pieces, n_buffered = [buffered[cut:]], len(buffered) - cut
    if n_buffered:
        yield AudioBlock(start, np.concatenate(pieces), sampling_rate)


def _quiet_cut(samples, block_size, search, window):
    """Where a block of `samples` ends: the middle of the quietest `window` among those tiling the last `search`
    samples before `block_size` (the latest one on a tie, keeping blocks long); `block_size` without a search."""
    n_windows = search // window
    if n_windows == 0:
        return block_size
    tail = samples[block_size - n_windows * window:block_size].reshape(n_windows, window)
    energy = np.square(tail, dtype=np.float64).mean(axis=1)
    quietest = n_windows - 1 - int(np.argmin(energy[::-1]))
    return block_size - (n_windows - quietest) * window + window // 2


def _decode_mono(path, sampling_rate):
    """Yield (time of the track's first sample, mono float32 samples at `sampling_rate`) in decoding order;
    the time is the same for every item, known once the first frame is decoded."""
    import av

    with open_media(path, AudioDecodeError) as container:
        if not container.streams.audio:
            raise AudioDecodeError(f"{path}: has no audio stream")
        stream = container.streams.audio[0]
        origin = _timeline_origin(container)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
        first_time = next_time = None  # next_time: where the next frame should start if the track has no hole
        try:
            for frame in container.decode(stream):
                time = float(frame.pts * frame.time_base) - origin if frame.pts is not None else next_time
                if first_time is None:
                    first_time = next_time = time if time is not None else 0.0
                if time is not None and time - next_time > GAP_TOLERANCE_SECONDS:
                    yield first_time, np.zeros(round((time - next_time) * sampling_rate), dtype=np.float32)
                    next_time = time
                next_time += frame.samples / frame.sample_rate
                for resampled in resampler.resample(frame):
                    yield first_time, resampled.to_ndarray().reshape(-1)
            for resampled in resampler.resample(None):
                yield first_time, resampled.to_ndarray().reshape(-1)
        except av.FFmpegError as e:
            raise AudioDecodeError(f"{path}: decoding the audio failed: {e}") from None
        except ValueError as e:  # the resampler refuses a frame whose format changed mid-stream
            raise AudioDecodeError(f"{path}: the audio cannot be resampled: {e}") from None


def _main_stream(container):
    """The stream whose start and duration define the timeline: the first video stream, else the first audio one."""
    streams = container.streams.video or container.streams.audio
    return streams[0] if streams else None


def _timeline_origin(container):
    stream = _main_stream(container)
    if stream is None or stream.start_time is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _duration(path, container):
    stream = _main_stream(container)
    if stream is None:
        raise AudioDecodeError(f"{path}: has neither a video nor an audio stream")
    return stream_duration(path, container, stream, AudioDecodeError)
