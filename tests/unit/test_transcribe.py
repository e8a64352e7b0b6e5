"""Speech to subtitles (utils/transcribe.py): synthetic videos through a tiny random Whisper, or through a fake
recognizer where a test needs to know what is said when; resuming; torchrun against one process."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from utils.audio_decoding import iter_audio_blocks, probe_media
from utils.corpus_formats import load_subtitles
from utils.errors import run_cli
from utils.run_dir import REPO_ROOT
from utils.synthetic_models import save_random_whisper
from utils.synthetic_video import write_video
from utils.transcribe import (TranscriptionError, block_segments, load_recognizer, main, merge_parts, part_path,
                              transcribe_videos)

pytestmark = pytest.mark.usefixtures("one_thread")

RATE = 16000
# One thread per process, as the test process (the same numerics); never the network.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def black(t):
    return np.zeros((48, 64, 3), dtype=np.uint8)


def bursts(times):
    """A 440 Hz tone for 0.3 s, then 0.2 s of silence, every 0.5 s."""
    return 0.5 * np.sin(2 * np.pi * 440 * times) * (times % 0.5 < 0.3)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return save_random_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """speech (5 s of tone bursts), quiet (3 s of silence), late (the track starts at 0.7 s), mute (no audio)."""
    folder = tmp_path_factory.mktemp("videos")
    write_video(folder / "speech.mp4", np.arange(50) / 10, black, audio=True, audio_signal=bursts)
    write_video(folder / "quiet.mp4", np.arange(30) / 10, black, audio=True)
    write_video(folder / "late.mp4", np.arange(40) / 10, black, audio=True, audio_signal=bursts, audio_start=0.7)
    write_video(folder / "mute.mp4", np.arange(20) / 10, black)
    return folder


def copy_videos(video_dir, folder, names=("late", "mute", "quiet", "speech")):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        shutil.copy(video_dir / f"{name}.mp4", folder)
    return sorted(str(folder / f"{name}.mp4") for name in names)


class FakeRecognizer:
    """Says per block: a blank segment, "<n> samples" over [0.25, 0.5] s, then "tail" from 0.5 s to the block's end
    (no end timestamp). Records the blocks it hears; raises KeyboardInterrupt (a user stopping the run) when
    asked for block number `stop_after` + 1."""
    sampling_rate = RATE

    def __init__(self, stop_after=None):
        self.blocks, self.stop_after = [], stop_after

    def __call__(self, samples):
        if self.stop_after is not None and len(self.blocks) == self.stop_after:
            raise KeyboardInterrupt
        self.blocks.append(samples.copy())
        return [("  ", 0.0, 0.1), (f" {len(samples)} samples", 0.25, 0.5), ("tail", 0.5, None)]


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def leftover_parts(out):
    return sorted(p for p in os.listdir(os.path.dirname(out)) if p.endswith(".part") or p.endswith(".tmp"))


# ----------------------------------------------------------------------------------------------------
# the command line with the tiny Whisper

def test_cli_writes_the_subtitles_the_corpus_builder_reads(whisper_dir, video_dir, tmp_path, caplog):
    videos = copy_videos(video_dir, tmp_path / "videos")
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"not a video" * 10)
    out = str(tmp_path / "subs" / "subs.jsonl")
    with caplog.at_level(logging.INFO):
        status = main(["--videos", str(tmp_path / "videos"), "--out", out, "--model", whisper_dir,
                       "--language", "english", "--batch_size", "2"])
    assert status == 1  # the broken file
    assert any(r.levelno == logging.WARNING and "broken.mp4" in r.getMessage() for r in caplog.records)
    assert "1 without an audio stream" in caplog.text and "1 not decodable" in caplog.text

    subtitles = load_subtitles(out)
    assert sorted(subtitles) == ["late", "mute", "quiet", "speech"]
    assert [row["vid_name"] for row in read_lines(out)] == sorted(subtitles)
    assert subtitles["mute"] == [] and subtitles["speech"]
    for name, sentences in subtitles.items():
        duration = probe_media(tmp_path / "videos" / f"{name}.mp4").duration
        starts = [s["start"] for s in sentences]
        assert starts == sorted(starts)
        assert all(0 <= s["start"] <= s["end"] <= duration and s["text"] == s["text"].strip() != ""
                   for s in sentences)
    assert leftover_parts(out) == []

    # The pipeline on the whole track (one block at the default --block_seconds), shifted and clipped to the video.
    asr = transformers.pipeline("automatic-speech-recognition", model=whisper_dir, device="cpu")
    (block,) = iter_audio_blocks(videos[-1], RATE, 1000)
    plain = asr(block.samples, return_timestamps=True, chunk_length_s=30, ignore_warning=True,
                generate_kwargs={"language": "en", "task": "transcribe"})["chunks"]
    low, high = max(block.start, 0.0), min(block.end, 5.0)
    expected = []
    for chunk in plain:
        start, end = chunk["timestamp"]
        start = min(max(block.start + start, low), high)
        end = high if end is None else min(max(block.start + end, start), high)
        if chunk["text"].strip():
            expected.append({"text": chunk["text"].strip(), "start": round(start, 3), "end": round(end, 3)})
    assert len(expected) > 1 and subtitles["speech"] == expected


@pytest.mark.parametrize("flags, message", [
    (["--model", "{bad_model}"], "--model .*bad_model: cannot load a speech recognition model"),
    (["--language", "french"], "--language french: not a language of this model; .* en"),
    (["--device", "cuda"], "--device cuda: CUDA is not available here"),
    (["--block_seconds", "0"], "--block_seconds 0.0: expected > 0"),
    (["--num_beams", "0"], "--num_beams 0: expected >= 1"),
])
def test_bad_settings_are_one_line_and_status_2(flags, message, whisper_dir, video_dir, tmp_path, capsys):
    if "--device" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bad_model = tmp_path / "bad_model"
    bad_model.mkdir()
    (bad_model / "config.json").write_text('{"model_type": "no such model"}')
    flags = [flag.format(bad_model=bad_model) for flag in flags]
    copy_videos(video_dir, tmp_path / "videos", names=("mute",))
    argv = ["--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "subs.jsonl"), "--model", whisper_dir]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv + flags)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not (tmp_path / "subs.jsonl").exists()


def test_a_folder_without_videos_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, ["--videos", str(tmp_path / "empty"), "--out", str(tmp_path / "subs.jsonl")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --videos {tmp_path / 'empty'}: no video files found"


def test_torchrun_two_processes_write_the_file_of_one(whisper_dir, video_dir, tmp_path):
    copy_videos(video_dir, tmp_path / "videos")
    flags = ["--videos", str(tmp_path / "videos"), "--model", whisper_dir, "--block_seconds", "3",
             "--device", "cpu"]
    assert main(flags + ["--out", str(tmp_path / "single" / "subs.jsonl")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "utils.transcribe"] + flags + ["--out", str(tmp_path / "torchrun" / "subs.jsonl")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "transcribing (rank 1 of 2)" in result.stderr  # both ranks worked
    with open(tmp_path / "single" / "subs.jsonl", "rb") as single, \
            open(tmp_path / "torchrun" / "subs.jsonl", "rb") as sharded:
        assert sharded.read() == single.read()
    assert os.listdir(tmp_path / "torchrun") == ["subs.jsonl"]


# ----------------------------------------------------------------------------------------------------
# blocks, offsets and resuming, with a fake recognizer

def test_blocks_cover_the_track_once_and_segments_land_at_absolute_times(video_dir, tmp_path):
    (video,) = copy_videos(video_dir, tmp_path / "videos", names=("late",))
    out = str(tmp_path / "subs.jsonl")
    recognizer = FakeRecognizer()
    summary = transcribe_videos([video], out, recognizer, block_seconds=1.0)

    whole = next(iter_audio_blocks(video, RATE, 1000))
    assert summary.transcribed == [video] and summary.audio_seconds == pytest.approx(len(whole.samples) / RATE)
    onset = whole.start + np.argmax(np.abs(whole.samples) > 0.1) / RATE
    assert onset == pytest.approx(0.7, abs=0.01)  # the track starts late: times are the video's
    assert len(recognizer.blocks) >= 3 and all(len(b) <= RATE for b in recognizer.blocks)
    np.testing.assert_array_equal(np.concatenate(recognizer.blocks), whole.samples)

    expected, block_start = [], whole.start
    for samples in recognizer.blocks:
        block_end = block_start + len(samples) / RATE
        high = min(block_end, 4.0)  # the video's duration
        expected += [{"text": f"{len(samples)} samples", "start": round(min(block_start + 0.25, high), 3),
                      "end": round(min(block_start + 0.5, high), 3)},
                     {"text": "tail", "start": round(min(block_start + 0.5, high), 3), "end": round(high, 3)}]
        block_start = block_end
    assert read_lines(out) == [{"vid_name": "late", "sub": expected}]


def test_block_segments_shift_clip_and_fill_missing_times():
    segments = [(" one ", 0.5, 1.0), ("", 1.0, 2.0), ("two", None, 3.5), ("three", 4.0, None), ("late", 9.0, 9.5)]
    assert block_segments(segments, block_start=10.0, block_end=15.0, duration=14.0) == [
        {"text": "one", "start": 10.5, "end": 11.0},
        {"text": "two", "start": 12.0, "end": 13.5},       # starts where the blank segment ended
        {"text": "three", "start": 14.0, "end": 14.0},     # runs to the block's end, clipped to the video
        {"text": "late", "start": 14.0, "end": 14.0}]      # beyond the block: clipped
    assert block_segments([("early", -0.5, 0.2)], block_start=-0.02, block_end=1.0, duration=5.0) == [
        {"text": "early", "start": 0.0, "end": 0.18}]


def test_a_video_without_audio_gets_an_empty_line_without_recognition(video_dir, tmp_path):
    (video,) = copy_videos(video_dir, tmp_path / "videos", names=("mute",))
    recognizer = FakeRecognizer()
    summary = transcribe_videos([video], str(tmp_path / "subs.jsonl"), recognizer)
    assert summary.without_audio == [video] and not summary.transcribed and not recognizer.blocks
    assert read_lines(tmp_path / "subs.jsonl") == [{"vid_name": "mute", "sub": []}]


def test_an_interrupted_run_resumes_where_it_stopped(video_dir, tmp_path):
    videos = copy_videos(video_dir, tmp_path / "videos")  # late, mute, quiet, speech: 3 with audio
    reference = str(tmp_path / "reference" / "subs.jsonl")
    transcribe_videos(videos, reference, FakeRecognizer())

    out = str(tmp_path / "run" / "subs.jsonl")
    with pytest.raises(KeyboardInterrupt):
        transcribe_videos(videos, out, FakeRecognizer(stop_after=1))  # stopped while transcribing "quiet"
    with open(part_path(out, 0)) as f:
        finished = f.read()
    assert [json.loads(line)["vid_name"] for line in finished.splitlines()] == ["late", "mute"]
    with open(part_path(out, 0), "a") as f:  # a crash in the middle of writing a line
        f.write(json.dumps(read_lines(reference)[2])[:20])

    recognizer = FakeRecognizer()
    summary = transcribe_videos(videos, out, recognizer)
    assert len(recognizer.blocks) == 2  # quiet and speech; late and mute were kept
    assert summary.existing == videos[:2] and summary.transcribed == videos[2:]
    with open(out, "rb") as resumed, open(reference, "rb") as uninterrupted:
        assert resumed.read() == uninterrupted.read()
    assert leftover_parts(out) == []


def test_a_resume_folds_the_parts_of_a_run_with_more_processes(video_dir, tmp_path):
    videos = copy_videos(video_dir, tmp_path / "videos")
    reference = str(tmp_path / "reference" / "subs.jsonl")
    transcribe_videos(videos, reference, FakeRecognizer())
    lines = {row["vid_name"]: json.dumps(row) + "\n" for row in read_lines(reference)}
    kept = {"vid_name": "other_video", "sub": [{"text": "kept", "start": 0.0, "end": 1.0}]}

    out = str(tmp_path / "run" / "subs.jsonl")
    os.makedirs(os.path.dirname(out))
    with open(out, "w") as f:  # merged by an earlier run, which had a video this run does not list
        f.write(lines["late"] + json.dumps(kept) + "\n")
    with open(part_path(out, 1), "w") as f:  # a 3-process run: rank 1 finished mute, then was killed
        f.write(lines["mute"] + lines["speech"][:-1])
    with open(part_path(out, 2), "w") as f:
        f.write(lines["late"])  # already merged (killed between the merge and deleting the parts)

    recognizer = FakeRecognizer()
    transcribe_videos(videos, out, recognizer)
    assert len(recognizer.blocks) == 2  # quiet, and speech whose line was torn
    expected = dict(lines, other_video=json.dumps(kept) + "\n")
    with open(out) as f:
        assert f.read() == "".join(expected[name] for name in sorted(expected))
    assert leftover_parts(out) == []


def test_an_output_that_is_not_a_subtitle_file_is_named(tmp_path):
    out = tmp_path / "subs.jsonl"
    out.write_text('{"vid_name": "a", "sub": []}\n[1, 2]\n')
    with pytest.raises(TranscriptionError, match=r"subs.jsonl: line 2 is not a subtitle line"):
        merge_parts(str(out))


@pytest.mark.parametrize("num_beams, expected", [(None, 5), (1, 1), (2, 2)])
def test_num_beams_reaches_generation(whisper_dir, num_beams, expected):
    """--num_beams is the beam width Whisper decodes with; without it, the pipeline's 5 (OpenAI's Whisper's)."""
    recognizer = load_recognizer(whisper_dir, num_beams=num_beams)
    model, seen = recognizer.pipeline.model, []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["num_beams"])
        return generate(*args, **kwargs)

    model.generate = recording_generate
    recognizer(np.zeros(recognizer.sampling_rate, dtype=np.float32))
    assert seen and set(seen) == {expected}
