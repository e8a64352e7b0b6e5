"""method/rank_first_stage.py and the ranking helpers of method/first_stage.py against brute force."""
import os

import pytest
import torch

from method.first_stage import FirstStageRetriever, VideoBank, top_videos
from method.oracle import score_all_reference
from method.rank_first_stage import VideoSummaryIndex, recall_against, select100, video_summaries

pytestmark = pytest.mark.usefixtures("one_thread")


def random_bank(n_videos, n_modalities=2, length=9, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    clips = torch.nn.functional.normalize(torch.randn(n_videos, n_modalities, length, dim, generator=generator), dim=-1)
    lengths = torch.randint(1, length + 1, (n_videos,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    names = [f"v{i}" for i in range(n_videos)]
    return VideoBank(names, torch.arange(n_videos) + 1000, {"clips": clips, "clip_mask": mask})


def random_queries(n_queries, n_modalities=2, dim=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {"query": torch.nn.functional.normalize(torch.randn(n_queries, n_modalities, dim, generator=generator),
                                                   dim=-1),
            "modality_weights": torch.softmax(torch.randn(n_queries, n_modalities, generator=generator), dim=-1)}


def brute_force_scores(query_emb, bank):
    q, w = query_emb["query"], query_emb["modality_weights"]
    clips, mask = bank.embeddings["clips"], bank.embeddings["clip_mask"]
    scores = torch.zeros(q.shape[0], len(bank))
    for i in range(q.shape[0]):
        for v in range(len(bank)):
            valid = clips[v][:, mask[v]]  # (M, n, D)
            scores[i, v] = sum(w[i, m] * (valid[m] @ q[i, m]).max() for m in range(q.shape[1]))
    return scores


def test_chunked_bucketed_scores_equal_brute_force():
    bank, query_emb = random_bank(23), random_queries(11)
    scores = score_all_reference(query_emb, bank, query_chunk=4, video_bucket=5, progress=False)
    assert torch.allclose(scores, brute_force_scores(query_emb, bank), atol=1e-5)
    values, positions = top_videos(scores, 10)
    expected = torch.argsort(brute_force_scores(query_emb, bank), dim=1, descending=True)[:, :10]
    assert torch.equal(positions, expected)
    assert torch.all(values[:, :-1] >= values[:, 1:])
    assert top_videos(scores, 100)[1].shape == (11, 23)  # k is capped at the number of videos


def test_scores_equal_the_model_score_and_a_video_without_clips_ranks_last():
    bank, query_emb = random_bank(9), random_queries(4)
    bank.embeddings["clip_mask"][3] = False
    scores = score_all_reference(query_emb, bank, query_chunk=3, video_bucket=4, progress=False)
    expected = FirstStageRetriever.score(query_emb, bank.embeddings)
    assert torch.equal(torch.isinf(scores), torch.isinf(expected)) and torch.all(torch.isinf(scores[:, 3]))
    finite = torch.isfinite(expected)
    assert torch.allclose(scores[finite], expected[finite], atol=1e-5)


def test_select100_keeps_queries_with_gt_in_the_top_100():
    rows = [{"desc_id": i} for i in range(3)]
    ranked = torch.arange(300).reshape(3, 100) % 150
    ranked = torch.cat([ranked, torch.full((3, 5), 777)], dim=1)  # GT 777 of query 2 only at rank 101
    kept = select100(rows, ranked, torch.tensor([5, 149, 777]))
    assert kept == rows[:2]


def test_video_summaries_are_normalised_means_of_the_valid_clips():
    bank = random_bank(5, seed=2)
    clips, mask = bank.embeddings["clips"], bank.embeddings["clip_mask"]
    summaries = video_summaries(clips, mask)
    for v in range(5):
        for m in range(2):
            mean = clips[v, m][mask[v]].mean(dim=0)
            assert torch.allclose(summaries[v, m], mean / mean.norm(), atol=1e-6)


def test_faiss_gives_the_exact_top_k_when_the_candidates_cover_every_video():
    bank, query_emb = random_bank(60, seed=3), random_queries(7, seed=4)
    exact_values, exact_positions = top_videos(score_all_reference(query_emb, bank, progress=False), 10)
    index = VideoSummaryIndex(bank, n_probe=4, n_candidates=60, n_lists=4)
    values, positions = index.top_videos(query_emb, 10, query_chunk=3, progress=False)
    assert torch.equal(positions, exact_positions) and torch.allclose(values, exact_values, atol=1e-6)
    assert recall_against(exact_positions, positions) == 1.0


def test_faiss_merges_the_modalities_and_fills_short_candidate_lists():
    bank, query_emb = random_bank(60, seed=3), random_queries(7, seed=4)
    index = VideoSummaryIndex(bank, n_probe=4, n_candidates=3, n_lists=4)  # every list probed: exact search
    summaries = video_summaries(bank.embeddings["clips"], bank.embeddings["clip_mask"])
    for q, found in zip(query_emb["query"], index.candidates(query_emb)):
        nearest = {int(i) for m in range(2) for i in torch.topk(summaries[:, m] @ q[m], 3).indices}
        assert set(found.tolist()) == nearest
    values, positions = index.top_videos(query_emb, 10, progress=False)
    assert positions.shape == (7, 10) and all(len(set(row.tolist())) == 10 for row in positions)
    exact = brute_force_scores(query_emb, bank)
    assert torch.allclose(values, exact.gather(1, positions), atol=1e-5)  # every listed video scored exactly
    assert torch.all(values[:, :-1] >= values[:, 1:])


def test_faiss_recall_on_clustered_videos():
    """Videos around 20 topics; the summary index with a few hundred candidates finds almost all of the top 20."""
    generator = torch.Generator().manual_seed(5)
    topics = torch.randn(20, 2, 16, generator=generator)
    centres = topics[torch.randint(0, 20, (2000,), generator=generator)]
    centres = centres + 0.5 * torch.randn(2000, 2, 16, generator=generator)
    clips = centres[:, :, None] + 0.4 * torch.randn(2000, 2, 6, 16, generator=generator)
    clips = torch.nn.functional.normalize(clips, dim=-1)
    bank = VideoBank([str(i) for i in range(2000)], torch.arange(2000),
                     {"clips": clips, "clip_mask": torch.ones(2000, 6, dtype=torch.bool)})
    picked = clips[torch.randint(0, 2000, (30,), generator=generator), :, 0]
    noise = 0.2 * torch.randn(30, 2, 16, generator=generator)
    query_emb = {"query": torch.nn.functional.normalize(picked + noise, dim=-1),
                 "modality_weights": torch.softmax(torch.randn(30, 2, generator=generator), dim=-1)}
    exact_positions = top_videos(score_all_reference(query_emb, bank, progress=False), 20)[1]
    index = VideoSummaryIndex(bank, n_probe=8, n_candidates=200, n_lists=32)
    recall = recall_against(exact_positions, index.top_videos(query_emb, 20, progress=False)[1])
    assert 0.9 <= recall
    few = VideoSummaryIndex(bank, n_probe=1, n_candidates=20, n_lists=32).top_videos(query_emb, 20, progress=False)[1]
    assert recall_against(exact_positions, few) < recall


def test_rank_videos_keeps_the_top_k_per_query_chunk():
    """Equal to a full sort of the whole score matrix, with windows (bank rows are windows, reduced by video_max)."""
    from method.first_stage import rank_videos, video_max
    bank, query_emb = random_bank(12, seed=6), random_queries(11, seed=7)
    windowed = VideoBank([f"v{i}" for i in range(5)], torch.arange(5), bank.embeddings,
                         window_video=torch.tensor([0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4]))
    expected = top_videos(video_max(score_all_reference(query_emb, windowed, progress=False), windowed.window_video, 5), 4)
    values, positions = rank_videos(query_emb, windowed, 4, query_chunk=3, video_bucket=5, progress=False)
    assert torch.equal(positions, expected[1]) and torch.allclose(values, expected[0])
    assert rank_videos(query_emb, windowed, 100, query_chunk=3, progress=False)[1].shape == (11, 5)


def test_faiss_check_ranks_only_a_sample_exactly():
    from method.rank_first_stage import faiss_check
    bank, query_emb = random_bank(30, seed=3), random_queries(40, seed=4)
    exact = top_videos(score_all_reference(query_emb, bank, progress=False), 10)[1]
    approximate = exact.clone()
    approximate[:, 5:] = -1  # half of every approximate list is wrong
    check = faiss_check(query_emb, bank, approximate, n_check=8, query_chunk=3)
    assert check == {"k": 10, "recall": 0.5, "queries_checked": 8}
    assert faiss_check(query_emb, bank, approximate, n_check=100, query_chunk=3)["queries_checked"] == 40
    assert faiss_check(query_emb, bank, approximate, n_check=0, query_chunk=3) is None


def test_bad_options_are_one_line_errors(monkeypatch, tmp_path):
    from method.rank_first_stage import check_device, parse_args
    from utils.errors import OptionError
    with pytest.raises(OptionError, match=r"--train_top 50: at least 100, the top that train_select100"):
        parse_args(["--model_dir", "x", "--train_top", "50"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match=r"--device 0: CUDA is not available on this machine; use --device -1"):
        check_device(0)
    assert check_device(-1) == torch.device("cpu")


def test_default_splits_are_those_with_queries(tmp_path):
    from method.rank_first_stage import splits_to_rank
    paths = {key: str(tmp_path / f"{key}.jsonl") for key in ("train_data_path", "eval_data_path", "test_data_path")}
    for key, text in (("train_data_path", '{"desc_id": 1}\n'), ("eval_data_path", '\n{"desc_id": 2}\n'),
                      ("test_data_path", "")):
        (tmp_path / f"{key}.jsonl").write_text(text)
    assert splits_to_rank(paths, None) == (["train", "val"], "ranking the splits with queries: train, val "
                                                             "(test_public: no queries)")
    assert splits_to_rank(paths, ["val"])[0] == ["val"]
    os.remove(paths["test_data_path"])
    assert splits_to_rank(paths, None)[0] == ["train", "val"]


def test_metrics_label_recall_by_the_list_length():
    from method.rank_first_stage import format_metrics
    m = dict(r1=50.0, r5=60.0, r10=70.0, r100=80.0, gt_in_top_max_vcmr_video=70.0)
    lines = format_metrics({"val": {"list_length": 20, "first_stage": m, "input_ranklist": None,
                                    "faiss_recall_vs_exact": {"k": 20, "recall": 0.95, "queries_checked": 8}}})
    assert "(lists of 20: R@100 is R@20)" in lines[1]
    assert lines[2] == "val          FAISS recall@20 vs exact (8 sampled queries): 0.95"
    assert "R@100 is" not in format_metrics({"val": {"list_length": 100, "first_stage": m}})[1]
