"""From video files to subtitles: speech recognition with Whisper, one jsonl line per video.

    python -m utils.transcribe --videos DIR_OR_LIST [...] --out subs.jsonl [--model openai/whisper-small] \\
        [--language en] [--device cuda --dtype fp16] [--batch_size 8] [--num_beams 5] [--block_seconds 300]
    torchrun --nproc_per_node 4 -m utils.transcribe --videos ... --out subs.jsonl --device cuda   # 4 GPUs

The output is the subtitle file that `python -m utils.build_corpus --subtitles` reads: one line per video,
`{"vid_name": <video file stem>, "sub": [{"text", "start", "end"}, ...]}`, lines sorted by vid_name, times in
seconds on the video's timeline (utils/audio_decoding.py), rounded to milliseconds, within [0, duration].
Videos are listed and named as by utils/extract_video_features.py.

`--model` is any Whisper checkpoint (a hub id or a local folder), run by the `transformers`
automatic-speech-recognition pipeline with segment timestamps; `--language` fixes the spoken language
(default: Whisper detects it, one more encoder pass per window); `--num_beams` sets the beam search (default: the
checkpoint's, else the pipeline's 5 beams, as OpenAI's Whisper; 1 is greedy decoding). The sound track is decoded, mixed to mono and resampled to the model's rate in
blocks of at most `--block_seconds`, each ending at a quiet moment (utils/audio_decoding.py), so that a
two-hour file never sits in memory whole. The pipeline cuts each block into 30 s windows (overlapping by
strides it merges), `--batch_size` windows per forward pass. A block's segments are shifted by the block's
start; a segment without an end (the last of a block) ends with the block; times are clipped to the block and
to the video; empty segments are dropped.

Resuming: each finished video is appended as one line, flushed and fsync'ed, to the process's part file
`<out>.rank<R>.part` beside the output. At the start and at the end, rank 0 folds the output and every part
file (left by any earlier number of processes) into `<out>`, rewritten atomically in vid_name order, then
deletes the parts; a last line torn by a crash is dropped (its video is transcribed again). A rerun skips the
videos already in `<out>` or a part file, and keeps lines of videos that are not in its list. Only one run, of
any number of processes, may write to one output at a time.

Under torchrun (any number of processes, GPUs and nodes; the nodes must see the same --out folder) each process
takes a contiguous share of the videos still to do, on cuda:LOCAL_RANK with `--device cuda`; the output is the
file a single process would write, byte for byte. Rank 0 prints the summary of all ranks.

A video without an audio stream gets an empty `sub`. A file, or a sound track, that cannot be decoded is reported
by name and skipped (no line); the exit status is then 1 on every rank (2 for a bad command line or a model that
cannot be loaded, 0 when every video has its line).
"""
import argparse
import glob
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from utils import distributed
from utils.audio_decoding import AudioDecodeError, iter_audio_blocks, probe_media
from utils.errors import ConquerError, run_cli
from utils.extract_video_features import DTYPES, list_videos, video_stem
from utils.io_utils import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/whisper-small"
CHUNK_SECONDS = 30  # Whisper's input window
TIME_DECIMALS = 3


class TranscriptionError(ConquerError):
    """Bad transcription settings, model or output file; the message names the flag or file."""


@dataclass
class TranscriptionSummary:
    transcribed: list = field(default_factory=list)    # video paths transcribed now
    without_audio: list = field(default_factory=list)  # video paths written now with an empty `sub`
    existing: list = field(default_factory=list)       # video paths skipped: their line was already there
    failed: list = field(default_factory=list)         # (video path, reason): could not be decoded
    audio_seconds: float = 0.0                         # audio transcribed now
    seconds: float = 0.0

    def add_work(self, other):
        """Add what another process did (every process finds the same `existing` videos)."""
        for name in ("transcribed", "without_audio", "failed"):
            getattr(self, name).extend(getattr(other, name))
        self.audio_seconds += other.audio_seconds


