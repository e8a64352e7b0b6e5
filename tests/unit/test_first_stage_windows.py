"""method/first_stage.py and method/rank_first_stage.py with long videos read as windows (--window_stride): the
window bank against whole-video and window-by-window scoring, stride 0 against the original reading, the best
windows, FAISS over windows and the GT window of training items."""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from method.first_stage import (FirstStageDataset, FirstStageError, FirstStageRetriever, VideoBank, VideoItems,
                                VideoWindowItems, best_windows, encode_video_bank, top_videos, video_max,
                                window_batches)
from method.oracle import score_all_reference
from method.rank_first_stage import VideoSummaryIndex, video_summaries
from utils.data_config import load_data_config
from utils.feature_stores import VideoFeatureStore, write_subtitle_store, write_video_store
from utils.tvr_format import st_ed_label
from utils.windows import window_starts

pytestmark = pytest.mark.usefixtures("one_thread")

L, STRIDE = 12, 5
DIMS = dict(query_dim=6, visual_dim=10, text_dim=7, hidden_dim=16, max_ctx_len=L)
# Clip counts: shorter than a window, exactly one, one more, several windows, a last window off the stride grid.
LENGTHS = [5, 12, 13, 30, 47, 3]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A config naming visual and subtitle stores of videos of LENGTHS clips (a subtitle store one clip short
    of the visual on one video: it is zero-padded to the visual clip count)."""
    root = tmp_path_factory.mktemp("window_stores")
    rng = np.random.default_rng(0)
    names = [f"video{i}" for i in range(len(LENGTHS))]
    visual = {name: rng.normal(size=(n, DIMS["visual_dim"])).astype(np.float32) for name, n in zip(names, LENGTHS)}
    sub = {name: rng.normal(size=(n - (name == "video3"), DIMS["text_dim"])).astype(np.float32)
           for name, n in zip(names, LENGTHS)}
    write_video_store(root / "visual", visual)
    write_subtitle_store(root / "sub", sub)
    return SimpleNamespace(vid_feat_path=str(root / "visual"), sub_bert_path=str(root / "sub")), names


def make_model(ctx_mode="visual_sub", **cfg):
    torch.manual_seed(0)
    return FirstStageRetriever(dict(dict(n_heads=2, dropout=0.0), **cfg), ctx_mode=ctx_mode, **DIMS).eval()


def random_query_emb(model, n_queries=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 8, (n_queries,), generator=generator)
    with torch.no_grad():
        return model.encode_queries(torch.randn(n_queries, 8, DIMS["query_dim"], generator=generator),
                                    (torch.arange(8)[None, :] < lengths[:, None]).long())


def window_items(config, names, stride=STRIDE, ctx_mode="visual_sub"):
    videos = VideoItems(config, names, L, ctx_mode, window_stride=stride)
    videos.video2idx = {name: 100 + i for i, name in enumerate(names)}
    return videos


def whole_video_scores(model, videos, query_emb):
    """(Q, V): FirstStageRetriever.score of every video encoded whole, every clip at once (no window)."""
    scores = []
    with torch.no_grad():
        for name in videos.names:
            features = videos.read_video(name)
            mask = torch.ones(1, len(features["visual"]), dtype=torch.int64)
            inputs = {m: {"feat": torch.from_numpy(f)[None], "feat_mask": mask} for m, f in features.items()}
            scores.append(model.score(query_emb, model.encode_videos(inputs)))
    return torch.cat(scores, dim=1)


def per_window_scores(model, videos, query_emb, name, length=L, stride=STRIDE):
    """{start: (Q,) scores} of each window of video `name`, encoded alone (unpadded)."""
    features = videos.read_video(name)
    out = {}
    with torch.no_grad():
        for start in window_starts(len(features["visual"]), length, stride):
            window = {m: torch.from_numpy(f[start:start + length])[None] for m, f in features.items()}
            mask = torch.ones(window["visual"].shape[:2], dtype=torch.int64)
            out[start] = model.score(query_emb, model.encode_videos(
                {m: {"feat": f, "feat_mask": mask} for m, f in window.items()}))[:, 0]
    return out


def test_one_modality_window_bank_scores_equal_whole_video_scores(stores):
    """One modality, no video Transformer: a video's best window holds its best clip, so its score over windows
    is the score of the whole video, every clip of it; a batch of 4 windows splits the long videos."""
    config, names = stores
    model = make_model("visual")
    videos = window_items(config, names, ctx_mode="visual")
    bank = encode_video_bank(model, videos, torch.device("cpu"), batch_size=4, progress=False)
    counts = [len(window_starts(n, L, STRIDE)) for n in LENGTHS]
    assert bank.n_windows == sum(counts) and len(bank) == len(names) and sum(counts) > len(names)
    assert bank.window_video.tolist() == [v for v, c in enumerate(counts) for _ in range(c)]
    assert bank.window_start.tolist() == [s for n in LENGTHS for s in window_starts(n, L, STRIDE)]
    query_emb = random_query_emb(model)
    scores = score_all_reference(query_emb, bank, query_chunk=3, video_bucket=5, progress=False)
    assert torch.allclose(scores, whole_video_scores(model, videos, query_emb), atol=1e-5)


@pytest.mark.parametrize("n_video_layers", [0, 1])
def test_window_bank_scores_are_the_max_over_windows_encoded_alone(stores, n_video_layers):
    """A video's score is its best window's, each window encoded on its own (with a video Transformer a clip's
    context is its window); the best window is the one reaching it. With two modalities and no Transformer this
    is at most the whole video's score, which may add up the modality maxima of clips no window holds together."""
    config, names = stores
    model = make_model(n_video_layers=n_video_layers)
    videos = window_items(config, names)
    bank = encode_video_bank(model, videos, torch.device("cpu"), batch_size=3, progress=False)
    query_emb = random_query_emb(model)
    scores = score_all_reference(query_emb, bank, query_chunk=4, progress=False)
    values, positions = top_videos(scores, 4)
    starts, best = best_windows(query_emb, bank, positions, query_chunk=5, progress=False)
    assert torch.allclose(best, values, atol=1e-6)
    for v, name in enumerate(names):
        windows = per_window_scores(model, videos, query_emb, name)
        stacked = torch.stack(list(windows.values()), dim=1)
        assert torch.allclose(scores[:, v], stacked.max(dim=1).values, atol=1e-5)
        for q, k in zip(*torch.nonzero(positions == v, as_tuple=True)):
            assert float(windows[int(starts[q, k])][q]) == pytest.approx(float(stacked[q].max()), abs=1e-5)
    if not n_video_layers:
        whole = whole_video_scores(model, videos, query_emb)
        assert torch.all(scores <= whole + 1e-6) and torch.any(scores < whole - 1e-3)


