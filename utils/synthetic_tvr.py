"""Synthetic corpus in the exact layout of the TVR feature release, with a learnable planted signal.

    python -m utils.synthetic_tvr --out_dir /tmp/tvr_synth           # a few seconds, small dims
    python -m utils.synthetic_tvr --out_dir /tmp/tvr_real_scale --real_annotations /path/to/tvr
    python -m utils.synthetic_tvr --out_dir /tmp/tvr_long --min_duration 300 --max_duration 900 --max_clips 600
                                                                     # 5-15 minute videos (long-video windows)

Layout: the release's relative paths (utils/tvr_format.py) below `out_dir`, plus `out_dir/tvr_data_config.json`
whose root_path is `out_dir` (pass it as --dataset_config, with the printed --visual_dim/--text_dim/--query_dim).

The signal. Every video is a sequence of scenes (runs of clips); a clip's visual and subtitle features are
its scene's vector plus jitter, and a scene vector mixes a prototype shared across the corpus (so other
videos hold look-alike scenes) with a part unique to the video. Scene cuts fall on every GT moment boundary,
so moments are localisable. A query's token features are projections (fixed random matrices, so dims may
differ) of the features of random clips inside its GT moment, in the modality its `type` names (v: visual,
t: subtitle, vt: both), plus Gaussian noise of std `noise`; about a quarter of the tokens are pure noise
("function words"). First-stage ranklists are simulated with realistic quality: GT at rank 1 for ~1/5 of
the queries, in the top 10 for ~1/2, in the top 100 for ~97%; the training file keeps only queries with
the GT in the top 100 (as the release's select100 file).

Durations are uniform in [--min_duration, --max_duration], capped at --max_clips clips (100 by default, the
model's limit, as TVR's videos); a GT moment (2-8 clips) starts at a uniformly drawn clip of its video, so in
a corpus of videos longer than train.py's --max_ctx_len clips most moments lie past the first window. The
printed flags then include `--window_stride` (half of --max_ctx_len 100), which reads such videos as
overlapping windows.

`--real_annotations DIR` takes val and test_public from the real files in DIR (tvr_val_release.jsonl,
tvr_test_public_release.jsonl, tvr_video2dur_idx.json: real names, durations, global indices and moments)
and plants synthetic features for them; test_public queries have no GT, so their features are noise.
The training split uses the first `n_train_videos` real training videos with synthetic queries.
"""
import argparse
import math
import os

import numpy as np
from tqdm import tqdm

from utils.build_corpus import default_window_stride
from utils.data_config import PATH_KEYS, load_data_config
from utils.errors import OptionError, run_cli
from utils.feature_stores import StoreWriter, encode_npz_features, encode_ranklist, encode_video_features
from utils.io_utils import load_json, load_jsonl, save_json, save_jsonl
from utils.tvr_format import DUMMY_TEST_PUBLIC_VIDEO, release_data_config, st_ed_label

SPLIT_ORDER = ("test_challenge", "test_public", "train", "val")  # order of the release's global indices
QUERY_TYPE_PROBS = {"v": 0.74, "t": 0.09, "vt": 0.17}  # TVR val proportions
DUMMY_DURATION = 91.56  # the dummy's duration in the release
MIN_MOMENT_CLIPS, MAX_MOMENT_CLIPS = 2, 8
MIN_SCENE_CLIPS, MAX_SCENE_CLIPS = 3, 8
MIN_QUERY_TOKENS, MAX_QUERY_TOKENS = 8, 20
FILLER_TOKEN_PROB = 0.25
PROTOTYPE_WEIGHT, UNIQUE_WEIGHT, CLIP_JITTER = 0.7, 0.7, 0.35
N_PROTOTYPES = 64
TRAIN_MAX_CTX_LEN = 100  # train.py's default --max_ctx_len: longer videos need --window_stride to be read whole


