"""docs/walkthrough.md runs as written: from a folder of annotated videos to trained runs, and from a folder
without annotations to a served index that answers typed queries; adding a video and rerunning indexes it alone.

The commands are read from the page and run by bash in a copy of the repository (the scripts work from the
repository root), on tiny generated videos (with sound) and tiny random models. Only what scales is substituted:
model names by tiny local folders (`--weights none`), the GPU id by `cpu`, and training sizes appended as extra
flags, which the scripts pass through; the install line is skipped (the copy runs on this environment).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import requests
from transformers import ResNetConfig

from utils.io_utils import load_json, save_jsonl
from utils.run_dir import REPO_ROOT
from utils.synthetic_models import WORDS, save_random_text_model, save_random_whisper
from utils.synthetic_video import write_video

WALKTHROUGH = os.path.join(REPO_ROOT, "docs", "walkthrough.md")
SECONDS = 12.0
TRAIN_FLAGS = ("--model_config config/model_config_tiny.json --hidden_dim 32 --n_epoch 1 --num_workers 0 --bsz 8 "
               "--eval_query_bsz 8 --max_vcmr_video 4 --no_eval_untrained --stop_task VR")
FIRST_STAGE_FLAGS = "--hidden_dim 16 --n_epoch 1 --num_workers 0 --bsz 8"


def walkthrough_commands():
    """The commands of the page's first bash block, continuation lines joined, comments dropped."""
    text = open(WALKTHROUGH).read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def substituted(command, models, port):
    """A walkthrough command at the tests' scale (see the module docstring)."""
    if command.startswith("pip install"):
        return None
    command = re.sub(r"(scripts/\w+\.sh \S+) 0\b", r"\1 cpu", command).replace("--gpu 0", "--gpu cpu")
    command = command.replace("--backbones resnet152", f"--backbones {models['resnet']} --weights none")
    command = command.replace("roberta-base", models["text"])
    if "utils.transcribe" in command:
        command += f" --model {models['whisper']}"
    if "index_videos.sh" in command:
        command += f" --whisper_model {models['whisper']}"
    if "train_first_stage.sh" in command:
        command += " " + FIRST_STAGE_FLAGS
    elif "scripts/train.sh" in command:
        command += " " + TRAIN_FLAGS
    elif "scripts/inference.sh" in command:
        command += " --max_vcmr_video 4"
    if "method.search serve" in command:  # in the background; the test talks to it
        command = f"nohup {command} --port {port} > serve.log 2>&1 & echo $! > serve.pid"
    return command


