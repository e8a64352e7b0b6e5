"""Benchmark section `extract`: video feature extraction speed (utils.extract_video_features) in videos/s and
embedded frames/s, on synthetic H.264 videos, for tiny random backbones (the tests' sizes: decoding-bound)
and for ResNet-18 with random weights at 224 px (model-bound on a CPU).

    python -m method.tools.benchmark --sections extract [--extract_videos 4 --extract_seconds 20]
"""
import os

import numpy as np

REQUIRES = {"av": "extract", "transformers": "extract"}
FULL = dict(videos=4, seconds=20.0, fps=25, size=(480, 270))
QUICK = dict(videos=2, seconds=3.0, fps=10, size=(64, 48))


def add_arguments(parser):
    group = parser.add_argument_group("section extract")
    group.add_argument("--extract_videos", type=int, default=None,
                       help=f"synthetic videos (default {FULL['videos']}, --quick {QUICK['videos']})")
    group.add_argument("--extract_seconds", type=float, default=None,
                       help=f"seconds per video (default {FULL['seconds']:g}, --quick {QUICK['seconds']:g})")


def moving_gradient(size):
    """Frame at time t: colour gradients sliding with t (cheap to encode, every frame different)."""
    width, height = size
    x, y = np.meshgrid(np.arange(width), np.arange(height))

    def frame_at(t):
        shift = int(40 * t)
        return np.stack([(x + shift) % 256, (y + shift) % 256, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    return frame_at


def tiny_backbones(folder):
    """Local folders of a tiny ResNet and a tiny CLIP image encoder config (random weights)."""
    from transformers import CLIPVisionConfig, ResNetConfig
    resnet, clip = os.path.join(folder, "tiny_resnet"), os.path.join(folder, "tiny_clip")
    ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic").save_pretrained(resnet)
    CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, patch_size=8,
                     image_size=32, projection_dim=12).save_pretrained(clip)
    return [resnet, clip]


def run(args):
    from utils.extract_video_features import benchmark_extraction, load_backbone
    from utils.synthetic_video import write_video

    sizes = QUICK if args.quick else FULL
    n_videos, seconds = args.extract_videos or sizes["videos"], args.extract_seconds or sizes["seconds"]
    folder = os.path.join(args.work_dir, "extract_benchmark")
    os.makedirs(folder)
    videos = [os.path.join(folder, f"video_{i}.mp4") for i in range(n_videos)]
    for path in videos:
        write_video(path, np.arange(int(seconds * sizes["fps"])) / sizes["fps"], moving_gradient(sizes["size"]),
                    size=sizes["size"])
    configurations = {"tiny ResNet + CLIP (test size)": (tiny_backbones(folder), 3),
                      "resnet18, random weights, 224 px": (["resnet18"], 1)}
    if not args.quick:
        configurations["resnet18, random weights, 224 px, 3 frames"] = (["resnet18"], 3)
    runs = {}
    for name, (backbone_names, frames_per_clip) in configurations.items():
        backbones = [load_backbone(b, weights="none", device=args.device) for b in backbone_names]
        runs[name] = dict(benchmark_extraction(videos, backbones, clip_length=1.5, frames_per_clip=frames_per_clip,
                                               num_workers=2, device=args.device), frames_per_clip=frames_per_clip)
    return dict(n_videos=n_videos, video_seconds=seconds, video_size=list(sizes["size"]), video_fps=sizes["fps"],
                runs=runs)


def table_rows(results):
    width, height = results["video_size"]
    lines = [f"feature extraction ({results['n_videos']} synthetic {results['video_seconds']:g} s, "
             f"{results['video_fps']} fps, {width}x{height} H.264 videos, 2 decoding threads)",
             "{:<48}{:>10}{:>12}{:>14}".format("backbone", "frames/clip", "videos/s", "frames/s")]
    for name, run in results["runs"].items():
        lines.append("{:<48}{:>10}{:>12.2f}{:>14.1f}".format(name, run["frames_per_clip"], run["videos_per_s"],
                                                             run["frames_per_s"]))
    return lines
