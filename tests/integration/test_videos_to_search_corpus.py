"""A folder of videos to a search-only corpus: utils.extract_video_features, then utils.build_corpus without
annotations (clip length from the features' recipe, durations from the video files), checked by utils.check_data."""
import os

import numpy as np
import pytest
from transformers import ResNetConfig

from utils import build_corpus, check_data, extract_video_features
from utils.data_config import load_data_config
from utils.io_utils import load_json
from utils.provenance import provenance, read_recipe
from utils.synthetic_models import save_random_text_model
from utils.synthetic_video import write_video
from utils.video_decoding import probe_duration

pytestmark = pytest.mark.usefixtures("one_thread")

SECONDS = {"beach": 2.0, "kitchen": 3.7, "street": 1.1}


def frames(t):
    return np.full((32, 48, 3), 50 * int(t) % 256, dtype=np.uint8)


def test_videos_become_a_search_only_corpus_with_their_durations(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, seconds in SECONDS.items():
        write_video(videos / f"{name}.mp4", np.arange(int(seconds * 10)) / 10, frames)
    model = tmp_path / "resnet"
    ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic").save_pretrained(model)
    assert extract_video_features.main(["--videos", str(videos), "--out_dir", str(tmp_path / "feats"),
                                        "--backbones", str(model), "--weights", "none", "--clip_length", "1.0",
                                        "--frames_per_clip", "1", "--num_workers", "1"]) == 0
    # The search page plays this file, which is not the video the features were extracted from.
    write_video(videos / "street.mp4", np.arange(60) / 10, frames)

    build_corpus.main(["--out_dir", str(tmp_path / "corpus"), "--video_features", str(tmp_path / "feats"),
                       "--text_encoder", save_random_text_model(tmp_path / "text"), "--text_encoder_device", "cpu",
                       "--video_dir", str(videos)])
    printed = capsys.readouterr().out.splitlines()
    config_path = str(tmp_path / "corpus" / "data_config.json")
    assert printed[-1].split() == ["python", "-m", "method.search", "build", "--first_stage", "RUN", "--conquer",
                                   "RUN", "--dataset_config", config_path, "--out_dir", "INDEX"]
    assert printed[0].startswith("warning: 1 video files whose duration disagrees with their clip count") and \
        "street.mp4: 6 s, 2 clips of 1 s" in printed[0]

    config = load_data_config(config_path)
    assert config.clip_length == 1.0 and config.video_dir == str(videos)  # the clip length of the recipe
    table = load_json(config.video_duration_idx_path)["test_public"]
    assert sorted(table) == sorted(SECONDS)
    for name, (duration, _) in table.items():
        assert duration == pytest.approx(probe_duration(videos / f"{name}.mp4"))
        assert abs(duration - (6.0 if name == "street" else SECONDS[name])) < 0.05
    recipe = read_recipe(tmp_path / "feats")
    assert recipe["clip_length"] == 1.0 and recipe["backbones"][0]["model"] == str(model)
    assert provenance(load_json(config_path))["video_features"] == [recipe]

    assert check_data.main(["--dataset_config", config_path]) == 0
    assert capsys.readouterr().out.startswith("A search-only corpus: 3 videos and no queries")
    assert not os.path.exists(config.train_first_VR_ranklist_path)
