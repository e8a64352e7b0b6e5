"""From video files to clip features: `<out_dir>/<video file stem>.npy`, float32 (n_clips, D), and the folder's
recipe, `<out_dir>/recipe.json`.

    python -m utils.extract_video_features --videos DIR_OR_LIST [...] --out_dir DIR --clip_length 1.5 \\
        --backbones resnet152 [clip-vit-b32 ...] [--weights none] [--device cuda --dtype fp16]
    python -m utils.extract_video_features --videos ... --out_dir DIR --recipe TRAINED_FEATURES/recipe.json
    torchrun --nproc_per_node 4 -m utils.extract_video_features --videos ... --out_dir DIR --device cuda ...

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

The recipe (utils/provenance.py) is everything that decides what the features mean: clip length, frames per
clip, crop, L2 normalisation, model dtype and each backbone (name, model id or folder, pretrained or seeded
random weights, dim). A folder holds features of one recipe: a run whose recipe differs from the folder's, or
into a folder of feature files without a recipe, is refused before any work, naming the first difference;
`--overwrite` removes the folder's feature files, writes the new recipe and computes every listed video.
`--recipe FILE` (a feature folder's recipe.json under any name, or the folder itself, e.g. the features a model
was trained on) takes every recipe setting from it, so new videos get features comparable with those; only
`--dtype` may still be given.

Decoding runs in `--num_workers` threads while the main thread runs the models on chunks of clips, so memory
holds a few chunks, whatever the videos' lengths. Each finished video is written atomically; a rerun skips
the videos whose file exists with the right shape and dtype (a truncated one is redone). A file that cannot be
decoded is reported by name and skipped; the exit status is then 1 (2 for a bad command line, 0 when every
video has its features).

Under torchrun (any number of processes, GPUs and nodes; the nodes must see the same --out_dir), each process
takes a contiguous share of the videos that still need features, on cuda:LOCAL_RANK with `--device cuda`;
rank 0 prints the summary of all ranks, and every rank exits with status 1 when any video failed.
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

from utils import distributed
from utils.corpus_formats import FEATURE_FILE_EXTENSIONS, l2_normalize_rows
from utils.errors import ConquerError, run_cli
from utils.io_utils import atomic_write, remove_stale_temp_files
from utils.provenance import (RECIPE_FILENAME, RECIPE_FORMAT, ProvenanceError, read_recipe, recipe_difference,
                              write_recipe)
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
WEIGHTS = ("pretrained", "none")
# Defaults of the recipe flags, which are None when not given (a recipe flag and --recipe are exclusive).
RECIPE_FLAG_DEFAULTS = dict(backbones=["resnet152"], weights="pretrained", seed=0, fps=2.0, frames_per_clip=None,
                            clip_length=1.5, l2_normalize=False, full_frame=False)


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


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone as its config alone gives it, before any weights are loaded: enough for the recipe."""
    name: str                # as given (--backbones, or the recipe)
    model_id: str            # the hub id, or the absolute path of a local model folder
    weights: str             # "pretrained" or "none" (seeded random weights)
    seed: int | None         # of the random weights; None for pretrained ones
    model_class: type
    config: object
    preprocessing: Preprocessing
    dim: int

    def recipe_entry(self):
        return dict(name=self.name, model=self.model_id, weights=self.weights, seed=self.seed, dim=self.dim)


def resolve_backbone(name, weights="pretrained", seed=0, full_frame=False, model_id=None):
    """A BackboneSpec from a short name, hub id or local folder (`model_id`, when given, is what is loaded and
    `name` only a label); reads the model config only.

    full_frame: ResNets see the whole frame, shorter side resized to 224, instead of a 224 centre crop.
    """
    model_id = model_id or BACKBONE_ALIASES.get(name, name)
    if os.path.isdir(model_id):  # transformers loads a local folder first, whatever the hub holds
        model_id = os.path.abspath(model_id)
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
    return BackboneSpec(name, model_id, weights, seed if weights == "none" else None, model_class, config,
                        preprocessing, dim)


def build_backbone(spec, device="cpu", dtype=torch.float32):
    """The Backbone of a BackboneSpec: its pretrained weights loaded, or random ones drawn from its seed."""
    if spec.weights == "none":
        torch.manual_seed(spec.seed)
        model = spec.model_class(spec.config)
    else:
        try:
            model = spec.model_class.from_pretrained(spec.model_id)
        except (OSError, ValueError) as e:
            raise ExtractionError(f"--backbones {spec.name}: cannot load the weights of '{spec.model_id}': "
                                  f"{e}") from None
    model = model.to(device=device, dtype=dtype).eval()
    return Backbone(spec.name, model, spec.preprocessing, spec.dim)