def test_stride_0_reads_the_first_clips_as_the_original(stores):
    """Stride 0 on videos longer than L: one window per video, its first L clips; the embeddings are those of the
    original encoding (items of the first L clips stacked by batches of videos), bit for bit, and the scores
    those of the truncated videos."""
    config, names = stores
    model = make_model()
    videos = window_items(config, names, stride=0)
    bank = encode_video_bank(model, videos, torch.device("cpu"), batch_size=4, progress=False)
    assert bank.n_windows == len(names) and torch.all(bank.window_start == 0)
    with torch.no_grad():
        original = [model.encode_videos(default_collate([videos[i] for i in range(start, min(start + 4, len(names)))]))
                    for start in range(0, len(names), 4)]
    assert torch.equal(bank.embeddings["clips"], torch.cat([o["clips"] for o in original]))
    assert bank.embeddings["clip_mask"].sum(1).tolist() == [min(n, L) for n in LENGTHS]
    assert torch.equal(videos[3]["visual"]["feat"], torch.from_numpy(VideoFeatureStore(config.vid_feat_path).get(
        names[3])[:L]))
    query_emb = random_query_emb(model)
    expected = FirstStageRetriever.score(query_emb, bank.embeddings)
    assert torch.allclose(score_all_reference(query_emb, bank, progress=False), expected, atol=1e-5)


