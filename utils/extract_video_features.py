"""From video files to clip features: `<out_dir>/<video file stem>.npy`, float32 (n_clips, D).

    python -m utils.extract_video_features --videos DIR_OR_LIST [...] --out_dir DIR --clip_length 1.5 \\
        --backbones resnet152 [clip-vit-b32 ...] [--weights none] [--device cuda --dtype fp16]

Each video is cut into n_clips = ceil(duration / clip_length) clips (the last one may be shorter);
`frames_per_clip` frames per clip (`--fps` frames per second of video, or `--frames_per_clip`) are decoded
on that grid (utils/video_decoding.py), resized and normalised the way each backbone was trained, embedded
one by one by each 2D image backbone and mean-pooled per clip. With several backbones, their clip features
are concatenated in the order given, each L2-normalised first when `--l2_normalize` is set (row / (norm + 1e-5),
the corpus builder's and the video store's formula).

Backbones are `transformers` vision models: ResNet (`ResNetModel`, the globally pooled last stage) and the
CLIP image encoder (`CLIPVisionModelWithProjection`, the projected image embedding). `--backbones` takes the
short names in BACKBONE_ALIASES, any hub model id or a local model folder. `--weights none` builds the same
architecture with seeded random weights; the short names then need no network at all (their architecture
hyper-parameters are in OFFLINE_CONFIGS), for tests and smoke runs.

Decoding runs in `--num_workers` threads while the main thread runs the models on chunks of clips, so memory
holds a few chunks, whatever the videos' lengths. Each finished video is written atomically; a rerun skips
the videos whose file exists with the right shape and dtype (a truncated or stale one is redone). A file
that cannot be decoded is reported by name and skipped; the exit status is then 1 (2 for a bad command
line, 0 when every video has its features).
"""
import argparse
import glob
import logging
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm

from utils.corpus_formats import l2_normalize_rows
from utils.errors import ConquerError, run_cli
from utils.io_utils import atomic_write, remove_stale_temp_files
from utils.video_decoding import VIDEO_EXTENSIONS, VideoDecodeError, count_clips, iter_clip_chunks, probe_duration

logger = logging.getLogger(__name__)

