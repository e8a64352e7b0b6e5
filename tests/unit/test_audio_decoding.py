"""Streaming audio decoding (utils/audio_decoding.py): synthetic files with known signals, decoded to mono blocks."""
import fractions

import av
import numpy as np
import pytest

from utils.audio_decoding import AudioDecodeError, iter_audio_blocks, probe_media
from utils.synthetic_video import write_video

RATE = 16000
FRAME_TIMES = np.arange(40) / 10  # a 4 s video


def black(t):
    return np.zeros((48, 64, 3), dtype=np.uint8)


def tone(times, frequency=440.0):
    return 0.5 * np.sin(2 * np.pi * frequency * times)


def bursts(times):
    """A tone for 0.3 s, then 0.2 s of silence, every 0.5 s."""
    return tone(times) * (times % 0.5 < 0.3)


def whole_track(path, rate=RATE):
    (block,) = iter_audio_blocks(path, rate, block_seconds=1000)
    return block


def test_stereo_44k_track_becomes_mono_16k_on_the_video_timeline(tmp_path):
    path = tmp_path / "late_stereo.mp4"
    # The tone is in the left channel only and the track starts 1.5 s into the video.
    write_video(path, FRAME_TIMES, black, audio=True, audio_rate=44100, audio_start=1.5,
                audio_signal=lambda t: np.stack([tone(t), np.zeros_like(t)]))
    assert probe_media(path).duration == pytest.approx(4.0) and probe_media(path).has_audio
    block = whole_track(path)
    assert block.samples.dtype == np.float32 and block.samples.ndim == 1
    assert block.end == pytest.approx(4.0, abs=0.05)  # the track ends with the video
    times = block.start + np.arange(len(block.samples)) / RATE
    onset = times[np.abs(block.samples) > 0.1][0]
    assert onset == pytest.approx(1.5, abs=0.01)
    heard = block.samples[times > 1.6]
    spectrum = np.abs(np.fft.rfft(heard))
    assert np.fft.rfftfreq(len(heard), 1 / RATE)[np.argmax(spectrum)] == pytest.approx(440, abs=2)
    assert 0.1 < np.abs(heard).max() < 0.6  # mixed down, not dropped and not summed beyond the channel's level


def test_blocks_cover_the_track_once_in_order_and_end_in_silence(tmp_path):
    path = tmp_path / "bursts.mp4"
    write_video(path, FRAME_TIMES, black, audio=True, audio_signal=bursts)
    whole = whole_track(path)
    blocks = list(iter_audio_blocks(path, RATE, block_seconds=1.0))
    assert len(blocks) >= 4 and all(len(b.samples) <= RATE for b in blocks)
    np.testing.assert_array_equal(np.concatenate([b.samples for b in blocks]), whole.samples)
    assert blocks[0].start == whole.start
    for previous, block in zip(blocks, blocks[1:]):
        assert block.start == pytest.approx(previous.end, abs=1e-9)
        assert previous.end % 0.5 > 0.3  # cut in a silent gap of the bursts, not within a tone
        assert len(previous.samples) > RATE // 2


def test_a_hole_in_the_track_is_filled_with_silence(tmp_path):
    path = str(tmp_path / "hole.mkv")
    frame_size, hole = 1024, RATE  # a 1 s hole after 15 frames
    with av.open(path, "w") as container:
        stream = container.add_stream("pcm_s16le", rate=RATE, layout="mono")
        for i in range(30):
            pts = i * frame_size + (hole if i >= 15 else 0)
            samples = tone((pts + np.arange(frame_size)) / RATE).astype(np.float32)[None]
            frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, pts, fractions.Fraction(1, RATE)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    block = whole_track(path)
    assert len(block.samples) == 30 * frame_size + hole
    expected = tone(np.arange(len(block.samples)) / RATE)
    expected[15 * frame_size:15 * frame_size + hole] = 0
    np.testing.assert_allclose(block.samples, expected, atol=1e-3)  # 16-bit PCM


def test_probe_and_errors_name_the_file(tmp_path):
    silent = tmp_path / "no_audio.mp4"
    write_video(silent, FRAME_TIMES, black)
    assert probe_media(silent).has_audio is False
    with pytest.raises(AudioDecodeError, match="no_audio.mp4: has no audio stream"):
        list(iter_audio_blocks(silent, RATE, 10))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 10)
    with pytest.raises(AudioDecodeError, match="broken.mp4: cannot open"):
        probe_media(broken)