def _durations(rng, n, min_duration, max_duration):
    return [round(float(d), 2) for d in rng.uniform(min_duration, max_duration, size=n)]


def _n_clips(duration, clip_length):
    return max(1, math.ceil(duration / clip_length))


def _sample_moment(rng, duration, clip_length):
    """A GT moment [t0, t1] (seconds, 2 decimals) covering 2-8 whole clips, jittered inside its edge clips."""
    n = _n_clips(duration, clip_length)
    length = int(rng.integers(MIN_MOMENT_CLIPS, MAX_MOMENT_CLIPS + 1)) if n >= MIN_MOMENT_CLIPS else 1
    length = min(length, n)
    st = int(rng.integers(0, n - length + 1))
    ed = st + length - 1
    t0 = min(round((st + rng.uniform(0.05, 0.8)) * clip_length, 2), duration)
    t1 = min(round((ed + rng.uniform(0.2, 0.95)) * clip_length, 2), duration)
    return [t0, max(t0, t1)]


def _synthetic_queries(rng, videos, n_queries, first_desc_id):
    """Annotation rows on random videos of `videos` [(name, duration)]."""
    types, probs = list(QUERY_TYPE_PROBS), list(QUERY_TYPE_PROBS.values())
    rows = []
    for i in range(n_queries):
        name, duration = videos[int(rng.integers(len(videos)))]
        desc_id = first_desc_id + i
        rows.append(dict(vid_name=name, duration=duration, ts=None, desc=f"synthetic query {desc_id}",
                         type=str(rng.choice(types, p=probs)), desc_id=desc_id))
    return rows


def _sample_gt_rank(rng, list_len, select100):
    """0-based first-stage rank of the GT, or None when it falls off the list."""
    u = rng.random() * (0.97 if select100 else 1.0)
    top10, top100 = min(10, list_len), min(100, list_len)
    if u < 0.2 or list_len == 1:
        return 0
    if u < 0.5 or top10 == top100:
        return int(rng.integers(1, top10)) if top10 > 1 else 0
    if u < 0.97:
        return int(rng.integers(top10, top100))
    return int(rng.integers(100, list_len)) if list_len > 100 else None


def _ranklist(rng, split_indices, gt_idx, list_len, select100):
    """[(video_idx, score)] of length list_len, scores descending, GT at a simulated rank (or absent)."""
    others = [idx for idx in split_indices if idx != gt_idx]
    ranked = [others[j] for j in rng.permutation(len(others))[:list_len]]
    if gt_idx is not None:
        rank = _sample_gt_rank(rng, list_len, select100)
        if rank is None and len(others) < list_len:  # the list covers the whole split: the GT is in it
            rank = int(rng.integers(min(10, list_len - 1), list_len))
        if rank is not None:
            ranked = ranked[:list_len - 1]
            ranked.insert(rank, gt_idx)
    scores = np.sort(rng.uniform(0.05, 1.0, size=len(ranked)))[::-1]
    return [(int(idx), round(float(s), 6)) for idx, s in zip(ranked, scores)]