class SpeechRecognizer:
    """A Whisper model in the transformers speech recognition pipeline.

    recognizer(samples) -> [(text, start, end)]: the segments of a mono float32 block at
    `recognizer.sampling_rate`, in seconds from the block's start; `end` is None for a segment that runs to the
    block's end.
    """

    def __init__(self, asr_pipeline, language=None, batch_size=1, num_beams=None):
        self.pipeline = asr_pipeline
        self.sampling_rate = asr_pipeline.feature_extractor.sampling_rate
        self.batch_size = batch_size
        # An English-only checkpoint refuses `task` (and `language`); a multilingual one would otherwise translate.
        self.generate_kwargs = {}
        if _is_multilingual(asr_pipeline.model.generation_config):
            self.generate_kwargs["task"] = "transcribe"
            if language is not None:
                self.generate_kwargs["language"] = language
        if num_beams is not None:  # else the checkpoint's setting, or the pipeline's 5 beams (OpenAI's Whisper)
            self.generate_kwargs["num_beams"] = num_beams

    def __call__(self, samples):
        output = self.pipeline(samples, return_timestamps=True, chunk_length_s=CHUNK_SECONDS,
                               batch_size=self.batch_size, generate_kwargs=dict(self.generate_kwargs),
                               ignore_warning=True)
        return [(chunk["text"], *chunk["timestamp"]) for chunk in output.get("chunks", [])]


def load_recognizer(model, device="cpu", dtype=torch.float32, language=None, batch_size=1, num_beams=None):
    """A SpeechRecognizer of the Whisper checkpoint `model` (hub id or folder); errors name --model / --language."""
    import transformers

    try:
        asr_pipeline = transformers.pipeline("automatic-speech-recognition", model=model, device=device, dtype=dtype)
    # A folder that is not a loadable checkpoint fails in many ways (OSError, ValueError, KeyError, safetensors
    # and tokenizer errors...); each is reported as the one line of a model that cannot be loaded.
    except Exception as e:
        raise TranscriptionError(f"--model {model}: cannot load a speech recognition model: "
                                 f"{' '.join(str(e).split())}") from None
    if asr_pipeline.type != "seq2seq_whisper":
        raise TranscriptionError(f"--model {model}: a '{asr_pipeline.model.config.model_type}' model; expected a "
                                 f"Whisper model (the one kind with segment timestamps)")
    return SpeechRecognizer(asr_pipeline, _language_code(language, asr_pipeline.model.generation_config),
                            batch_size, num_beams)


def _language_code(language, generation_config):
    """The Whisper code of `language` ("en", "english" or "<|en|>" -> "en"), checked against the model."""
    if language is None:
        return None
    from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

    if not _is_multilingual(generation_config):
        raise TranscriptionError(f"--language {language}: this model is English-only; leave --language out")
    name = language.lower().removeprefix("<|").removesuffix("|>")
    code = TO_LANGUAGE_CODE.get(name, name)
    supported = [token[2:-2] for token in getattr(generation_config, "lang_to_id", None) or {}]
    if code not in supported:
        raise TranscriptionError(f"--language {language}: not a language of this model; expected a code or a name "
                                 f"of one of: {', '.join(supported)}")
    return code


def _is_multilingual(generation_config):
    """Whether a Whisper checkpoint knows languages and tasks (older generation configs only list languages)."""
    flag = getattr(generation_config, "is_multilingual", None)
    return bool(getattr(generation_config, "lang_to_id", None)) if flag is None else flag


def block_segments(segments, block_start, block_end, duration):
    """Subtitle sentences on the video's timeline from one block's recognised (text, start, end), in seconds from
    the block's start: shifted by `block_start`; a missing end is the block's end (a missing start, the previous
    segment's end); clipped to the block and to [0, duration]; empty texts dropped."""
    low, high = max(block_start, 0.0), min(block_end, duration)
    sentences = []
    previous_end = block_start
    for text, start, end in segments:
        start = previous_end if start is None else block_start + start
        end = block_end if end is None else block_start + end
        previous_end = end
        text = text.strip()
        if not text:
            continue
        start = min(max(start, low), high)
        end = min(max(end, start), high)
        sentences.append({"text": text, "start": round(start, TIME_DECIMALS), "end": round(end, TIME_DECIMALS)})
    return sentences