def test_window_items_read_each_video_once_as_slices(stores):
    config, names = stores
    videos = window_items(config, names)
    item = VideoWindowItems(videos)[4]  # 47 clips
    stored = VideoFeatureStore(config.vid_feat_path).get(names[4])
    assert item["starts"].tolist() == [0, 5, 10, 15, 20, 25, 30, 35]
    for w, start in enumerate(item["starts"].tolist()):
        assert torch.equal(item["inputs"]["visual"]["feat"][w], torch.from_numpy(stored[start:start + L]))
    short = VideoWindowItems(videos)[3]  # the subtitle store holds 29 of the 30 clips: zero-padded
    assert torch.all(short["inputs"]["sub"]["feat"][-1, -1] == 0)
    assert torch.all(short["inputs"]["sub"]["feat_mask"] == 1)
    with pytest.raises(FirstStageError, match="--window_stride 13"):
        VideoItems(config, names, L, "visual_sub", window_stride=L + 1)


def test_window_batches_are_exact_batch_sizes_in_order():
    counts = [1, 7, 2, 1, 13, 3]
    items, n = [], 0
    for count in counts:
        feat = torch.arange(n, n + count, dtype=torch.float32)[:, None, None].expand(count, 2, 1)
        items.append({"inputs": {"visual": {"feat": feat, "feat_mask": torch.ones(count, 2)}},
                      "starts": torch.arange(count)})
        n += count
    batches = list(window_batches(items, 5))
    assert [len(b["visual"]["feat"]) for b in batches] == [5, 5, 5, 5, 5, 2]
    assert torch.equal(torch.cat([b["visual"]["feat"][:, 0, 0] for b in batches]), torch.arange(n, dtype=torch.float32))


def random_window_bank(counts, length=6, dim=8, seed=0):
    """A bank of len(counts) videos, video v with counts[v] windows of random unit clips and random lengths."""
    generator = torch.Generator().manual_seed(seed)
    n_windows = sum(counts)
    clips = torch.nn.functional.normalize(torch.randn(n_windows, 2, length, dim, generator=generator), dim=-1)
    mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (n_windows,), generator=generator)[:, None]
    window_video = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    window_start = torch.cat([torch.arange(c) * 3 for c in counts])
    return VideoBank([f"v{i}" for i in range(len(counts))], torch.arange(len(counts)) + 500,
                     {"clips": clips, "clip_mask": mask}, window_video, window_start)


