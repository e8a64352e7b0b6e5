"""Benchmark section `collection`: what turning a folder of videos into a search index costs
(method/index_videos.py), on generated H.264 videos with an AAC sound track, measured in one run on this machine.

    python -m method.tools.benchmark --sections collection [--device cuda] [--collection_seconds 40] \\
        [--collection_videos 8 --collection_video_seconds 90]
    python -m method.tools.benchmark --sections collection --quick    # tiny sizes: a smoke run of every step

Not part of a plain `--quick` run (SMOKE_BY_DEFAULT = False): it trains two runs through the training scripts and
runs index_videos three times, each step a process of its own, which takes over a minute even at tiny sizes.

1. **Throughput per hour of video**, in this process, with the production functions, on one generated 480x270,
   25 fps video of --collection_seconds (default 40 s: two Whisper windows). Each model is loaded first (its load
   time is reported apart); the compute time is then scaled to an hour of video, and given as x real time.

   * Clip features (utils.extract_video_features.extract_features, 2 decoding threads) with ResNet-152's
     architecture and random weights (`--backbones resnet152 --weights none`) at 224 px: 3 frames per 1.5-s clip
     (the default recipe) and 1 frame per clip.
   * Subtitles (utils.transcribe.transcribe_videos, batch size 8 as its command's default) with Whisper-small's
     and Whisper-tiny's architectures (80 mel bins; 768-d, 12 + 12 layers and 384-d, 4 + 4 layers), random weights
     and a tokenizer with a vocabulary of Whisper's size (51,865 tokens: the output layer runs at every decoded
     token; utils/synthetic_models.py builds them), decoded as utils.transcribe decodes: the transformers
     pipeline's default for Whisper, beam search with 5 beams, and, without --language (index_videos's default),
     the language detected per window, which encodes each window twice. The beams, encoder passes and decoder
     steps are counted, not assumed.

   Random weights never end a window: they decode up to the token limit, and then, as the window lacks a final
   timestamp, mostly decode it again from its last timestamp. A real model ends a 30-s window of speech after
   about TOKENS_PER_WINDOW tokens: English speech runs at about 150 words a minute, 75 words a window, about 100
   BPE tokens (1.3 per word), plus two timestamp tokens per segment of a few seconds. So every window is made to
   end that way (WindowEnding: the timestamp of the window's end, then <|endoftext|>) and is decoded once, with
   TOKENS_PER_WINDOW tokens, as a real model would decode it. Silence and music, which a real model ends early,
   cost less.

2. **index_videos end to end**, as its command runs (features and subtitles each in a process of its own, corpus
   and index in this one), with tiny models: a random ResNet and Whisper of the tests' sizes, a tiny random text
   encoder, and a first-stage and a CONQUER run trained here for 1 epoch (config/model_config_tiny.json) through
   the scripts docs/walkthrough.md uses, on 12 short generated videos with generated annotations and subtitles.
   The model compute is then small, so the split by step shows what the pipeline itself costs. On a folder of
   --collection_videos (default 8) videos of --collection_video_seconds (default 90) at 160x90, 10 fps:

   * the first run: the seconds of each step (features, subtitles, corpus, index) and in all;
   * the rerun with nothing new: the fixed cost of a run (each process's start-up and model loading, probing the
     videos, and the corpus, which is rebuilt from every video each run);
   * the rerun after adding one video: its split, and rerun / (first run / number of videos), the rerun's cost in
     videos' shares of the first run (1 if a run cost only its new videos);
   * the start-up alone of the features and subtitles processes (`python -m MODULE --help`: interpreter, imports).

Targets: every Whisper window decoded in one pass of its token budget; the reruns encode only their new videos.
"""
import math
import os
import sys
import time

import numpy as np
import torch

from method.tools.benchmark_extract import moving_gradient, tiny_backbones
from method.tools.benchmark_long_videos import only_entry, run_step, step_env
from utils.errors import ConquerError
from utils.io_utils import save_jsonl
from utils.synthetic_models import WHISPER_NON_WORD_TOKENS, WHISPER_TIMESTAMPS
from utils.synthetic_models import WORDS as MODEL_WORDS
from utils.synthetic_models import numbered_words, save_random_text_model, save_random_whisper