def transcribe_video(path, recognizer, block_seconds):
    """(subtitle sentences, seconds of audio) of one video; None instead of the sentences when it has no audio
    stream. Raises AudioDecodeError."""
    info = probe_media(path)
    if not info.has_audio:
        return None, 0.0
    sentences, audio_seconds = [], 0.0
    for block in iter_audio_blocks(path, recognizer.sampling_rate, block_seconds):
        sentences += block_segments(recognizer(block.samples), block.start, block.end, info.duration)
        audio_seconds += block.end - block.start
    return sentences, audio_seconds


# ----------------------------------------------------------------------------------------------------
# the resumable output

def part_path(out, rank):
    return f"{out}.rank{rank}.part"


def _part_paths(out):
    """Every part file of `out`, whatever the number of processes that wrote them, in rank order."""
    paths = glob.glob(glob.escape(out) + ".rank*.part")
    ranks = {path: re.fullmatch(r"\.rank(\d+)\.part", path[len(out):]) for path in paths}
    return sorted((path for path, match in ranks.items() if match), key=lambda path: int(ranks[path].group(1)))


def _row_line(row):
    return json.dumps(row) + "\n"


def _read_rows(path, part_file):
    """The subtitle rows of `path`. In a part file, a last line that is unfinished (no newline) or unreadable was
    torn by a crash and is dropped; anywhere else a bad line is an error naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    finished = lines[:-1] if part_file else lines  # the text after the last newline; the output may lack it
    if part_file and lines[-1]:
        logger.info("%s: dropped an unfinished last line (an interrupted run); its video is transcribed again", path)
    rows = []
    for number, line in enumerate(finished, start=1):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is None:
            if part_file and number == len(finished):
                logger.info("%s: dropped an unreadable last line (an interrupted run)", path)
                break
            raise TranscriptionError(f"{path}: line {number} is not a subtitle line "
                                     f'{{"vid_name": str, "sub": [...]}}; is --out the output of utils.transcribe?')
        rows.append(row)
    return rows


def _parse_row(line):
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not (isinstance(row, dict) and isinstance(row.get("vid_name"), str) and isinstance(row.get("sub"), list)):
        return None
    return row


def merge_parts(out):
    """Fold the part files of `out` into `out` (rewritten atomically, sorted by vid_name; the first line of a
    vid_name wins, the output's before the parts' in rank order) and delete them. Returns the vid_names in `out`.
    Writes `out` when there were parts or there was no `out` yet."""
    if os.path.isdir(out):
        raise TranscriptionError(f"--out {out}: is a folder; expected the path of a .jsonl file")
    folder = os.path.dirname(os.path.abspath(out))
    for name in os.listdir(folder):
        if name.startswith(f".{os.path.basename(out)}.") and name.endswith(".tmp"):  # atomic_write's, from a crash
            os.remove(os.path.join(folder, name))
    parts = _part_paths(out)
    sources = ([(out, False)] if os.path.isfile(out) else []) + [(part, True) for part in parts]
    rows = {}
    for path, part_file in sources:
        for row in _read_rows(path, part_file):
            rows.setdefault(row["vid_name"], row)
    if parts or not os.path.isfile(out):
        with atomic_write(out, "w") as f:
            f.writelines(_row_line(rows[name]) for name in sorted(rows))
        for part in parts:
            os.remove(part)
    return sorted(rows)


def _append_row(part, row):
    """Append one finished line; on disk before the next video starts, so a crash tears at most this line."""
    part.write(_row_line(row).encode())
    part.flush()
    os.fsync(part.fileno())


def transcribe_videos(videos, out, recognizer, block_seconds=300.0):
    """Transcribe the videos (paths) that `out` does not have yet into `out` (see the module docstring); under
    torchrun, this process's share of them. Returns the TranscriptionSummary of every process."""
    started = time.perf_counter()
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    done = set(distributed.run_on_main(lambda: merge_parts(out)))
    summary = TranscriptionSummary(existing=[path for path in videos if video_stem(path) in done])
    pending = [path for path in videos if video_stem(path) not in done]
    first, last = distributed.shard_bounds(len(pending), 1)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if rank == 0 and summary.existing:
        logger.info("%d of %d videos already have their subtitles in %s", len(summary.existing), len(videos), out)
    description = "transcribing" if world_size == 1 else f"transcribing (rank {rank} of {world_size})"
    bar = tqdm(pending[first:last], unit="video", desc=description)
    with open(part_path(out, rank), "ab") as part:
        for path in bar:
            try:
                sentences, audio_seconds = transcribe_video(path, recognizer, block_seconds)
            except AudioDecodeError as e:
                logger.warning("skipped: %s", e)
                summary.failed.append((path, str(e)))
                continue
            _append_row(part, {"vid_name": video_stem(path), "sub": sentences or []})
            (summary.transcribed if sentences is not None else summary.without_audio).append(path)
            summary.audio_seconds += audio_seconds
            bar.set_postfix(audio_x_realtime=f"{summary.audio_seconds / max(bar.format_dict['elapsed'], 1e-9):.1f}")
    bar.close()
    summaries = distributed.gather_object(summary)

    def merge_all():
        merge_parts(out)
        total = TranscriptionSummary(existing=list(summary.existing))
        for rank_summary in summaries:
            total.add_work(rank_summary)
        return total

    summary = distributed.run_on_main(merge_all)
    summary.seconds = time.perf_counter() - started
    return summary


