"""Small synthetic video files (H.264 in mp4, PyAV) for tests and benchmarks of feature extraction and
transcription: frames from a function of time, and optionally an AAC sound track (silence or a given signal)."""
import fractions

import av
import numpy as np

_AUDIO_RATE = 16000
_TIME_BASE = fractions.Fraction(1, 1000)  # pts in milliseconds: room for any frame timing a test needs


def write_video(path, frame_times, frame_at, size=(64, 48), audio=False, rotation=0, audio_signal=None,
                audio_rate=_AUDIO_RATE, audio_start=0.0):
    """Write `path`: frame i is `frame_at(frame_times[i])`, an (height, width, 3) uint8 RGB array, presented
    at `frame_times[i]` seconds (increasing, any spacing: constant or variable frame rate).

    size: (width, height), even numbers. rotation: display rotation in degrees, counter-clockwise, stored in the
    stream's display matrix.
    audio: add an AAC track from `audio_start` seconds to the end of the video, sampled at `audio_rate` Hz: silent,
    or `audio_signal(times)`, the samples in [-1, 1] at `times` (float64 seconds from the track's start), shape
    (n,) for a mono signal or (2, n) for a stereo one (left, right).
    """
    frame_times = np.asarray(frame_times, dtype=np.float64)
    mean_rate = fractions.Fraction((len(frame_times) - 1) / (frame_times[-1] - frame_times[0])).limit_denominator(1000)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=mean_rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = _TIME_BASE
        # Lossless: the decoded frames are the given ones (up to RGB <-> YUV rounding), so a change to some
        # frames leaves the others untouched.
        stream.options = {"qp": "0"}
        stream.codec_context.max_b_frames = 0  # decode order = presentation order: exact durations for any timing
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream = container.add_stream("aac", rate=audio_rate) if audio else None
        for t in frame_times:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_at(t), dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = round(t / _TIME_BASE), _TIME_BASE
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if audio:
            end = float(frame_times[-1]) + 1 / float(mean_rate)
            _write_audio(container, audio_stream, audio_rate, audio_start, end - audio_start, audio_signal)


def _write_audio(container, stream, rate, start, seconds, signal):
    samples_per_frame = 1024
    first = round(start * rate)
    for i in range(int(np.ceil(seconds * rate / samples_per_frame))):
        if signal is None:
            samples = np.zeros((1, samples_per_frame), dtype=np.float32)
        else:
            times = (i * samples_per_frame + np.arange(samples_per_frame)) / rate
            samples = np.ascontiguousarray(np.atleast_2d(signal(times)), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono" if len(samples) == 1 else "stereo")
        frame.sample_rate, frame.pts = rate, first + i * samples_per_frame
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