def load_backbone(name, weights="pretrained", seed=0, device="cpu", dtype=torch.float32, full_frame=False):
    """A Backbone from a short name, hub id or local folder; `weights="none"`: seeded random weights."""
    return build_backbone(resolve_backbone(name, weights, seed, full_frame), device, dtype)


def feature_recipe(specs, clip_length, frames_per_clip, full_frame, l2_normalize, dtype):
    """The recipe of features made with these settings, as recipe.json holds it (dtype: a key of DTYPES)."""
    return dict(format=RECIPE_FORMAT, clip_length=float(clip_length), frames_per_clip=int(frames_per_clip),
                full_frame=bool(full_frame), l2_normalize=bool(l2_normalize), dtype=dtype,
                backbones=[spec.recipe_entry() for spec in specs], dim=sum(spec.dim for spec in specs))


def feature_files(out_dir):
    """Names of the feature files (.npy / .npz / .pt) in `out_dir`."""
    return sorted(name for name in os.listdir(out_dir)
                  if name.endswith(FEATURE_FILE_EXTENSIONS) and os.path.isfile(os.path.join(out_dir, name)))


def claim_out_dir(out_dir, recipe, overwrite=False):
    """Make `out_dir` the folder of features of `recipe` before any work, or refuse: ExtractionError naming the
    first difference when it holds another recipe, or feature files without one. With `overwrite`, every feature
    file there is removed first (an interrupted run then leaves no file of the old recipe under the new one)."""
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temp_files(out_dir)
    way_out = "choose another --out_dir, or --overwrite to replace them"
    if overwrite:
        for name in feature_files(out_dir):
            os.remove(os.path.join(out_dir, name))
    else:
        try:
            old = read_recipe(out_dir)
        except ProvenanceError as e:
            raise ExtractionError(f"--out_dir {out_dir}: {e}; {way_out}") from None
        if old is None:
            existing = feature_files(out_dir)
            if existing:
                raise ExtractionError(f"--out_dir {out_dir}: holds {len(existing)} feature files but no "
                                      f"{RECIPE_FILENAME}, so their recipe is unknown; {way_out}")
        else:
            difference = recipe_difference(old, recipe)
            if difference:
                raise ExtractionError(f"--out_dir {out_dir}: holds features of another recipe ({difference}); "
                                      f"{way_out}")
            return
    write_recipe(out_dir, recipe)


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
    ExtractionSummary. Only one run may write into `out_dir` at a time.

    Under torchrun (a process group) every rank calls it with the same arguments: the ranks probe a contiguous
    share of `videos` each, then each extracts its contiguous share of the videos that still need features
    (`shard_bounds`), and every rank returns the summary of all ranks.
    """
    started = time.perf_counter()
    distributed.run_on_main(lambda: _prepare_out_dir(out_dir))
    dim = sum(b.dim for b in backbones)
    start, stop = distributed.shard_bounds(len(videos), 1)
    probed = distributed.all_gather_object(_probe(videos[start:stop], out_dir, clip_length, dim, overwrite))
    summary = ExtractionSummary()
    pending = []  # (video path, n_clips), the same list on every rank
    for path, n_clips, state in (entry for share in probed for entry in share):
        if state == "existing":
            summary.existing.append(path)
        elif state == "pending":
            pending.append((path, n_clips))
        else:
            summary.failed.append((path, state))
    if summary.existing and distributed.is_main_process():
        logger.info("%d of %d videos already have their features in %s", len(summary.existing), len(videos),
                    out_dir)
    start, stop = distributed.shard_bounds(len(pending), 1)
    if distributed.is_distributed():
        logger.info("rank %d of %d: extracting videos %d to %d of the %d that need features",
                    distributed.get_rank(), distributed.get_world_size(), start, stop, len(pending))
    share = _extract(pending[start:stop], out_dir, backbones, dim, clip_length, frames_per_clip, batch_clips,
                     num_workers, l2_normalize, device, dtype)
    for written, failed, frames in distributed.all_gather_object(share):
        summary.written += written
        summary.failed += failed
        summary.frames += frames
    summary.seconds = time.perf_counter() - started
    if summary.failed and distributed.is_main_process():
        logger.warning("%d of %d videos could not be decoded and have no features: %s", len(summary.failed),
                       len(videos), ", ".join(path for path, _ in summary.failed))
    return summary


def _prepare_out_dir(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_temp_files(out_dir)


def _probe(videos, out_dir, clip_length, dim, overwrite):
    """[(path, n_clips, "existing" | "pending" | the reason it cannot be decoded)] of `videos`."""
    probed = []
    for path in tqdm(videos, desc="probing", unit="video", disable=not distributed.is_main_process()):
        try:
            n_clips = count_clips(probe_duration(path), clip_length)
        except VideoDecodeError as e:
            logger.warning("skipped: %s", e)
            probed.append((path, None, str(e)))
            continue
        complete = not overwrite and has_complete_features(_feature_path(out_dir, path), n_clips, dim)
        probed.append((path, n_clips, "existing" if complete else "pending"))
    return probed


def _extract(pending, out_dir, backbones, dim, clip_length, frames_per_clip, batch_clips, num_workers, l2_normalize,
             device, dtype):
    """Features of `pending` [(video path, n_clips)] -> (paths written, [(path, reason)] failed, frames embedded)."""
    written, failed, frames = [], [], 0
    preprocessings = list(dict.fromkeys(b.preprocessing for b in backbones))
    chunks = queue.Queue(maxsize=2 * num_workers)  # bounded: decoders wait for the models
    stop = threading.Event()
    clip_features = {i: [] for i in range(len(pending))}
    unfinished = len(pending)
    bar = tqdm(total=len(pending), unit="video", desc="extracting", disable=not distributed.is_main_process())
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
                    frames += len(item[0])
                    continue
                if isinstance(item, VideoDecodeError):
                    logger.warning("skipped: %s", item)
                    failed.append((path, str(item)))
                    del clip_features[i]
                elif isinstance(item, BaseException):
                    raise item
                else:  # None: the video is decoded to the end
                    features = np.concatenate(clip_features.pop(i))
                    if features.shape != (n_clips, dim):
                        raise RuntimeError(f"{path}: {features.shape} features, expected {(n_clips, dim)}")
                    with atomic_write(_feature_path(out_dir, path)) as f:
                        np.save(f, features)
                    written.append(path)
                unfinished -= 1
                bar.update(1)
                bar.set_postfix(frames_per_s=f"{frames / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        finally:
            stop.set()
            pool.shutdown(cancel_futures=True)
            bar.close()
    return written, failed, frames


def _feature_path(out_dir, video_path):
    return os.path.join(out_dir, video_stem(video_path) + ".npy")


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
    """The command line -> args, with the recipe settings filled in from --recipe or the defaults:
    args.backbone_choices [{"name", "model" (None: from the name), "weights", "seed"}], args.given_recipe (the
    --recipe dict or None)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", nargs="+", required=True,
                        help="folders of video files, .txt lists of video paths (one a line), or video files")
    parser.add_argument("--out_dir", required=True,
                        help="folder of <video stem>.npy files and their recipe.json; a rerun resumes")
    parser.add_argument("--recipe", default=None,
                        help="a recipe file (a feature folder's recipe.json, or the folder) whose settings to use: "
                             "the backbones, weights, seed, frames per clip, clip length, L2 normalisation, crop and "
                             "dtype; the flags of those settings are then refused, except --dtype")
    parser.add_argument("--clip_length", type=float, default=None, help="seconds per clip (default: 1.5, as in TVR)")
    parser.add_argument("--backbones", nargs="+", default=None,
                        help=f"{', '.join(BACKBONE_ALIASES)}, a transformers hub id or a local model folder "
                             f"(ResNet or CLIP); several: features concatenated in this order (default: resnet152)")
    parser.add_argument("--weights", choices=WEIGHTS, default=None,
                        help="none: the same architectures with seeded random weights (no download for the "
                             "short names); default: pretrained")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random weights of --weights none "
                                                                "(default: 0)")
    parser.add_argument("--fps", type=float, default=None,
                        help="frames embedded per second of video: round(fps * clip_length) per clip, at least 1 "
                             "(default: 2)")
    parser.add_argument("--frames_per_clip", type=int, default=None, help="frames per clip; overrides --fps")
    parser.add_argument("--l2_normalize", action="store_true", default=None,
                        help="L2-normalise each backbone's clip features before concatenating them")
    parser.add_argument("--full_frame", action="store_true", default=None,
                        help="ResNets see the whole frame (shorter side 224) instead of a 224 centre crop")
    parser.add_argument("--batch_clips", type=int, default=32, help="clips per model batch")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="video decoding threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="under torchrun, cuda means cuda:LOCAL_RANK")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="model dtype (fp16/bf16 on GPU); default: the --recipe's, else fp32")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the folder's feature files and recompute every video (another recipe)")
    args = parser.parse_args(argv)
    if args.recipe:
        _settings_from_recipe(args)
    else:
        for flag, default in RECIPE_FLAG_DEFAULTS.items():
            if getattr(args, flag) is None:
                setattr(args, flag, default)
        args.dtype = args.dtype or "fp32"
        args.given_recipe = None
        args.backbone_choices = [dict(name=name, model=None, weights=args.weights, seed=args.seed)
                                 for name in args.backbones]
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