# ----------------------------------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", nargs="+", required=True,
                        help="folders of video files, .txt lists of video paths (one a line), or video files")
    parser.add_argument("--out", required=True,
                        help="the subtitle .jsonl file (utils.build_corpus --subtitles); a rerun resumes")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a Whisper checkpoint: hub id or local folder")
    parser.add_argument("--language", default=None,
                        help="spoken language, a code or a name (en, english); default: Whisper detects it per window")
    parser.add_argument("--batch_size", type=int, default=8, help="30 s windows per forward pass")
    parser.add_argument("--num_beams", type=int, default=None,
                        help="beam search width; default: the checkpoint's, else 5 as OpenAI's Whisper (1: greedy, "
                             "several times faster on a CPU)")
    parser.add_argument("--block_seconds", type=float, default=300.0,
                        help="seconds of audio decoded and transcribed at a time (64 kB each at 16 kHz)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (fp16/bf16 on GPU)")
    args = parser.parse_args(argv)
    for flag in ("batch_size", "num_beams"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise TranscriptionError(f"--{flag} {getattr(args, flag)}: expected >= 1")
    if not args.block_seconds > 0:
        raise TranscriptionError(f"--block_seconds {args.block_seconds}: expected > 0 seconds")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    videos = list_videos(args.videos)
    if not videos:
        raise TranscriptionError(f"--videos {' '.join(args.videos)}: no video files found")
    device = distributed.command_device(args.device, TranscriptionError)
    try:
        return _transcribe(args, videos, device)
    finally:
        distributed.shutdown()


def _transcribe(args, videos, device):
    recognizer = load_recognizer(args.model, device, DTYPES[args.dtype], args.language, args.batch_size,
                                 args.num_beams)
    summary = transcribe_videos(videos, args.out, recognizer, args.block_seconds)
    if distributed.is_main_process():
        logger.info("%d videos transcribed (%.0f s of audio, %.1fx real time), %d without an audio stream (empty "
                    "subtitles), %d already in %s, %d not decodable", len(summary.transcribed),
                    summary.audio_seconds, summary.audio_seconds / summary.seconds, len(summary.without_audio),
                    len(summary.existing), args.out, len(summary.failed))
        if summary.failed:
            logger.warning("%d of %d videos could not be decoded and have no subtitles: %s", len(summary.failed),
                           len(videos), ", ".join(path for path, _ in summary.failed))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