REQUIRES = {"av": "extract", "transformers": "extract"}
SMOKE_BY_DEFAULT = False  # two training runs and three index_videos runs: over a minute even at tiny sizes

TOKENS_PER_WINDOW = 120  # decoded per 30-s window (see the module docstring)
WINDOW_STRIDE_SECONDS = 20  # the pipeline's 30-s windows overlap by 5 s on each side (utils/transcribe.py)
CLIP_LENGTH = 1.5
SECONDS_PER_HOUR = 3600.0

WHISPER_VOCAB_SIZE = 51865  # multilingual Whisper's
WHISPER_ARCHITECTURES = {
    "whisper-small": dict(d_model=768, layers=12, heads=12, ffn_dim=3072),
    "whisper-tiny": dict(d_model=384, layers=4, heads=6, ffn_dim=1536),
    "whisper, test size": dict(d_model=16, layers=1, heads=2, ffn_dim=32),
}
WORDS = MODEL_WORDS[:16]  # of the generated annotations and subtitles

FULL = dict(seconds=40.0, size=(480, 270), fps=25, backbone="resnet152", whispers=["whisper-small", "whisper-tiny"],
            videos=8, video_seconds=90.0, video_size=(160, 90), video_fps=10)
QUICK = dict(seconds=4.0, size=(64, 48), fps=10, backbone=None, whispers=["whisper, test size"],
             videos=2, video_seconds=10.0, video_size=(64, 48), video_fps=4)
TRAINING = dict(train_videos=8, val_videos=4, seconds=12.0, size=(64, 48), fps=4, queries_per_video=2)
FIRST_STAGE_FLAGS = ["--hidden_dim", "16", "--n_epoch", "1", "--num_workers", "0", "--bsz", "8"]
CONQUER_FLAGS = ["--model_config", "config/model_config_tiny.json", "--hidden_dim", "32", "--n_epoch", "1",
                 "--num_workers", "0", "--bsz", "8", "--eval_query_bsz", "8", "--max_vcmr_video", "4",
                 "--no_eval_untrained", "--stop_task", "VR"]
STEPS = ("features", "subtitles", "corpus", "index", "total")
PROCESS_STEPS = {"features": "utils.extract_video_features", "subtitles": "utils.transcribe"}  # index_videos's
TRANSCRIBE_BATCH = 8  # utils.transcribe's --batch_size default, which index_videos runs it with


def add_arguments(parser):
    group = parser.add_argument_group("section collection")
    group.add_argument("--collection_seconds", type=float, default=None,
                       help=f"seconds of the throughput video (default {FULL['seconds']:g}, --quick "
                            f"{QUICK['seconds']:g}); Whisper's windows start every {WINDOW_STRIDE_SECONDS} s, so a "
                            "multiple of that scales to an hour exactly")
    group.add_argument("--collection_videos", type=int, default=None,
                       help=f"videos in the folder indexed end to end (default {FULL['videos']}, --quick "
                            f"{QUICK['videos']}); one more is added for the rerun")
    group.add_argument("--collection_video_seconds", type=float, default=None,
                       help=f"seconds per video of that folder (default {FULL['video_seconds']:g}, --quick "
                            f"{QUICK['video_seconds']:g})")


def section_sizes(args):
    sizes = dict(QUICK if args.quick else FULL)
    for key, flag in (("seconds", "collection_seconds"), ("videos", "collection_videos"),
                      ("video_seconds", "collection_video_seconds")):
        value = getattr(args, flag)
        if value is not None:
            if not value > 0:
                raise ConquerError(f"--{flag} {value}: expected a positive number")
            sizes[key] = value
    return sizes


# ----------------------------------------------------------------------------------------------------
# generated videos and models