def _settings_from_recipe(args):
    """Fill the recipe settings of `args` from the --recipe file; a recipe flag given as well is an error."""
    given = next((flag for flag in RECIPE_FLAG_DEFAULTS if getattr(args, flag) is not None), None)
    if given is not None:
        raise ExtractionError(f"--{given} and --recipe {args.recipe}: the recipe sets it; drop --{given} (only "
                              f"--dtype may be given with --recipe)")
    path = args.recipe
    try:
        recipe = read_recipe(path)
    except ProvenanceError as e:
        raise ExtractionError(f"--recipe {e}") from None
    if recipe is None:
        raise ExtractionError(f"--recipe {path}: expected a recipe file or a folder holding a {RECIPE_FILENAME}")

    def value(entry, key, where=""):
        if key not in entry:
            raise ExtractionError(f"--recipe {path}: no {key!r}{where} (a recipe written by "
                                  f"utils.extract_video_features has it)")
        return entry[key]

    for key, types, expected in (("clip_length", (int, float), "a number of seconds"),
                                 ("frames_per_clip", int, "an integer"), ("full_frame", bool, "true or false"),
                                 ("l2_normalize", bool, "true or false")):
        setting = value(recipe, key)
        if not isinstance(setting, types) or (types is not bool and isinstance(setting, bool)):
            raise ExtractionError(f"--recipe {path}: {key} {setting!r}, expected {expected}")
        setattr(args, key, setting)
    args.dtype = args.dtype or value(recipe, "dtype")
    if args.dtype not in DTYPES:
        raise ExtractionError(f"--recipe {path}: dtype {args.dtype!r}, expected one of {list(DTYPES)}")
    backbones = value(recipe, "backbones")
    if not isinstance(backbones, list) or not backbones or not all(isinstance(b, dict) for b in backbones):
        raise ExtractionError(f"--recipe {path}: 'backbones' must be a non-empty list of objects")
    args.backbone_choices = [{key: value(entry, key, f" in backbone {i}") for key in ("name", "model", "weights",
                                                                                   "seed")}
                             for i, entry in enumerate(backbones)]
    for i, choice in enumerate(args.backbone_choices):
        if choice["weights"] not in WEIGHTS or (choice["weights"] == "none" and not isinstance(choice["seed"], int)):
            raise ExtractionError(f"--recipe {path}: backbone {i}: weights {choice['weights']!r} seed "
                                  f"{choice['seed']!r}, expected weights 'pretrained', or 'none' with an integer seed")
    args.given_recipe = recipe


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    videos = list_videos(args.videos)
    if not videos:
        raise ExtractionError(f"--videos {' '.join(args.videos)}: no video files found")
    device = distributed.command_device(args.device, ExtractionError)
    try:
        return _extract_videos(args, videos, device)
    finally:
        distributed.shutdown()