def tone_video(path, seed):
    """A SECONDS-long video whose colour and tone change every 3 s, with a sound track."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(int(SECONDS // 3) + 1, 3))
    pitches = rng.uniform(200, 800, size=len(colours))
    write_video(path, np.arange(int(SECONDS * 4)) / 4,
                lambda t: np.full((48, 64, 3), colours[int(t // 3)], dtype=np.uint8), audio=True,
                audio_signal=lambda times: 0.3 * np.sin(2 * np.pi * pitches[(times // 3).astype(int)] * times))


def annotations(names, first_id, rng):
    rows = []
    for name in names:
        for _ in range(2):
            start = float(rng.integers(0, 8))
            rows.append(dict(desc_id=first_id + len(rows), desc=" ".join(rng.choice(WORDS, size=5)), vid_name=name,
                             duration=SECONDS, ts=[start, start + 3.0]))
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_repository(target):
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    for relative in listed:
        if os.path.isfile(os.path.join(REPO_ROOT, relative)):
            os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
            shutil.copy2(os.path.join(REPO_ROOT, relative), os.path.join(target, relative))


def run_bash(lines, cwd):
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    done = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(cwd)))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    root = tmp_path_factory.mktemp("walkthrough")
    repo = root / "repo"
    copy_repository(repo)
    models = dict(text=save_random_text_model(root / "text_model", hidden_size=16),
                  whisper=save_random_whisper(root / "whisper"), resnet=str(root / "resnet"))
    ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, layer_type="basic").save_pretrained(
        models["resnet"])
    rng = np.random.default_rng(0)
    names = {split: [f"{split}_{i}" for i in range(n)] for split, n in (("train", 8), ("val", 5))}
    (repo / "my_videos").mkdir()
    (repo / "new_videos").mkdir()
    (repo / "annotations").mkdir()
    for i, name in enumerate(names["train"] + names["val"]):
        tone_video(repo / "my_videos" / f"{name}.mp4", seed=i)
    for i in range(3):
        tone_video(repo / "new_videos" / f"talk_{i}.mp4", seed=100 + i)
    save_jsonl(annotations(names["train"], 0, rng), repo / "annotations" / "train.jsonl")
    save_jsonl(annotations(names["val"], 1000, rng), repo / "annotations" / "val.jsonl")

    port = free_port()
    commands = [substituted(command, models, port) for command in walkthrough_commands()]
    output = run_bash([c for c in commands if c is not None], repo)
    pid = int((repo / "serve.pid").read_text())
    try:
        yield dict(repo=repo, commands=[c for c in commands if c is not None], output=output, port=port,
                   models=models)
    finally:
        os.kill(pid, 15)


def wait_for_server(port, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
        except requests.ConnectionError:
            time.sleep(0.5)
    raise AssertionError("the server did not come up")


def test_the_walkthrough_trains_indexes_and_serves_typed_queries(walkthrough):
    repo = walkthrough["repo"]
    corpus = load_json(repo / "work" / "corpus" / "data_config.json")
    assert corpus["ctx_mode"] == "visual_sub" and corpus["video_feature_sets"][0]["recipe"]["backbones"]
    subtitles = [json.loads(line) for line in open(repo / "work" / "subtitles.jsonl")]
    assert len(subtitles) == 13 and any(row["sub"] for row in subtitles)
    assert "Train with: --dataset_config" in walkthrough["output"]
    assert "Serve with: python -m method.search serve" in walkthrough["output"]

    health = wait_for_server(walkthrough["port"])
    assert health["status"] == "ok" and health["n_videos"] == 3
    answer = requests.post(f"http://127.0.0.1:{walkthrough['port']}/search",
                           json={"text": "a man opens the door", "top_k": 5}, timeout=60)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert len(results) == 5
    for moment in results:
        assert moment["video_name"] in {"talk_0", "talk_1", "talk_2"}
        assert 0 <= moment["start"] < moment["end"] <= SECONDS + 1.5
    info = requests.get(f"http://127.0.0.1:{walkthrough['port']}/info", timeout=10).json()
    assert str(repo) not in json.dumps(info)  # no server paths
    assert info["text_queries"] and not info["desc_id_queries"]  # a corpus without annotations has no stored queries


def test_rerun_after_adding_a_video_processes_that_video_only(walkthrough):
    repo = walkthrough["repo"]
    out = repo / "work" / "new_videos"
    features = sorted((out / "features" / "set0").glob("*.npy"))
    before = {path.name: path.stat().st_mtime_ns for path in features}
    tone_video(repo / "new_videos" / "talk_3.mp4", seed=103)
    rerun = [c for c in walkthrough["commands"] if c.startswith(("FS_RUN=", "RUN=")) or "index_videos.sh" in c]
    run_bash(rerun, repo)

    record = load_json(out / "collection.json")
    assert record["videos_indexed"] == 4 and record["n_encoded"] == 1
    assert {path.name: path.stat().st_mtime_ns for path in features} == before
    assert sorted(json.loads(line)["vid_name"] for line in open(out / "subtitles.jsonl")) == [
        "talk_0", "talk_1", "talk_2", "talk_3"]
    # The running server takes the new index version at its next search, with its models still loaded.
    server = f"http://127.0.0.1:{walkthrough['port']}"
    answer = requests.post(f"{server}/search", json={"text": "a man opens the door", "top_k": 100}, timeout=60).json()
    assert "talk_3" in {moment["video_name"] for moment in answer["results"]}
    assert requests.get(f"{server}/health", timeout=10).json()["n_videos"] == 4
    thumbnail = requests.get(f"{server}/thumbnail/talk_3", timeout=10)
    assert thumbnail.status_code == 200 and thumbnail.content[:2] == b"\xff\xd8"  # a JPEG


def runs_of(repo):
    return (str(sorted((repo / "results").glob("my_videos-fs-*"))[-1]),
            str(sorted((repo / "results").glob("my_videos-conquer-*"))[-1]))


def index_state(out):
    """What a server reads of a collection folder: the live version, the record, the data config."""
    return ((out / "index" / "CURRENT").read_text(), (out / "collection.json").read_text(),
            (out / "data_config.json").read_text(), sorted(os.listdir(out / "corpus")))


def test_bad_inputs_stop_with_one_line_and_keep_the_served_index(walkthrough, tmp_path, monkeypatch):
    from method import index_videos as module
    from method.index_videos import CollectionError, index_videos
    repo = walkthrough["repo"]
    monkeypatch.chdir(repo)  # the runs' opt.json name their data configs relative to the repository
    first_stage, conquer = runs_of(repo)
    out = repo / "work" / "new_videos"
    state = index_state(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectionError, match="no video files found"):
        index_videos(str(tmp_path / "empty"), str(tmp_path / "out"), first_stage, conquer)
    with pytest.raises(CollectionError, match=r"--first_stage .*: a conquer run, expected a first_stage run"):
        index_videos(str(repo / "new_videos"), str(tmp_path / "out"), conquer, conquer)
    with pytest.raises(CollectionError, match="holds the index of another collection"):
        index_videos(str(repo / "my_videos"), str(out), first_stage, conquer)

    # A first stage trained on features of another recipe than CONQUER's.
    other = tmp_path / "other_fs"
    shutil.copytree(first_stage, other)
    opt = load_json(other / "opt.json")
    config = load_json(os.path.join(repo, opt["dataset_config"]))
    config["video_feature_sets"][0]["recipe"]["frames_per_clip"] += 1
    (tmp_path / "other_config.json").write_text(json.dumps(config))
    opt["dataset_config"] = str(tmp_path / "other_config.json")
    (other / "opt.json").write_text(json.dumps(opt))
    with pytest.raises(CollectionError, match=r"different recipes \(video feature set 0 recipe frames_per_clip: "):
        index_videos(str(repo / "new_videos"), str(tmp_path / "out"), str(other), conquer)
    assert not (tmp_path / "out").exists()

    # A speech model that cannot be loaded stops the update before the corpus: the served index is untouched.
    tone_video(repo / "new_videos" / "talk_9.mp4", seed=109)
    with pytest.raises(CollectionError, match="subtitles failed"):
        index_videos(str(repo / "new_videos"), str(out), first_stage, conquer, whisper_model=str(tmp_path / "none"))
    assert index_state(out) == state
    # A failure while indexing puts the previous corpus back.
    monkeypatch.setattr(module, "build_index", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        index_videos(str(repo / "new_videos"), str(out), first_stage, conquer, whisper_model=walkthrough["models"]["whisper"])
    assert index_state(out) == state
    os.remove(repo / "new_videos" / "talk_9.mp4")
    monkeypatch.undo()
    monkeypatch.chdir(repo)

    # A file that cannot be decoded is named and left out; the other videos stay searchable.
    (repo / "new_videos" / "broken.mp4").write_bytes(b"not a video" * 100)
    summary = index_videos(str(repo / "new_videos"), str(out), first_stage, conquer,
                           whisper_model=walkthrough["models"]["whisper"])
    assert (summary["left_out"], summary["exit_status"], summary["videos_indexed"]) == (["broken"], 1, 4)
    assert summary["n_encoded"] == 0 and load_json(out / "collection.json")["left_out"] == ["broken"]
    os.remove(repo / "new_videos" / "broken.mp4")