def tone_video(path, seconds, size, fps, seed=0):
    """A video of moving colour gradients, with a sound track of a tone whose pitch changes every 3 s."""
    from utils.synthetic_video import write_video

    pitches = np.random.default_rng(seed).uniform(200, 800, size=int(seconds // 3) + 2)
    write_video(path, np.arange(int(round(seconds * fps))) / fps, moving_gradient(size), size=size, audio=True,
                audio_signal=lambda times: 0.3 * np.sin(2 * np.pi * pitches[(times // 3).astype(int)] * times))
    return str(path)


def vocabulary_words():
    """The words of the models' vocabularies: WORDS, then numbered ones up to Whisper's vocabulary size. The text
    encoder knows every word the annotations hold and the Whisper models write."""
    return numbered_words(WORDS, WHISPER_VOCAB_SIZE - WHISPER_NON_WORD_TOKENS)


def save_whisper(folder, architecture, seed=0):
    """A Whisper of the named architecture (WHISPER_ARCHITECTURES) with random weights and a vocabulary of Whisper's
    size, saved for from_pretrained -> folder. Multilingual with English its one language (it detects the language
    and is told to transcribe, as whisper-small is); generation stops after TOKENS_PER_WINDOW tokens."""
    return save_random_whisper(folder, seed=seed, words=vocabulary_words(), max_target_positions=448,
                               max_new_tokens=TOKENS_PER_WINDOW, **WHISPER_ARCHITECTURES[architecture])


# ----------------------------------------------------------------------------------------------------
# 1. throughput per hour of video

class WindowEnding:
    """A logits processor that ends each window's decoding as a real Whisper model ends a window of speech: the
    timestamp of the window's end at token `tokens` - 1 and <|endoftext|> at token `tokens` (tokens counted after
    the decoder prompt, which ends with the task token); other positions are left to the model."""

    def __init__(self, tokenizer, tokens=TOKENS_PER_WINDOW):
        self.task_id = tokenizer.convert_tokens_to_ids("<|transcribe|>")
        self.forced = {tokens - 2: tokenizer.convert_tokens_to_ids(f"<|{(WHISPER_TIMESTAMPS - 1) * 0.02:.2f}|>"),
                       tokens - 1: tokenizer.convert_tokens_to_ids("<|endoftext|>")}

    def __call__(self, input_ids, scores):
        prompt_length = int((input_ids[0] == self.task_id).nonzero()[0, 0]) + 1
        forced = self.forced.get(input_ids.shape[-1] - prompt_length)
        if forced is None:
            return scores
        scores = torch.full_like(scores, -float("inf"))
        scores[:, forced] = 0.0
        return scores


class DecodingCounter:
    """Counts what a Whisper model computes: the windows given to `generate` (the pipeline's batches), the windows
    encoded (a window is encoded once more when its language is detected), the decoder steps, and the most decoder
    rows of a step per window of its batch (the beams)."""

    def __init__(self, model):
        self.model = model
        self.windows = self.encoded = self.steps = self.batch = self.rows = 0
        self.generate = model.generate
        model.generate = self._generate
        self.hooks = [model.model.encoder.register_forward_hook(self._encoded, with_kwargs=True),
                      model.proj_out.register_forward_hook(self._decoded)]

    def _generate(self, *args, **kwargs):
        self.batch = max(self.batch, kwargs["input_features"].shape[0])
        self.windows += kwargs["input_features"].shape[0]
        return self.generate(*args, **kwargs)

    def _encoded(self, module, args, kwargs, output):
        self.encoded += (args[0] if args else kwargs["input_features"]).shape[0]

    def _decoded(self, module, args, output):
        self.steps += 1
        self.rows = max(self.rows, args[0].shape[0])

    def counts(self):
        return dict(windows=self.windows, encoder_passes_per_window=self.encoded / self.windows,
                    beams=self.rows / self.batch, decoder_steps=self.steps)

    def remove(self):
        del self.model.generate  # the instance attribute: the class's method again
        for hook in self.hooks:
            hook.remove()


def per_video_hour(compute_s, video_seconds, load_s, **extra):
    """A throughput measurement -> {"load_s", "compute_s", "video_seconds", "per_video_hour_s" (seconds of compute
    per hour of video), "x_real_time" (video seconds per second of compute), **extra}."""
    return dict(load_s=load_s, compute_s=compute_s, video_seconds=video_seconds,
                per_video_hour_s=compute_s * SECONDS_PER_HOUR / video_seconds, x_real_time=video_seconds / compute_s,
                **extra)


def measure_features(video, seconds, backbone_name, device):
    """{configuration: throughput} of clip features at 3 and 1 frames per clip."""
    from utils.extract_video_features import benchmark_extraction, load_backbone

    start = time.perf_counter()
    backbone = load_backbone(backbone_name, weights="none", device=device)
    load_s = time.perf_counter() - start
    name = os.path.basename(backbone_name)
    runs = {}
    for frames_per_clip in (3, 1):
        result = benchmark_extraction([video], [backbone], clip_length=CLIP_LENGTH, frames_per_clip=frames_per_clip,
                                      num_workers=2, device=device)
        runs[f"features: {name}, {frames_per_clip} frame{'s' * (frames_per_clip > 1)}/clip"] = per_video_hour(
            result["seconds"], seconds, load_s, frames_per_clip=frames_per_clip, frames=result["frames"])
    return runs


def measure_subtitles(video, seconds, architecture, folder, device):
    """The throughput of transcribing `video` with a Whisper of `architecture` saved in `folder`."""
    from transformers import LogitsProcessorList

    from utils.transcribe import load_recognizer, transcribe_videos

    start = time.perf_counter()
    recognizer = load_recognizer(folder, device=device, batch_size=TRANSCRIBE_BATCH)
    load_s = time.perf_counter() - start
    recognizer.generate_kwargs["logits_processor"] = LogitsProcessorList([WindowEnding(recognizer.pipeline.tokenizer)])
    counter = DecodingCounter(recognizer.pipeline.model)
    try:
        summary = transcribe_videos([video], os.path.join(folder, "subtitles.jsonl"), recognizer)
    finally:
        counter.remove()
    if summary.failed or summary.audio_seconds <= 0:
        raise ConquerError(f"collection section: {video} was not transcribed ({summary.failed})")
    return per_video_hour(summary.seconds, seconds, load_s, tokens_per_window=TOKENS_PER_WINDOW, **counter.counts())


def measure_throughput(sizes, device, folder):
    os.makedirs(folder)
    video = tone_video(os.path.join(folder, "throughput.mp4"), sizes["seconds"], sizes["size"], sizes["fps"])
    backbone = sizes["backbone"] or tiny_backbones(folder)[0]
    runs = measure_features(video, sizes["seconds"], backbone, device)
    for architecture in sizes["whispers"]:
        model_folder = save_whisper(os.path.join(folder, architecture.replace(" ", "_").replace(",", "")),
                                    architecture)
        runs[f"subtitles: {architecture}, beam search"] = measure_subtitles(video, sizes["seconds"], architecture,
                                                                           model_folder, device)
    return dict(video_seconds=sizes["seconds"], video_size=list(sizes["size"]), video_fps=sizes["fps"], runs=runs)


# ----------------------------------------------------------------------------------------------------
# 2. index_videos end to end

def training_corpus(folder, models, rng):
    """Generated annotated videos, their features (the tiny ResNet) and subtitles -> the corpus's
    (data config, options.json) paths."""
    from utils.build_corpus import build_corpus
    from utils.extract_video_features import main as extract_main

    videos = os.path.join(folder, "videos")
    os.makedirs(videos)
    splits = {"train": TRAINING["train_videos"], "val": TRAINING["val_videos"]}
    names = {split: [f"{split}_{i}" for i in range(n)] for split, n in splits.items()}
    for i, name in enumerate(names["train"] + names["val"]):
        tone_video(os.path.join(videos, f"{name}.mp4"), TRAINING["seconds"], TRAINING["size"], TRAINING["fps"], seed=i)
    features = os.path.join(folder, "features")
    status = extract_main(["--videos", videos, "--out_dir", features, "--backbones", models["resnet"], "--weights",
                           "none", "--device", "cpu", "--num_workers", "1"])
    if status != 0:
        raise ConquerError(f"collection section: extracting the training videos' features failed (status {status})")
    annotations, subtitles, desc_id = {}, [], 0
    for split, split_names in names.items():
        rows = []
        for name in split_names:
            for _ in range(TRAINING["queries_per_video"]):
                start = float(rng.integers(0, int(TRAINING["seconds"]) - 3))
                rows.append(dict(desc_id=desc_id, desc=" ".join(rng.choice(WORDS, size=5)), vid_name=name,
                                 duration=TRAINING["seconds"], ts=[start, start + 3.0]))
                desc_id += 1
            subtitles.append(dict(vid_name=name, sub=[dict(text=" ".join(rng.choice(WORDS, size=4)), start=t,
                                                           end=t + 2.0) for t in (1.0, 5.0, 9.0)]))
        annotations[split] = os.path.join(folder, f"{split}.jsonl")
        save_jsonl(rows, annotations[split])
    save_jsonl(subtitles, os.path.join(folder, "subtitles.jsonl"))
    corpus = os.path.join(folder, "corpus")
    summary = build_corpus(corpus, annotation_format="tvr", annotations=annotations, video_features=[features],
                           subtitles=os.path.join(folder, "subtitles.jsonl"), text_encoder=models["text"],
                           text_encoder_device="cpu", dset_name="collection", video_dir=videos, progress=False)
    return summary["data_config"], summary["options"]


def train_runs(folder, models, rng):
    """A first-stage and a CONQUER run trained for 1 epoch on a generated corpus -> (first stage, CONQUER) run dirs."""
    data_config, options = training_corpus(folder, models, rng)
    logs, results = os.path.join(folder, "logs"), os.path.join(folder, "results")
    os.makedirs(logs)
    env = step_env(1)
    run_step("train_first_stage", ["bash", "scripts/train_first_stage.sh", "fs", "cpu", "--config", options,
                                   "--dataset_config", data_config, "--results_root", os.path.join(results, "fs")]
             + FIRST_STAGE_FLAGS, logs, env)
    first_stage = only_entry(os.path.join(results, "fs"))
    run_step("rank_first_stage", ["bash", "scripts/rank_first_stage.sh", first_stage, "cpu"], logs, env)
    ranked_config = os.path.join(first_stage, "first_stage_ranklists", "data_config.json")
    run_step("train_conquer", ["bash", "scripts/train.sh", "conquer", "cpu", "--config", options, "--dataset_config",
                               ranked_config, "--results_root", os.path.join(results, "conquer")] + CONQUER_FLAGS,
             logs, env)
    return first_stage, only_entry(os.path.join(results, "conquer"))


def index_run(videos, out_dir, runs, models, device):
    """One index_videos run -> {"seconds": {step: seconds, as index_videos records them}, "n_encoded",
    "videos_indexed"}."""
    from method.index_videos import index_videos

    gpu = "cpu" if device.type == "cpu" else str(device.index or 0)
    summary = index_videos(videos, out_dir, *runs, gpu=gpu, whisper_model=models["whisper"])
    if summary["exit_status"] != 0:
        raise ConquerError(f"collection section: index_videos left videos out: {summary['left_out']}")
    return dict(seconds=dict(summary["seconds"]), n_encoded=summary["n_encoded"],
                videos_indexed=summary["videos_indexed"])


def startup_seconds(log_dir):
    """{step: wall seconds of `python -m MODULE --help`} for the steps index_videos runs as processes of their own:
    the start-up (interpreter and imports) that each of them pays in every run."""
    os.makedirs(log_dir)
    return {step: run_step(f"{step}_help", [sys.executable, "-m", module, "--help"], log_dir, step_env(1))
            for step, module in PROCESS_STEPS.items()}


def rerun_summary(first, unchanged, added, n_videos):
    """The rerun after adding one video, against the first run of n_videos videos and the rerun with nothing new:
    {"rerun_vs_per_video_share": added total / (first total / n_videos), "one_video": {step: added - unchanged}}
    (the added video's own seconds per step, with the fixed costs taken out)."""
    return dict(rerun_vs_per_video_share=added["seconds"]["total"] / (first["seconds"]["total"] / n_videos),
                one_video={step: added["seconds"][step] - unchanged["seconds"][step] for step in STEPS})


def measure_index(sizes, device, folder):
    rng = np.random.default_rng(0)
    models = dict(resnet=tiny_backbones(folder)[0],
                  whisper=save_whisper(os.path.join(folder, "whisper"), "whisper, test size"),
                  text=save_random_text_model(os.path.join(folder, "text_encoder"), words=vocabulary_words(),
                                              intermediate_size=32, max_positions=130))
    start = time.perf_counter()
    runs = train_runs(os.path.join(folder, "training"), models, rng)
    training_s = time.perf_counter() - start

    videos, out_dir = os.path.join(folder, "collection"), os.path.join(folder, "index")
    os.makedirs(videos)
    for i in range(sizes["videos"] + 1):
        name = "added" if i == sizes["videos"] else f"video_{i}"
        tone_video(os.path.join(folder if name == "added" else videos, f"{name}.mp4"), sizes["video_seconds"],
                   sizes["video_size"], sizes["video_fps"], seed=100 + i)
    first = index_run(videos, out_dir, runs, models, device)
    unchanged = index_run(videos, out_dir, runs, models, device)
    os.replace(os.path.join(folder, "added.mp4"), os.path.join(videos, "added.mp4"))
    added = index_run(videos, out_dir, runs, models, device)
    return dict(n_videos=sizes["videos"], video_seconds=sizes["video_seconds"], video_size=list(sizes["video_size"]),
                video_fps=sizes["video_fps"], training_s=training_s, first=first, unchanged=unchanged, added=added,
                startup_s=startup_seconds(os.path.join(folder, "startup_logs")),
                **rerun_summary(first, unchanged, added, sizes["videos"]))


# ----------------------------------------------------------------------------------------------------
# section interface

def run(args):
    """-> {"throughput": {...}, "index": {...}, "ratios", "targets"}."""
    sizes = section_sizes(args)
    folder = os.path.join(args.work_dir, "collection")
    throughput = measure_throughput(sizes, args.device, os.path.join(folder, "throughput"))
    index = measure_index(sizes, args.device, os.path.join(folder, "index_videos"))
    one_pass = all(run["decoder_steps"] == math.ceil(run["windows"] / TRANSCRIBE_BATCH) * (1 + TOKENS_PER_WINDOW)
                   for run in throughput["runs"].values() if "windows" in run)
    encoded = [index[key]["n_encoded"] for key in ("first", "unchanged", "added")]
    return dict(throughput=throughput, index=index,
                ratios={"index_videos rerun with one new video / a video's share of the first run":
                        index["rerun_vs_per_video_share"]},
                targets={"every Whisper window decoded in one pass of its token budget": one_pass,
                         "index_videos reruns encode only the new videos": encoded == [sizes["videos"], 0, 1]})


def table_rows(results):
    throughput, index = results["throughput"], results["index"]
    width, height = throughput["video_size"]
    rows = [f"collection: throughput on a generated {throughput['video_seconds']:g} s, {width}x{height}, "
            f"{throughput['video_fps']} fps video with sound; random weights, real architectures",
            "{:<46}{:>9}{:>12}{:>16}{:>13}".format("", "load s", "compute s", "s / video hour", "x real time")]
    for name, run in throughput["runs"].items():
        rows.append("{:<46}{:>9.1f}{:>12.1f}{:>16.0f}{:>13.2f}".format(name, run["load_s"], run["compute_s"],
                                                                      run["per_video_hour_s"], run["x_real_time"]))
        if "windows" in run:
            rows.append(f"{'':4}{run['windows']} windows of {run['tokens_per_window']} tokens, {run['beams']:g} beams, "
                        f"encoded {run['encoder_passes_per_window']:g}x each (language detection), "
                        f"{run['decoder_steps']} decoder steps")
    width, height = index["video_size"]
    rows += ["", f"index_videos, tiny models (runs trained here in {index['training_s']:.0f} s), "
                 f"{index['n_videos']} videos of {index['video_seconds']:g} s at {width}x{height}, "
                 f"{index['video_fps']} fps; seconds per step",
             "{:<40}".format("") + "".join(f"{step:>11}" for step in STEPS)]
    for key, label in (("first", f"first run, {index['n_videos']} videos"), ("unchanged", "rerun, nothing new"),
                       ("added", "rerun, one video added")):
        rows.append(f"{label:<40}" + "".join(f"{index[key]['seconds'][step]:>11.1f}" for step in STEPS))
    rows.append(f"{'  the added video alone (difference)':<40}"
                + "".join(f"{index['one_video'][step]:>11.1f}" for step in STEPS))
    rows.append("  in the fixed cost, the start-up of each process (python -m MODULE --help): " + ", ".join(
        f"{step} {seconds:.1f} s" for step, seconds in index["startup_s"].items()))
    rows.append(f"  rerun with one new video / a video's share of the first run: "
                f"{index['rerun_vs_per_video_share']:.2f} (1 if a run cost only its new videos); encoded: "
                f"{index['first']['n_encoded']}, {index['unchanged']['n_encoded']}, {index['added']['n_encoded']}")
    return rows