def _extract_videos(args, videos, device):
    dtype = DTYPES[args.dtype]
    specs = [resolve_backbone(choice["name"], choice["weights"], choice["seed"], args.full_frame, choice["model"])
             for choice in args.backbone_choices]
    recipe = feature_recipe(specs, args.clip_length, args.frames_per_clip, args.full_frame, args.l2_normalize,
                            args.dtype)
    if args.given_recipe is not None:
        difference = recipe_difference(args.given_recipe, recipe, ignore=("dtype",))
        if difference:
            raise ExtractionError(f"--recipe {args.recipe}: its backbones now give other features ({difference}); "
                                  f"has a model folder changed?")
    distributed.run_on_main(lambda: claim_out_dir(args.out_dir, recipe, args.overwrite))
    backbones = [build_backbone(spec, device, dtype) for spec in specs]
    if distributed.is_main_process():
        logger.info("%d videos, %d frames per %.2f s clip, features: %s", len(videos), args.frames_per_clip,
                    args.clip_length, " + ".join(f"{b.name} {b.dim}" for b in backbones))
    summary = extract_features(videos, args.out_dir, backbones, args.clip_length, args.frames_per_clip,
                               args.batch_clips, args.num_workers, args.l2_normalize, device, dtype, args.overwrite)
    if distributed.is_main_process():
        logger.info("%d videos written, %d already there, %d not decodable; %.1f videos/s, %.1f frames/s",
                    len(summary.written), len(summary.existing), len(summary.failed),
                    len(summary.written) / summary.seconds, summary.frames / summary.seconds)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