def random_queries(n_queries, dim=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {"query": torch.nn.functional.normalize(torch.randn(n_queries, 2, dim, generator=generator), dim=-1),
            "modality_weights": torch.softmax(torch.randn(n_queries, 2, generator=generator), dim=-1)}


def test_video_scores_and_best_windows_equal_a_loop_over_windows():
    counts = [1, 4, 2, 7, 1, 3]
    bank, query_emb = random_window_bank(counts), random_queries(5)
    window_scores = FirstStageRetriever.score(query_emb, bank.embeddings)  # (Q, W)
    scores = score_all_reference(query_emb, bank, query_chunk=2, video_bucket=3, progress=False)
    _, positions = top_videos(scores, 4)
    starts, values = best_windows(query_emb, bank, positions, query_chunk=2, video_bucket=3, progress=False)
    for q in range(5):
        for v in range(len(counts)):
            rows = [w for w in range(bank.n_windows) if int(bank.window_video[w]) == v]
            assert float(scores[q, v]) == pytest.approx(max(float(window_scores[q, w]) for w in rows), abs=1e-5)
        for k, v in enumerate(positions[q].tolist()):
            rows = [w for w in range(bank.n_windows) if int(bank.window_video[w]) == v]
            best = max(rows, key=lambda w: float(window_scores[q, w]))
            assert int(starts[q, k]) == int(bank.window_start[best]) and float(values[q, k]) == pytest.approx(
                float(scores[q, v]), abs=1e-6)
    assert torch.equal(video_max(window_scores, bank.window_video, len(counts)),
                       torch.stack([window_scores[:, bank.window_video == v].max(1).values for v in range(6)], 1))


def test_best_windows_takes_the_earliest_window_on_ties():
    bank = random_window_bank([3])
    bank.embeddings["clips"][:] = bank.embeddings["clips"][:1]  # three identical windows
    bank.embeddings["clip_mask"][:] = bank.embeddings["clip_mask"][:1]
    starts, _ = best_windows(random_queries(2), bank, torch.zeros(2, 1, dtype=torch.int64), progress=False)
    assert starts.tolist() == [[0], [0]]


def test_a_bank_must_hold_its_videos_windows_together_and_in_order():
    bank = random_window_bank([2, 2])
    with pytest.raises(FirstStageError, match="together and in order"):
        VideoBank(bank.names, bank.video_idx, bank.embeddings, torch.tensor([0, 1, 0, 1]), bank.window_start)
    with pytest.raises(FirstStageError, match="together and in order"):
        VideoBank(bank.names + ["v2"], None, bank.embeddings, bank.window_video, bank.window_start)


def test_faiss_over_windows_gives_the_exact_top_k_when_the_candidates_cover_every_window():
    counts = [1, 4, 2, 7, 1, 3] * 8
    bank, query_emb = random_window_bank(counts, seed=3), random_queries(6, seed=4)
    exact_values, exact_positions = top_videos(score_all_reference(query_emb, bank, progress=False), 10)
    index = VideoSummaryIndex(bank, n_probe=4, n_candidates=bank.n_windows, n_lists=4)
    assert all(torch.equal(c, torch.arange(len(counts))) for c in index.candidates(query_emb))
    values, positions = index.top_videos(query_emb, 10, query_chunk=4, progress=False)
    assert torch.equal(positions, exact_positions) and torch.allclose(values, exact_values, atol=1e-6)
    few = VideoSummaryIndex(bank, n_probe=4, n_candidates=2, n_lists=4)  # every list probed: exact summaries
    for found, q in zip(few.candidates(query_emb), query_emb["query"]):
        summaries = video_summaries(bank.embeddings["clips"], bank.embeddings["clip_mask"])
        nearest = {int(bank.window_video[i]) for m in range(2) for i in torch.topk(summaries[:, m] @ q[m], 2).indices}
        assert set(found.tolist()) == nearest


# ----------------------------------------------------------------------------------------------------
# training items

WINDOW_L, WINDOW_STRIDE = 10, 3  # the tiny corpus: 10-30 clips a video, moments of 2-8 clips


def training_set(tiny_corpus, **kwargs):
    return FirstStageDataset(load_data_config(tiny_corpus), "train", max_ctx_len=WINDOW_L, max_desc_len=8,
                             **dict(dict(window_stride=WINDOW_STRIDE, clip_length=1.5), **kwargs))


def test_the_gt_window_holds_the_moment_at_random_offsets(tiny_corpus):
    dataset = training_set(tiny_corpus)
    config = load_data_config(tiny_corpus)
    store = VideoFeatureStore(config.vid_feat_path)
    offsets = set()
    random.seed(0)
    for index in range(len(dataset)):
        row = dataset.rows[index]
        n_clips = store.clip_count(row["vid_name"])
        st, ed = st_ed_label(row["ts"], n_clips, 1.5)
        for _ in range(3):
            item = dataset[index]
            (start,) = item["meta"]["window_starts"]
            assert start in window_starts(n_clips, WINDOW_L, WINDOW_STRIDE) and start <= st and ed < start + WINDOW_L
            expected = store.get(row["vid_name"])[start:start + WINDOW_L]
            assert torch.equal(item["model_inputs"]["visual"]["feat"][0, :len(expected)], torch.from_numpy(expected))
            offsets.add(st - start)
    assert len(offsets) > 3  # the moment is shown at many offsets of its window


def test_hard_negatives_show_a_random_window(tiny_corpus):
    dataset = training_set(tiny_corpus, n_hard_negatives=2)
    store = VideoFeatureStore(load_data_config(tiny_corpus).vid_feat_path)
    idx2video = dataset.idx2video
    random.seed(1)
    starts_seen = set()
    for index in range(12):
        item = dataset[index]
        names = [idx2video[int(i)] for i in item["model_inputs"]["video_idx"]]
        for name, start, feat in zip(names[1:], item["meta"]["window_starts"][1:],
                                     item["model_inputs"]["visual"]["feat"][1:]):
            assert start in window_starts(store.clip_count(name), WINDOW_L, WINDOW_STRIDE)
            expected = store.get(name)[start:start + WINDOW_L]
            assert torch.equal(feat[:len(expected)], torch.from_numpy(expected))
            starts_seen.add(start)
    assert len(starts_seen) > 2


def test_stride_0_items_are_the_original_items_and_draw_no_random_number(tiny_corpus):
    dataset = training_set(tiny_corpus, window_stride=0, clip_length=None, n_hard_negatives=2)
    random.seed(2)
    state = random.getstate()
    item = dataset[0]
    expected_negatives = random.Random()
    expected_negatives.setstate(state)
    ranked = [dataset.idx2video[idx] for idx, _ in dataset.ranklist_store.get(dataset.rows[0]["desc_id"])[:100]
              if idx in dataset.idx2video and dataset.idx2video[idx] != dataset.rows[0]["vid_name"]]
    negatives = expected_negatives.sample(ranked, k=2)
    assert random.getstate() == expected_negatives.getstate()  # only the negatives' sample drew numbers
    names = [dataset.rows[0]["vid_name"]] + negatives
    assert item["meta"]["window_starts"] == [0, 0, 0]
    config = load_data_config(tiny_corpus)
    visual = [VideoFeatureStore(config.vid_feat_path, max_len=WINDOW_L).get(name) for name in names]
    assert max(len(v) for v in visual) == WINDOW_L  # the original reading: the first L clips, zero-padded
    feat = item["model_inputs"]["visual"]["feat"]
    assert torch.equal(feat, torch.from_numpy(np.stack([np.pad(v, ((0, WINDOW_L - len(v)), (0, 0))) for v in visual])))
    assert item["model_inputs"]["visual"]["feat_mask"].sum(1).tolist() == [len(v) for v in visual]


def test_windows_need_the_clip_length(tiny_corpus):
    with pytest.raises(FirstStageError, match="--clip_length"):
        training_set(tiny_corpus, clip_length=None)



def test_evaluation_during_training_ranks_videos_by_their_best_window(tiny_corpus):
    """SplitRanking.metrics (train.py's evaluation) on windows of 10 clips every 3: the VR metrics of ranking
    each video by its best window, every window encoded alone."""
    from easydict import EasyDict
    from method.first_stage import QueryItems, SplitRanking, vr_metrics
    opt = EasyDict(data_ratio=1.0, max_desc_len=8, max_ctx_len=WINDOW_L, ctx_mode="visual_sub",
                   window_stride=WINDOW_STRIDE, eval_query_bsz=2, max_vcmr_video=10)
    torch.manual_seed(0)
    model = FirstStageRetriever(dict(n_heads=2, dropout=0.0), query_dim=8, visual_dim=12, text_dim=8, hidden_dim=16,
                                max_ctx_len=WINDOW_L, ctx_mode="visual_sub").eval()
    ranking = SplitRanking(load_data_config(tiny_corpus), "val", opt)
    videos = ranking.videos
    assert videos.window_stride == WINDOW_STRIDE
    queries = QueryItems(load_data_config(tiny_corpus), ranking.rows, 8)
    with torch.no_grad():
        query_emb = model.encode_queries(*default_collate([queries[i] for i in range(len(queries))]).values())
        scores = torch.stack([torch.stack(list(per_window_scores(model, videos, query_emb, name, WINDOW_L,
                                                                 WINDOW_STRIDE).values()), 1).max(1).values
                              for name in videos.names], dim=1)
    video_idx = torch.tensor([videos.video2idx[name] for name in videos.names])
    expected = vr_metrics(video_idx[torch.argsort(scores, dim=1, descending=True)], ranking.gt_video_idx, 10)
    assert ranking.metrics(model, opt) == expected