BACKBONE_ALIASES = {
    "resnet18": "microsoft/resnet-18",
    "resnet50": "microsoft/resnet-50",
    "resnet152": "microsoft/resnet-152",
    "clip-vit-b32": "openai/clip-vit-base-patch32",
}
# The architectures of the aliased models, so that `--weights none` builds them without the network.
OFFLINE_CONFIGS = {
    "microsoft/resnet-18": ("resnet", dict(depths=[2, 2, 2, 2], layer_type="basic", hidden_sizes=[64, 128, 256, 512],
                                           embedding_size=64)),
    "microsoft/resnet-50": ("resnet", dict(depths=[3, 4, 6, 3], layer_type="bottleneck",
                                           hidden_sizes=[256, 512, 1024, 2048], embedding_size=64)),
    "microsoft/resnet-152": ("resnet", dict(depths=[3, 8, 36, 3], layer_type="bottleneck",
                                            hidden_sizes=[256, 512, 1024, 2048], embedding_size=64)),
    "openai/clip-vit-base-patch32": ("clip_vision_model", dict(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=32,
        image_size=224, projection_dim=512, hidden_act="quick_gelu")),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
RESNET_CROP_FRACTION = 0.875  # resize the shorter side to 224 / 0.875 = 256, then crop 224, as ResNets were evaluated
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ExtractionError(ConquerError):
    """Bad extraction settings or inputs; the message names the flag or file."""


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to `resize_shorter` (bicubic, antialiased), centre-crop a `crop` square
    (`None`: keep the whole frame), scale to [0, 1] and normalise with `mean` and `std` per channel."""
    resize_shorter: int
    crop: int | None
    mean: tuple
    std: tuple


@dataclass
class Backbone:
    """A 2D image model: `embed` maps (N, 3, S, S) preprocessed frames to (N, dim) features."""
    name: str
    model: torch.nn.Module
    preprocessing: Preprocessing
    dim: int

    def embed(self, pixels):
        """pixels: (N, 3, S, S) on the model's device and dtype -> (N, dim) float32."""
        output = self.model(pixel_values=pixels)
        features = output.image_embeds if hasattr(output, "image_embeds") else output.pooler_output.flatten(1)
        return features.float()


@dataclass
class ExtractionSummary:
    written: list = field(default_factory=list)    # video paths whose features were computed now
    existing: list = field(default_factory=list)   # video paths skipped: complete features already there
    failed: list = field(default_factory=list)     # (video path, reason): could not be decoded
    frames: int = 0                                # frames embedded (per backbone)
    seconds: float = 0.0


def preprocess_frames(frames, preprocessing):
    """frames: (N, H, W, 3) uint8 tensor -> (N, 3, S, S') float32, normalised for one backbone.

    The resized pixels are rounded to integers like an 8-bit image, so the result matches the `transformers`
    image processors (which resize 8-bit PIL images) up to interpolation rounding.
    """
    pixels = frames.permute(0, 3, 1, 2).float()
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_short, new_long = preprocessing.resize_shorter, int(preprocessing.resize_shorter * long / short)
    size = (new_short, new_long) if height <= width else (new_long, new_short)
    pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
    pixels = pixels.round_().clamp_(0, 255)
    if preprocessing.crop is not None:
        top, left = (size[0] - preprocessing.crop) // 2, (size[1] - preprocessing.crop) // 2
        pixels = pixels[:, :, top:top + preprocessing.crop, left:left + preprocessing.crop]
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return ((pixels / 255.0 - mean) / std).contiguous()


def load_backbone(name, weights="pretrained", seed=0, device="cpu", dtype=torch.float32, full_frame=False):
    """A Backbone from a short name, hub id or local folder; `weights="none"`: seeded random weights.

    full_frame: ResNets see the whole frame, shorter side resized to 224, instead of a 224 centre crop.
    """
    model_id = BACKBONE_ALIASES.get(name, name)
    try:
        config = _offline_config(model_id) if weights == "none" else None
        config = config or transformers.AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as e:
        raise ExtractionError(f"--backbones {name}: cannot load the model config of '{model_id}': {e}") from None
    if config.model_type == "clip":  # a whole CLIP model: keep its image tower and projection
        config.vision_config.projection_dim = config.projection_dim
        config = config.vision_config
    if config.model_type == "resnet":
        model_class, dim = transformers.ResNetModel, config.hidden_sizes[-1]
        crop = 224
        preprocessing = Preprocessing(crop if full_frame else int(crop / RESNET_CROP_FRACTION),
                                      None if full_frame else crop, IMAGENET_MEAN, IMAGENET_STD)
    elif config.model_type == "clip_vision_model":
        if full_frame:
            raise ExtractionError(f"--full_frame: {name} is a CLIP image encoder, which needs square "
                                  f"{config.image_size}px crops; use it with ResNet backbones only")
        model_class, dim = transformers.CLIPVisionModelWithProjection, config.projection_dim
        preprocessing = Preprocessing(config.image_size, config.image_size, CLIP_MEAN, CLIP_STD)
    else:
        raise ExtractionError(f"--backbones {name}: model type '{config.model_type}' is not supported; "
                              f"expected a ResNet or a CLIP (vision) model")
    if weights == "none":
        torch.manual_seed(seed)
        model = model_class(config)
    else:
        try:
            model = model_class.from_pretrained(model_id)
        except (OSError, ValueError) as e:
            raise ExtractionError(f"--backbones {name}: cannot load the weights of '{model_id}': {e}") from None
    model = model.to(device=device, dtype=dtype).eval()
    return Backbone(name, model, preprocessing, dim)


def _offline_config(model_id):
    if model_id in OFFLINE_CONFIGS:
        model_type, hyper_parameters = OFFLINE_CONFIGS[model_id]
        return transformers.AutoConfig.for_model(model_type, **hyper_parameters)
    return None


def list_videos(sources):
    """Video paths from folders (their files with a video extension, sorted), list files (.txt: one path a
    line, relative to the list's folder) and video files, in the order given."""
    videos = []
    for source in sources:
        if os.path.isdir(source):
            videos += sorted(p for p in glob.glob(os.path.join(source, "*"))
                             if p.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(p))
        elif source.endswith(".txt") and os.path.isfile(source):
            with open(source) as f:
                lines = [line.strip() for line in f if line.strip()]
            videos += [os.path.join(os.path.dirname(source), line) for line in lines]
        elif os.path.isfile(source):
            videos.append(source)
        else:
            raise ExtractionError(f"--videos: '{source}' is neither a folder, a .txt list nor a file")
    stems = {}
    for path in videos:
        stems.setdefault(video_stem(path), []).append(path)
    clashes = [paths for paths in stems.values() if len(paths) > 1]
    if clashes:
        raise ExtractionError(f"--videos: videos would share one output file (same name without extension): "
                              f"{clashes[0]}" + (f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""))
    return videos


def video_stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def has_complete_features(feature_path, n_clips, dim):
    """True if `feature_path` is a readable float32 (n_clips, dim) .npy file."""
    try:
        features = np.load(feature_path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return features.dtype == np.float32 and features.shape == (n_clips, dim)


def extract_features(videos, out_dir, backbones, clip_length=1.5, frames_per_clip=3, batch_clips=32,
                     num_workers=2, l2_normalize=False, device="cpu", dtype=torch.float32, overwrite=False):
    """Write `<out_dir>/<stem>.npy` (n_clips, sum of backbone dims) float32 for each video; return an
    ExtractionSummary. Only one process may write into `out_dir` at a time."""
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temp_files(out_dir)
    dim = sum(b.dim for b in backbones)
    summary = ExtractionSummary()
    pending = []  # (video path, n_clips)
    for path in videos:
        try:
            n_clips = count_clips(probe_duration(path), clip_length)
        except VideoDecodeError as e:
            _report_failure(summary, path, e)
            continue
        if not overwrite and has_complete_features(_feature_path(out_dir, path), n_clips, dim):
            summary.existing.append(path)
        else:
            pending.append((path, n_clips))
    if summary.existing:
        logger.info("%d of %d videos already have their features in %s", len(summary.existing), len(videos), out_dir)

    preprocessings = list(dict.fromkeys(b.preprocessing for b in backbones))
    chunks = queue.Queue(maxsize=2 * num_workers)  # bounded: decoders wait for the models
    stop = threading.Event()
    clip_features = {i: [] for i in range(len(pending))}
    unfinished = len(pending)
    bar = tqdm(total=len(pending), unit="video", desc="extracting")
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        for i, (path, _) in enumerate(pending):
            pool.submit(_decode_video, i, path, clip_length, frames_per_clip, batch_clips, preprocessings,
                        chunks, stop)
        try:
            while unfinished:
                i, item = chunks.get()
                path, n_clips = pending[i]
                if isinstance(item, list):  # pixels of the video's next chunk of clips
                    clip_features[i].append(_embed_chunk(item, backbones, preprocessings, frames_per_clip,
                                                         l2_normalize, device, dtype))
                    summary.frames += len(item[0])
                    continue
                if isinstance(item, VideoDecodeError):
                    _report_failure(summary, path, item)
                    del clip_features[i]
                elif isinstance(item, BaseException):
                    raise item
                else:  # None: the video is decoded to the end
                    features = np.concatenate(clip_features.pop(i))
                    if features.shape != (n_clips, dim):
                        raise RuntimeError(f"{path}: {features.shape} features, expected {(n_clips, dim)}")
                    with atomic_write(_feature_path(out_dir, path)) as f:
                        np.save(f, features)
                    summary.written.append(path)
                unfinished -= 1
                bar.update(1)
                bar.set_postfix(frames_per_s=f"{summary.frames / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        finally:
            stop.set()
            pool.shutdown(cancel_futures=True)
            bar.close()
    summary.seconds = time.perf_counter() - started
    if summary.failed:
        logger.warning("%d of %d videos could not be decoded and have no features: %s", len(summary.failed),
                       len(videos), ", ".join(path for path, _ in summary.failed))
    return summary


def _feature_path(out_dir, video_path):
    return os.path.join(out_dir, video_stem(video_path) + ".npy")


def _report_failure(summary, path, error):
    logger.warning("skipped: %s", error)
    summary.failed.append((path, str(error)))


def _decode_video(index, path, clip_length, frames_per_clip, batch_clips, preprocessings, chunks, stop):
    """Worker: put (index, per-preprocessing pixel tensors) for each chunk of clips, then (index, None);
    (index, error) if decoding fails."""
    try:
        for chunk in iter_clip_chunks(path, clip_length, frames_per_clip, batch_clips):
            frames = torch.from_numpy(chunk.frames.reshape(-1, *chunk.frames.shape[2:]))
            pixels = [preprocess_frames(frames, p) for p in preprocessings]
            if not _put(chunks, (index, pixels), stop):
                return
        _put(chunks, (index, None), stop)
    except BaseException as e:  # reported in the main thread: a decode failure skips the video, others stop
        _put(chunks, (index, e), stop)


def _put(chunks, item, stop):
    """Queue `item` unless the main thread has stopped; the bounded queue holds decoders back."""
    while not stop.is_set():
        try:
            chunks.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


@torch.inference_mode()
def _embed_chunk(pixels, backbones, preprocessings, frames_per_clip, l2_normalize, device, dtype):
    """pixels[j]: (n_clips * frames_per_clip, 3, S, S) for preprocessings[j] -> (n_clips, D) float32 numpy."""
    per_backbone = []
    for backbone in backbones:
        frames = pixels[preprocessings.index(backbone.preprocessing)].to(device=device, dtype=dtype)
        features = backbone.embed(frames)  # (n_frames, dim)
        clip = features.view(-1, frames_per_clip, backbone.dim).mean(dim=1).cpu().numpy()  # (n_clips, dim)
        per_backbone.append(l2_normalize_rows(clip) if l2_normalize else clip)
    return np.concatenate(per_backbone, axis=-1)


def benchmark_extraction(videos, backbones, **options):
    """Time `extract_features` on `videos` (paths) with loaded `backbones`, into a temporary folder.
    Returns {"videos", "frames", "seconds", "videos_per_s", "frames_per_s"}."""
    with tempfile.TemporaryDirectory() as out_dir:
        summary = extract_features(videos, out_dir, backbones, **options)
    return {"videos": len(summary.written), "frames": summary.frames, "seconds": summary.seconds,
            "videos_per_s": len(summary.written) / summary.seconds, "frames_per_s": summary.frames / summary.seconds}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", nargs="+", required=True,
                        help="folders of video files, .txt lists of video paths (one a line), or video files")
    parser.add_argument("--out_dir", required=True, help="folder of <video stem>.npy files; a rerun resumes")
    parser.add_argument("--clip_length", type=float, default=1.5, help="seconds per clip (1.5 as in TVR)")
    parser.add_argument("--backbones", nargs="+", default=["resnet152"],
                        help=f"{', '.join(BACKBONE_ALIASES)}, a transformers hub id or a local model folder "
                             f"(ResNet or CLIP); several: features concatenated in this order")
    parser.add_argument("--weights", choices=["pretrained", "none"], default="pretrained",
                        help="none: the same architectures with seeded random weights (no download for the "
                             "short names)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights of --weights none")
    parser.add_argument("--fps", type=float, default=2.0,
                        help="frames embedded per second of video: round(fps * clip_length) per clip, at least 1")
    parser.add_argument("--frames_per_clip", type=int, default=None, help="frames per clip; overrides --fps")
    parser.add_argument("--l2_normalize", action="store_true",
                        help="L2-normalise each backbone's clip features before concatenating them")
    parser.add_argument("--full_frame", action="store_true",
                        help="ResNets see the whole frame (shorter side 224) instead of a 224 centre crop")
    parser.add_argument("--batch_clips", type=int, default=32, help="clips per model batch")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="video decoding threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (fp16/bf16 on GPU)")
    parser.add_argument("--overwrite", action="store_true", help="recompute videos whose features exist")
    args = parser.parse_args(argv)
    if args.clip_length <= 0:
        raise ExtractionError(f"--clip_length {args.clip_length}: expected > 0 seconds")
    if args.frames_per_clip is None:
        if args.fps <= 0:
            raise ExtractionError(f"--fps {args.fps}: expected > 0")
        args.frames_per_clip = max(1, round(args.fps * args.clip_length))
    elif args.frames_per_clip < 1:
        raise ExtractionError(f"--frames_per_clip {args.frames_per_clip}: expected >= 1")
    for flag in ["batch_clips", "num_workers"]:
        if getattr(args, flag) < 1:
            raise ExtractionError(f"--{flag} {getattr(args, flag)}: expected >= 1")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    videos = list_videos(args.videos)
    if not videos:
        raise ExtractionError(f"--videos {' '.join(args.videos)}: no video files found")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ExtractionError(f"--device {args.device}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExtractionError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    dtype = DTYPES[args.dtype]
    backbones = [load_backbone(name, args.weights, args.seed, device, dtype, args.full_frame)
                 for name in args.backbones]
    logger.info("%d videos, %d frames per %.2f s clip, features: %s", len(videos), args.frames_per_clip,
                args.clip_length, " + ".join(f"{b.name} {b.dim}" for b in backbones))
    summary = extract_features(videos, args.out_dir, backbones, args.clip_length, args.frames_per_clip,
                               args.batch_clips, args.num_workers, args.l2_normalize, device, dtype, args.overwrite)
    logger.info("%d videos written, %d already there, %d not decodable; %.1f videos/s, %.1f frames/s",
                len(summary.written), len(summary.existing), len(summary.failed),
                len(summary.written) / summary.seconds, summary.frames / summary.seconds)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