class _SceneModel:
    """Fixed random parameters of the planted signal: scene prototypes and modality -> query projections."""

    def __init__(self, rng, visual_dim, text_dim, query_dim, noise):
        self.dims = dict(visual=visual_dim, sub=text_dim)
        self.prototypes = {m: rng.normal(size=(N_PROTOTYPES, d)) for m, d in self.dims.items()}
        self.projections = {m: rng.normal(scale=1 / math.sqrt(d), size=(query_dim, d)) for m, d in self.dims.items()}
        self.query_dim = query_dim
        self.noise = noise

    def video(self, rng, n_clips, moments):
        """{modality: (n_clips, D) float32} with a scene cut at every boundary of `moments` [(st, ed)]."""
        cuts = {0, n_clips}
        for st, ed in moments:
            cuts.update((st, ed + 1))
        position = 0
        while position < n_clips:
            position += int(rng.integers(MIN_SCENE_CLIPS, MAX_SCENE_CLIPS + 1))
            cuts.add(min(position, n_clips))
        bounds = sorted(cuts)
        features = {}
        for modality, dim in self.dims.items():
            clips = np.empty((n_clips, dim))
            for start, end in zip(bounds[:-1], bounds[1:]):
                scene = (PROTOTYPE_WEIGHT * self.prototypes[modality][rng.integers(N_PROTOTYPES)]
                         + UNIQUE_WEIGHT * rng.normal(size=dim))
                clips[start:end] = scene + CLIP_JITTER * rng.normal(size=(end - start, dim))
            features[modality] = clips.astype(np.float32)
        return features

    def query(self, rng, video_features, moment, query_type):
        """(n_tokens, Dq) float32 tokens describing clips st..ed of the video in the modality of query_type."""
        n_tokens = int(rng.integers(MIN_QUERY_TOKENS, MAX_QUERY_TOKENS + 1))
        tokens = self.noise * rng.normal(size=(n_tokens, self.query_dim))
        if video_features is None:  # no GT (real test_public): noise only
            return tokens.astype(np.float32)
        st, ed = moment
        modalities = {"v": ["visual"], "t": ["sub"], "vt": ["visual", "sub"]}[query_type]
        for t in np.flatnonzero(rng.random(n_tokens) >= FILLER_TOKEN_PROB):
            modality = modalities[int(rng.integers(len(modalities)))]
            clip = video_features[modality][int(rng.integers(st, ed + 1))]
            tokens[t] += self.projections[modality] @ clip
        return tokens.astype(np.float32)


def _real_splits(annotation_dir, n_train_videos):
    """Videos per split [(name, duration)] and global indices from the real video2dur_idx file, plus the
    real val / test_public annotation rows."""
    video2dur = load_json(os.path.join(annotation_dir, "tvr_video2dur_idx.json"))
    val_rows = load_jsonl(os.path.join(annotation_dir, "tvr_val_release.jsonl"))
    test_rows = load_jsonl(os.path.join(annotation_dir, "tvr_test_public_release.jsonl"))
    kept = dict(test_challenge={DUMMY_TEST_PUBLIC_VIDEO: video2dur["test_challenge"][DUMMY_TEST_PUBLIC_VIDEO]},
                test_public=video2dur["test_public"], val=video2dur["val"],
                train=dict(sorted(video2dur["train"].items(), key=lambda kv: kv[1][1])[:n_train_videos]))
    videos = {split: [(name, float(dur_idx[0])) for name, dur_idx in kept[split].items()] for split in SPLIT_ORDER}
    indices = {name: int(dur_idx[1]) for split in SPLIT_ORDER for name, dur_idx in kept[split].items()}
    return videos, indices, val_rows, test_rows


