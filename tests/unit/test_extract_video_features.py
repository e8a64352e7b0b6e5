"""Video feature extraction: synthetic video files (PyAV) through tiny random ResNet and CLIP backbones."""
import os
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, ConvNextImageProcessorPil, ResNetConfig

from utils.extract_video_features import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ExtractionError,
                                          Preprocessing, extract_features, list_videos, load_backbone, main,
                                          preprocess_frames)
from utils.provenance import RECIPE_FORMAT, read_recipe
from utils.synthetic_video import write_video
from utils.video_decoding import iter_clip_chunks, probe_duration

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP_LENGTH = 1.5
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (128, 128, 128)]
VFR_TIMES = np.concatenate([np.arange(0, 1, 0.1), np.arange(1, 2.5, 0.37), [2.6, 2.65, 3.3]])


def colour_per_second(colours=COLOURS, size=(64, 48)):
    return lambda t: np.full((size[1], size[0], 3), colours[int(t)], dtype=np.uint8)


# name: (frame times, duration, writer options). Durations: 4.0 s and 20 / 7 s are not multiples of 1.5 s.
VIDEOS = {
    "with_audio": (np.arange(40) / 10, 4.0, dict(audio=True)),
    "odd_rate": (np.arange(25) / 12.5, 2.0, {}),
    "seven_fps": (np.arange(20) / 7, 20 / 7, {}),
    "variable_rate": (VFR_TIMES, None, {}),
    "rotated": (np.arange(30) / 10, 3.0, dict(rotation=90)),
}


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    for name, (times, _, options) in VIDEOS.items():
        write_video(folder / f"{name}.mp4", times, colour_per_second(), **options)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Local folders of a tiny ResNet and a tiny CLIP image encoder config (random weights: --weights none)."""
    folder = tmp_path_factory.mktemp("models")
    ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic").save_pretrained(
        folder / "resnet")
    CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, patch_size=8,
                     image_size=32, projection_dim=12).save_pretrained(folder / "clip")
    return str(folder / "resnet"), str(folder / "clip")


def load(names, seed=0):
    return [load_backbone(name, weights="none", seed=seed) for name in names]


def extract(videos, out_dir, backbones, **options):
    options = dict(clip_length=CLIP_LENGTH, frames_per_clip=3, batch_clips=2, num_workers=2) | options
    return extract_features(videos, str(out_dir), backbones, **options)


def test_clip_counts_follow_the_durations(video_dir, tiny_models, tmp_path):
    assert main(["--videos", str(video_dir), "--out_dir", str(tmp_path), "--backbones", *tiny_models,
                 "--weights", "none", "--num_workers", "2"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([f"{name}.npy" for name in VIDEOS] + ["recipe.json"])
    for name, (times, duration, _) in VIDEOS.items():
        features = np.load(tmp_path / f"{name}.npy")
        if duration is None:  # variable rate: the last frame lasts one mean frame interval
            duration = times[-1] + (times[-1] - times[0]) / (len(times) - 1)
        assert abs(probe_duration(video_dir / f"{name}.mp4") - duration) < 2e-3
        assert features.dtype == np.float32 and features.shape == (np.ceil(duration / CLIP_LENGTH), 16 + 12), name


@pytest.mark.parametrize("name", list(VIDEOS))
def test_sampled_frames_are_the_frames_on_screen_at_the_grid_times(video_dir, name):
    path = video_dir / f"{name}.mp4"
    with av.open(str(path)) as container:
        decoded = [(float(f.pts * f.time_base), f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    times = np.array([t for t, _ in decoded])
    duration = probe_duration(path)
    n_clips = int(np.ceil(duration / CLIP_LENGTH))
    chunks = list(iter_clip_chunks(path, CLIP_LENGTH, frames_per_clip=2, clips_per_chunk=1))
    assert [c.first_clip for c in chunks] == list(range(n_clips))
    for chunk in chunks:
        clip = chunk.first_clip
        end = min((clip + 1) * CLIP_LENGTH, duration)
        for j, target in enumerate(np.linspace(clip * CLIP_LENGTH, end, 5)[[1, 3]]):
            shown = max(0, np.searchsorted(times, target, side="right") - 1)
            assert chunk.frame_times[0, j] == times[shown]
            if name != "rotated":
                np.testing.assert_array_equal(chunk.frames[0, j], decoded[shown][1])


def test_rotated_video_comes_out_as_displayed(tmp_path):
    left_red_right_blue = np.zeros((48, 64, 3), dtype=np.uint8)
    left_red_right_blue[:, :32] = (255, 0, 0)
    left_red_right_blue[:, 32:] = (0, 0, 255)
    write_video(tmp_path / "phone.mp4", np.arange(5) / 5, lambda t: left_red_right_blue, rotation=90)
    frame = next(iter_clip_chunks(tmp_path / "phone.mp4", 1.0, 1, 1)).frames[0, 0]
    # Turned a quarter counter-clockwise for display: portrait, the left (red) half now at the bottom.
    assert frame.shape == (64, 48, 3)
    assert frame[40:, :, 0].min() > 200 and frame[40:, :, 2].max() < 50
    assert frame[:24, :, 2].min() > 200 and frame[:24, :, 0].max() < 50


def test_clip_features_depend_only_on_their_own_frames(tmp_path, tiny_models):
    changed = list(COLOURS)
    changed[2] = (20, 200, 90)  # second 2 lies in clip 1 = [1.5 s, 3 s) only
    times = np.arange(60) / 10
    for folder in ["a", "b"]:
        os.makedirs(tmp_path / folder)
    write_video(tmp_path / "a" / "v.mp4", times, colour_per_second())
    write_video(tmp_path / "b" / "v.mp4", times, colour_per_second(changed))
    backbones = load(tiny_models)
    extract([str(tmp_path / "a" / "v.mp4")], tmp_path / "out_a", backbones, batch_clips=8)
    extract([str(tmp_path / "b" / "v.mp4")], tmp_path / "out_b", backbones, batch_clips=8)
    a, b = np.load(tmp_path / "out_a" / "v.npy"), np.load(tmp_path / "out_b" / "v.npy")
    assert a.shape == (4, 28)
    np.testing.assert_allclose(np.delete(a, 1, axis=0), np.delete(b, 1, axis=0), rtol=1e-5, atol=1e-6)
    assert np.abs(a[1] - b[1]).max() > 1e-3


def test_two_runs_are_bitwise_equal(video_dir, tiny_models, tmp_path):
    videos = list_videos([str(video_dir)])
    extract(videos, tmp_path / "one", load(tiny_models))
    extract(videos, tmp_path / "two", load(tiny_models), num_workers=1, batch_clips=2)
    for name in VIDEOS:
        assert (tmp_path / "one" / f"{name}.npy").read_bytes() == (tmp_path / "two" / f"{name}.npy").read_bytes()


def test_rerun_computes_only_missing_or_incomplete_files(video_dir, tiny_models, tmp_path):
    videos = list_videos([str(video_dir)])
    backbones = load(tiny_models)
    extract(videos, tmp_path, backbones)
    reference = {name: (tmp_path / f"{name}.npy").read_bytes() for name in VIDEOS}
    # An interrupted run: one video never written, one file cut short, a temporary file left behind.
    os.remove(tmp_path / "odd_rate.npy")
    (tmp_path / "seven_fps.npy").write_bytes(reference["seven_fps"][:200])
    (tmp_path / ".with_audio.npy.abc123.tmp").write_bytes(b"partial")
    untouched = {name: os.stat(tmp_path / f"{name}.npy").st_mtime_ns
                 for name in ["with_audio", "variable_rate", "rotated"]}
    summary = extract(videos, tmp_path, backbones)
    assert sorted(map(os.path.basename, summary.written)) == ["odd_rate.mp4", "seven_fps.mp4"]
    assert sorted(map(os.path.basename, summary.existing)) == ["rotated.mp4", "variable_rate.mp4", "with_audio.mp4"]
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.npy" for name in VIDEOS)
    assert {name: os.stat(tmp_path / f"{name}.npy").st_mtime_ns for name in untouched} == untouched
    assert {name: (tmp_path / f"{name}.npy").read_bytes() for name in VIDEOS} == reference
    # Features of another width (other backbones) are incomplete too.
    summary = extract(videos[:1], tmp_path, backbones[:1])
    first = os.path.basename(videos[0]).replace(".mp4", ".npy")
    assert len(summary.written) == 1 and np.load(tmp_path / first).shape[1] == 16


def test_undecodable_files_are_skipped_named_and_counted(video_dir, tiny_models, tmp_path, caplog):
    videos = tmp_path / "videos"
    shutil.copytree(video_dir, videos)
    (videos / "garbage.mp4").write_bytes(b"not a video" * 100)
    (videos / "cut.mkv").write_bytes((video_dir / "with_audio.mp4").read_bytes()[:2000])
    status = main(["--videos", str(videos), "--out_dir", str(tmp_path / "out"), "--backbones", tiny_models[0],
                   "--weights", "none"])
    assert status == 1
    assert sorted(os.listdir(tmp_path / "out")) == sorted([f"{name}.npy" for name in VIDEOS] + ["recipe.json"])
    summary_line = [r.message for r in caplog.records if "could not be decoded" in r.message]
    assert len(summary_line) == 1 and summary_line[0].startswith("2 of 7 videos")
    assert "garbage.mp4" in summary_line[0] and "cut.mkv" in summary_line[0]


@pytest.mark.parametrize("l2_normalize", [True, False])
def test_several_backbones_concatenate_their_own_features(video_dir, tiny_models, tmp_path, l2_normalize):
    videos = list_videos([str(video_dir)])[:2]
    resnet, clip = load(tiny_models)
    extract(videos, tmp_path / "resnet", [resnet])
    extract(videos, tmp_path / "clip", [clip])
    extract(videos, tmp_path / "both", [resnet, clip], l2_normalize=l2_normalize)
    for video in videos:
        name = os.path.basename(video).replace(".mp4", ".npy")
        parts = [np.load(tmp_path / model / name) for model in ["resnet", "clip"]]
        if l2_normalize:  # the corpus builder's normalisation (norm + 1e-5), one implementation
            parts = [p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-5) for p in parts]
        np.testing.assert_allclose(np.load(tmp_path / "both" / name), np.concatenate(parts, axis=1), rtol=1e-6,
                                   atol=1e-7)


@pytest.mark.parametrize("height, width", [(50, 70), (301, 200)])
def test_preprocessing_matches_the_transformers_image_processors(height, width):
    rng = np.random.default_rng(height)
    smooth = np.cumsum(np.cumsum(rng.normal(size=(height, width, 3)), axis=0), axis=1)
    image = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    frames = torch.from_numpy(image)[None]
    processors = [
        (CLIPImageProcessorPil(), Preprocessing(224, 224, CLIP_MEAN, CLIP_STD)),
        (ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875, image_mean=list(IMAGENET_MEAN),
                                   image_std=list(IMAGENET_STD)), Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD)),
    ]
    for processor, preprocessing in processors:
        expected = processor(images=[image], return_tensors="pt").pixel_values
        ours = preprocess_frames(frames, preprocessing)
        assert ours.shape == expected.shape == (1, 3, 224, 224)
        # At most one 8-bit level apart (bicubic rounding), in units of the normalised pixels.
        levels = (ours - expected).abs() * torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255
        assert levels.max() <= 1.0 + 1e-4 and levels.mean() < 0.5


@pytest.mark.parametrize("name, dim, n_parameters", [
    ("resnet18", 512, 11_176_512),       # torchvision's resnet18 without its 1000-way classifier
    ("resnet152", 2048, 58_143_808),     # torchvision's resnet152 without its classifier
    ("clip-vit-b32", 512, 87_849_216),   # ViT-B/32 image tower: patches, 12 layers of width 768, projection to 512
])
def test_named_backbones_build_offline_with_the_published_architectures(name, dim, n_parameters):
    backbone = load_backbone(name, weights="none", seed=0)
    assert backbone.dim == dim
    assert sum(p.numel() for p in backbone.model.parameters()) == n_parameters


def test_bad_inputs_are_named(tmp_path, tiny_models, video_dir):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ExtractionError, match="model type 'bert' is not supported"):
        load_backbone(str(tmp_path / "bert"), weights="none")
    with pytest.raises(ExtractionError, match="--full_frame"):
        load_backbone(tiny_models[1], weights="none", full_frame=True)
    (tmp_path / "clash").mkdir()
    for name in ["a.mp4", "a.webm"]:
        shutil.copy(video_dir / "odd_rate.mp4", tmp_path / "clash" / name)
    with pytest.raises(ExtractionError, match="share one output file"):
        list_videos([str(tmp_path / "clash")])
    with pytest.raises(ExtractionError, match="--videos: '.*missing'"):
        list_videos([str(tmp_path / "missing")])


def test_the_video_extensions_are_one_list_importable_without_pyav(tmp_path):
    """The extractor, the corpus builder's video names and the search server share utils.video_decoding's list;
    the latter two run in a core install, so the list must import without PyAV."""
    code = ("import sys; sys.modules['av'] = None\n"  # `import av` now fails, as without the extract extras
            "from utils.video_decoding import VIDEO_EXTENSIONS\n"
            "from utils import corpus_formats\n"
            "assert corpus_formats.VIDEO_EXTENSIONS is VIDEO_EXTENSIONS\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    for name in ["a.MOV", "b.3gp", "c.ts", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in list_videos([str(tmp_path)])] == ["a.MOV", "b.3gp", "c.ts"]


def run_main(videos, out_dir, *flags):
    return main(["--videos", *map(str, videos), "--out_dir", str(out_dir), "--num_workers", "1", *flags])


def npy_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if name.endswith(".npy")}


def test_the_recipe_is_written_and_another_recipe_is_refused_before_any_work(video_dir, tiny_models, tmp_path):
    videos = [video_dir / "odd_rate.mp4", video_dir / "rotated.mp4"]
    resnet, clip = tiny_models
    assert run_main(videos, tmp_path / "out", "--backbones", resnet, clip, "--weights", "none", "--seed", "3") == 0
    assert read_recipe(tmp_path / "out") == dict(
        format=RECIPE_FORMAT, clip_length=1.5, frames_per_clip=3, full_frame=False, l2_normalize=False, dtype="fp32",
        backbones=[dict(name=resnet, model=os.path.abspath(resnet), weights="none", seed=3, dim=16),
                   dict(name=clip, model=os.path.abspath(clip), weights="none", seed=3, dim=12)], dim=28)
    written = {name: os.stat(tmp_path / "out" / name).st_mtime_ns for name in npy_bytes(tmp_path / "out")}
    # Same shapes, other features: kept silently before recipes were recorded.
    for flags, difference in [(["--seed", "3", "--frames_per_clip", "2"], "frames_per_clip: 3 -> 2"),
                              (["--seed", "4"], "backbones: .*'seed': 3.* -> .*'seed': 4"),
                              (["--seed", "3", "--dtype", "bf16"], "dtype: 'fp32' -> 'bf16'")]:
        with pytest.raises(ExtractionError, match=rf"--out_dir .*out: holds features of another recipe \({difference}.*"
                                                  r"\); choose another --out_dir, or --overwrite to replace them"):
            run_main(videos, tmp_path / "out", "--backbones", resnet, clip, "--weights", "none", *flags)
    assert {name: os.stat(tmp_path / "out" / name).st_mtime_ns for name in written} == written
    assert read_recipe(tmp_path / "out")["frames_per_clip"] == 3

    # Feature files without a recipe (an older extractor's, or copied in): their recipe is unknown.
    os.makedirs(tmp_path / "no_recipe")
    shutil.copy(tmp_path / "out" / "odd_rate.npy", tmp_path / "no_recipe")
    with pytest.raises(ExtractionError, match=r"no_recipe: holds 1 feature files but no recipe.json, so their "
                                              r"recipe is unknown; choose another --out_dir, or --overwrite"):
        run_main(videos, tmp_path / "no_recipe", "--backbones", resnet, "--weights", "none")
    assert os.listdir(tmp_path / "no_recipe") == ["odd_rate.npy"]


def test_overwrite_replaces_the_features_and_the_recipe(video_dir, tiny_models, tmp_path):
    videos = [video_dir / "odd_rate.mp4", video_dir / "seven_fps.mp4"]
    resnet = tiny_models[0]
    flags = ["--backbones", resnet, "--weights", "none"]
    run_main(videos + [video_dir / "rotated.mp4"], tmp_path / "out", *flags)
    old = npy_bytes(tmp_path / "out")
    assert run_main(videos, tmp_path / "out", *flags, "--frames_per_clip", "1", "--overwrite") == 0
    assert run_main(videos, tmp_path / "fresh", *flags, "--frames_per_clip", "1") == 0
    # The video no longer listed lost its features with their recipe; the others are the new recipe's.
    assert sorted(os.listdir(tmp_path / "out")) == ["odd_rate.npy", "recipe.json", "seven_fps.npy"]
    assert npy_bytes(tmp_path / "out") == npy_bytes(tmp_path / "fresh")
    assert npy_bytes(tmp_path / "out")["odd_rate.npy"] != old["odd_rate.npy"]
    assert read_recipe(tmp_path / "out") == read_recipe(tmp_path / "fresh")


def test_extracting_with_the_recipe_of_a_folder_gives_the_same_features(video_dir, tiny_models, tmp_path):
    videos = [video_dir / "odd_rate.mp4", video_dir / "variable_rate.mp4"]
    resnet, clip = tiny_models
    run_main(videos, tmp_path / "first", "--backbones", clip, resnet, "--weights", "none", "--seed", "5",
             "--clip_length", "1.0", "--frames_per_clip", "2", "--l2_normalize")
    # A recipe file of any name (e.g. saved from a corpus's data config); --dtype alone may accompany --recipe.
    shutil.copy(tmp_path / "first" / "recipe.json", tmp_path / "set0.recipe.json")
    assert run_main(videos, tmp_path / "second", "--recipe", str(tmp_path / "set0.recipe.json"),
                    "--dtype", "fp32") == 0
    first, second = npy_bytes(tmp_path / "first"), npy_bytes(tmp_path / "second")
    assert len(first) == 2 and first == second
    assert np.load(tmp_path / "first" / "odd_rate.npy").shape == (2, 12 + 16)  # 2 s of video, 1 s clips
    assert read_recipe(tmp_path / "second") == read_recipe(tmp_path / "first")
    # The folder itself names its recipe too; a rerun into the first folder is its own recipe: nothing to do.
    assert run_main(videos, tmp_path / "first", "--recipe", str(tmp_path / "first")) == 0
    assert npy_bytes(tmp_path / "first") == first

    for flag in (["--clip_length", "1.5"], ["--weights", "none"], ["--l2_normalize"], ["--fps", "4"]):
        with pytest.raises(ExtractionError, match=rf"^{flag[0]} and --recipe .*: the recipe sets it; drop {flag[0]}"):
            run_main(videos, tmp_path / "third", "--recipe", str(tmp_path / "first"), *flag)
    with pytest.raises(ExtractionError, match=rf"--recipe {re.escape(str(video_dir))}: expected a recipe file or a "
                                              r"folder holding a recipe.json"):
        run_main(videos, tmp_path / "third", "--recipe", str(video_dir))
    (tmp_path / "notes.json").write_text('{"clip_length": 1.5}')
    with pytest.raises(ExtractionError, match=r"--recipe .*notes.json: not a feature recipe"):
        run_main(videos, tmp_path / "third", "--recipe", str(tmp_path / "notes.json"))
    assert not os.path.exists(tmp_path / "third")
