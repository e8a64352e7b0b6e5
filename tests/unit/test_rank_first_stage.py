"""method/rank_first_stage.py and the ranking helpers of method/first_stage.py against brute force."""
import pytest
import torch

from method.first_stage import FirstStageRetriever, VideoBank, score_all, top_videos
from method.rank_first_stage import ClipIndex, recall_against, select100

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
    scores = score_all(query_emb, bank, query_chunk=4, video_bucket=5, progress=False)
    assert torch.allclose(scores, brute_force_scores(query_emb, bank), atol=1e-5)
    values, positions = top_videos(scores, 10)
    expected = torch.argsort(brute_force_scores(query_emb, bank), dim=1, descending=True)[:, :10]
    assert torch.equal(positions, expected)
    assert torch.all(values[:, :-1] >= values[:, 1:])
    assert top_videos(scores, 100)[1].shape == (11, 23)  # k is capped at the number of videos


def test_scores_equal_the_model_score_and_a_video_without_clips_ranks_last():
    bank, query_emb = random_bank(9), random_queries(4)
    bank.embeddings["clip_mask"][3] = False
    scores = score_all(query_emb, bank, query_chunk=3, video_bucket=4, progress=False)
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


def test_faiss_candidates_give_the_exact_top_k_when_every_clip_is_a_hit():
    bank, query_emb = random_bank(60, seed=3), random_queries(7, seed=4)
    exact_values, exact_positions = top_videos(score_all(query_emb, bank, progress=False), 10)
    n_clips = int(bank.embeddings["clip_mask"].sum())
    index = ClipIndex(bank, n_lists=4, n_probe=4, n_clip_hits=n_clips)
    values, positions = index.top_videos(query_emb, 10)
    assert torch.equal(positions, exact_positions) and torch.allclose(values, exact_values, atol=1e-6)
    assert recall_against(exact_positions, positions) == 1.0
    few = ClipIndex(bank, n_lists=4, n_probe=1, n_clip_hits=3).top_videos(query_emb, 10)[1]
    assert few.shape == (7, 10) and 0 < recall_against(exact_positions, few) < 1.0
