"""utils.extract_video_features under torchrun: 2 CPU processes write the same files as 1, and rank 0's summary and
the exit status cover the videos every rank failed on."""
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import ResNetConfig

from utils.extract_video_features import main
from utils.run_dir import REPO_ROOT
from utils.synthetic_video import write_video

pytestmark = pytest.mark.usefixtures("one_thread")

CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")
TIMEOUT_S = 240


def test_two_processes_write_the_files_of_one(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, seconds in enumerate([2.0, 3.5, 1.2, 4.1, 2.6]):
        times = np.arange(int(seconds * 10)) / 10
        write_video(videos / f"v{i}.mp4", times,
                    lambda t, i=i: np.full((40, 56, 3), (40 * i + 60 * int(t)) % 256, dtype=np.uint8))
    # Sorted last: probed by rank 1, so rank 0 reports it only if the failures are gathered.
    (videos / "zz_garbage.mp4").write_bytes(b"not a video" * 100)
    model = tmp_path / "resnet"
    ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic").save_pretrained(model)
    flags = ["--videos", str(videos), "--backbones", str(model), "--weights", "none", "--num_workers", "1",
             "--batch_clips", "2", "--device", "cpu"]

    assert main(flags + ["--out_dir", str(tmp_path / "one")]) == 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "utils.extract_video_features", *flags, "--out_dir", str(tmp_path / "two")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1, result.stderr[-4000:]

    names = sorted(os.listdir(tmp_path / "one"))
    assert names == ["recipe.json"] + [f"v{i}.npy" for i in range(5)]
    assert sorted(os.listdir(tmp_path / "two")) == names
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    log = result.stderr
    assert "rank 0 of 2: extracting videos 0 to 3 of the 5" in log and "rank 1 of 2: extracting videos 3 to 5" in log
    summaries = [line for line in log.splitlines() if "could not be decoded" in line]
    assert len(summaries) == 1 and "1 of 6 videos" in summaries[0] and "zz_garbage.mp4" in summaries[0]
    assert "5 videos written, 0 already there, 1 not decodable" in log