def generate_corpus(out_dir, n_train_videos=150, n_val_videos=150, n_test_videos=150, n_train_queries=600,
                    n_val_queries=200, n_test_queries=100, visual_dim=48, text_dim=32, query_dim=32,
                    clip_length=1.5, min_duration=30.0, max_duration=90.0, max_clips=100, noise=1.0, seed=0,
                    train_ranklist_len=2000, eval_ranklist_len=100, real_annotations=None, progress=False):
    """Write a synthetic corpus under `out_dir` -> path of its data config (out_dir/tvr_data_config.json).

    Sizes count videos / queries per split; with `real_annotations` (a folder with the real TVR files)
    val and test_public come from those files and their n_*_videos / n_*_queries are ignored.
    Deterministic for a given seed.
    """
    out_dir = os.path.abspath(out_dir)
    layout = release_data_config(out_dir)
    rng = np.random.default_rng(seed)
    capped = min(max_duration, max_clips * clip_length)
    if not 0 < min_duration <= capped:
        raise OptionError(f"--min_duration {min_duration:g}: expected in (0, {capped:g}], the --max_duration "
                          f"{max_duration:g} s capped at --max_clips {max_clips} x --clip_length {clip_length:g} s "
                          f"(raise --max_clips for longer videos)")
    max_duration = capped

    if real_annotations:
        videos, video_idx, val_rows, test_rows = _real_splits(real_annotations, n_train_videos)
        first_desc_id = 1 + max(row["desc_id"] for row in val_rows + test_rows)
        train_rows = _synthetic_queries(rng, videos["train"], n_train_queries, first_desc_id)
        hidden_test_gt = False
    else:
        sizes = dict(test_public=n_test_videos, train=n_train_videos, val=n_val_videos)
        videos = {"test_challenge": [(DUMMY_TEST_PUBLIC_VIDEO, DUMMY_DURATION)]}
        for split, n in sizes.items():
            videos[split] = [(f"synthetic_{split}_{i:05d}", d)
                             for i, d in enumerate(_durations(rng, n, min_duration, max_duration))]
        names_in_order = [name for split in SPLIT_ORDER for name, _ in videos[split]]
        video_idx = {name: i for i, name in enumerate(names_in_order)}
        train_rows = _synthetic_queries(rng, videos["train"], n_train_queries, 0)
        val_rows = _synthetic_queries(rng, videos["val"], n_val_queries, n_train_queries)
        test_rows = _synthetic_queries(rng, videos["test_public"], n_test_queries, n_train_queries + n_val_queries)
        hidden_test_gt = True
    for split, n_videos in (("val", len(videos["val"])), ("test_public", len(videos["test_public"]))):
        if n_videos < 10:
            raise OptionError(f"split {split!r} has {n_videos} videos; evaluation ranklists need at least 10 "
                              f"(max_vcmr_video): raise --n_val_videos / --n_test_videos")
    gt_rows = train_rows + val_rows + (test_rows if hidden_test_gt else [])
    for row in gt_rows:
        if row["ts"] is None:  # a synthetic query (real ones keep their moment)
            row["ts"] = _sample_moment(rng, row["duration"], clip_length)

    # Training ranks are drawn from the top 100 only: the training file holds just such queries (select100).
    split_indices = {split: [video_idx[name] for name, _ in videos[split]] for split in SPLIT_ORDER}
    ranklists = {}
    for split, rows, list_len in (("train", train_rows, min(train_ranklist_len, len(videos["train"]))),
                                  ("val", val_rows, min(eval_ranklist_len, len(videos["val"]))),
                                  ("test_public", test_rows, min(eval_ranklist_len, len(videos["test_public"])))):
        ranklists[split] = {row["desc_id"]: _ranklist(rng, split_indices[split],
                                                      video_idx[row["vid_name"]] if "vid_name" in row else None,
                                                      list_len, select100=split == "train")
                            for row in rows}

    # Features, one video at a time (keeps memory flat at real scale).
    scenes = _SceneModel(rng, visual_dim, text_dim, query_dim, noise)
    moments_by_video = {}
    for row in gt_rows:
        moment = st_ed_label(row["ts"], _n_clips(row["duration"], clip_length), clip_length)
        moments_by_video.setdefault(row["vid_name"], []).append((row, moment))
    path = {key: os.path.join(out_dir, layout[key]) for key in PATH_KEYS}
    all_videos = [video for split in SPLIT_ORDER for video in videos[split]]
    with StoreWriter(path["vid_feat_path"], encode_video_features) as visual_writer, \
            StoreWriter(path["sub_bert_path"], encode_npz_features) as sub_writer, \
            StoreWriter(path["desc_bert_path"], encode_npz_features) as query_writer:
        for name, duration in tqdm(all_videos, desc="synthetic videos", disable=not progress):
            queries = moments_by_video.get(name, [])
            features = scenes.video(rng, _n_clips(duration, clip_length), [moment for _, moment in queries])
            visual_writer.put(name, features["visual"])
            sub_writer.put(name, features["sub"])
            for row, moment in queries:
                query_writer.put(row["desc_id"], scenes.query(rng, features, moment, row["type"]))
        if not hidden_test_gt:
            for row in test_rows:
                query_writer.put(row["desc_id"], scenes.query(rng, None, None, None))

    for split, key in (("train", "train_first_VR_ranklist_path"), ("val", "eval_first_VR_ranklist_path_hero"),
                       ("test_public", "test_public_first_VR_ranklist_path_hero")):
        with StoreWriter(path[key], encode_ranklist) as writer:
            for desc_id, ranklist in ranklists[split].items():
                writer.put(desc_id, ranklist)

    public_test_rows = [dict(desc=row["desc"], desc_id=row["desc_id"]) for row in test_rows]
    save_jsonl(train_rows, path["train_data_path"])
    save_jsonl(val_rows, path["eval_data_path"])
    save_jsonl(public_test_rows, path["test_data_path"])
    save_json({split: {name: [duration, video_idx[name]] for name, duration in videos[split]}
               for split in SPLIT_ORDER}, path["video_duration_idx_path"])

    config_path = os.path.join(out_dir, "tvr_data_config.json")
    save_json(layout, config_path, save_pretty=True)
    return config_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="folder to write the corpus into")
    parser.add_argument("--n_train_videos", type=int, default=150)
    parser.add_argument("--n_val_videos", type=int, default=150)
    parser.add_argument("--n_test_videos", type=int, default=150, help="test_public videos")
    parser.add_argument("--n_train_queries", type=int, default=600)
    parser.add_argument("--n_val_queries", type=int, default=200)
    parser.add_argument("--n_test_queries", type=int, default=100, help="test_public queries")
    parser.add_argument("--visual_dim", type=int, default=48)
    parser.add_argument("--text_dim", type=int, default=32, help="subtitle feature dim")
    parser.add_argument("--query_dim", type=int, default=32)
    parser.add_argument("--clip_length", type=float, default=1.5)
    parser.add_argument("--min_duration", type=float, default=30.0, help="seconds")
    parser.add_argument("--max_duration", type=float, default=90.0, help="seconds")
    parser.add_argument("--max_clips", type=int, default=100, help="caps durations at max_clips * clip_length")
    parser.add_argument("--noise", type=float, default=1.0,
                        help="std of the Gaussian noise on query tokens (the signal has std ~1 per dim)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_ranklist_len", type=int, default=2000)
    parser.add_argument("--eval_ranklist_len", type=int, default=100)
    parser.add_argument("--real_annotations", default=None,
                        help="folder holding the real tvr_val_release.jsonl, tvr_test_public_release.jsonl and "
                             "tvr_video2dur_idx.json: val and test_public are built from them")
    args = vars(parser.parse_args(argv))
    config_path = generate_corpus(**args, progress=True)
    flags = (f"--dataset_config {config_path} --visual_dim {args['visual_dim']} --text_dim {args['text_dim']} "
             f"--query_dim {args['query_dim']}")
    longest = longest_video_clips(config_path, args["clip_length"])
    print(f"Wrote {config_path}")
    if longest > TRAIN_MAX_CTX_LEN:
        stride = default_window_stride(TRAIN_MAX_CTX_LEN)
        print(f"note: videos of up to {longest} clips, longer than --max_ctx_len {TRAIN_MAX_CTX_LEN}: "
              f"--window_stride {stride} reads them as overlapping windows (without it, their first "
              f"{TRAIN_MAX_CTX_LEN} clips only)")
        flags += f" --window_stride {stride}"
    print(f"Use: {flags}")


def longest_video_clips(config_path, clip_length):
    """Clips of the longest video of a written corpus (the dummy test_challenge video included)."""
    video2dur = load_json(load_data_config(config_path).video_duration_idx_path)
    return max(_n_clips(duration, clip_length) for videos in video2dur.values() for duration, _ in videos.values())


if __name__ == "__main__":
    run_cli(main)
