"""method/first_stage.py: the retriever's encoders and score, the contrastive loss against a plain loop, and the
--model option."""
import math

import pytest
import torch

from config.options import BaseOptions, OptionError
from method.first_stage import (LOSS_NAMES, FirstStageRetriever, contrastive_losses, length_buckets,
                                vr_metrics)

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = dict(query_dim=6, visual_dim=10, text_dim=7, hidden_dim=16, max_ctx_len=12)


def make_model(ctx_mode="visual_sub", **cfg):
    torch.manual_seed(0)
    return FirstStageRetriever(dict(dict(n_heads=2, dropout=0.0), **cfg), ctx_mode=ctx_mode, **DIMS).eval()


def video_inputs(n_videos, lengths, ctx_mode="visual_sub", generator=None):
    length = DIMS["max_ctx_len"]
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
    inputs = {"visual": {"feat": torch.randn(n_videos, length, DIMS["visual_dim"], generator=generator),
                         "feat_mask": mask}}
    if "sub" in ctx_mode:
        inputs["sub"] = {"feat": torch.randn(n_videos, length, DIMS["text_dim"], generator=generator), "feat_mask": mask}
    return inputs


def query_inputs(n_queries, generator=None):
    lengths = torch.randint(2, 8, (n_queries,), generator=generator)
    return (torch.randn(n_queries, 8, DIMS["query_dim"], generator=generator),
            (torch.arange(8)[None, :] < lengths[:, None]).long())


def plain_score(query_emb, video_emb):
    """One (query, video) pair at a time: sum_m w_m * max over valid clips of the dot product."""
    q, w = query_emb["query"], query_emb["modality_weights"]
    clips, mask = video_emb["clips"], video_emb["clip_mask"]
    scores = torch.zeros(q.shape[0], clips.shape[0], dtype=torch.float64)
    for i in range(q.shape[0]):
        for v in range(clips.shape[0]):
            for m in range(q.shape[1]):
                best = max(float(q[i, m] @ clips[v, m, l]) for l in range(clips.shape[2]) if mask[v, l])
                scores[i, v] += float(w[i, m]) * best
    return scores


@pytest.mark.parametrize("ctx_mode", ["visual_sub", "visual"])
def test_encoders_shapes_normalisation_and_score(ctx_mode):
    model = make_model(ctx_mode).requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    query_emb = model.encode_queries(*query_inputs(5, generator))
    video_emb = model.encode_videos(video_inputs(4, [3, 12, 1, 7], ctx_mode, generator))
    n_modalities = 2 if ctx_mode == "visual_sub" else 1
    assert query_emb["query"].shape == (5, n_modalities, 16)
    assert video_emb["clips"].shape == (4, n_modalities, 12, 16) and video_emb["clip_mask"].shape == (4, 12)
    assert torch.allclose(query_emb["query"].norm(dim=-1), torch.ones(5, n_modalities), atol=1e-5)
    valid_clip_norms = video_emb["clips"].norm(dim=-1).transpose(1, 2)[video_emb["clip_mask"]]
    assert torch.allclose(valid_clip_norms, torch.ones_like(valid_clip_norms), atol=1e-5)
    assert torch.allclose(query_emb["modality_weights"].sum(-1), torch.ones(5), atol=1e-6)
    scores = model.score(query_emb, video_emb)
    assert torch.allclose(scores.double(), plain_score(query_emb, video_emb), atol=1e-5)


@pytest.mark.parametrize("n_layers", [0, 2])
def test_encoding_ignores_padding_and_batch_neighbours(n_layers):
    """A video's clips and a query's embedding do not depend on how far they are padded or what else is in
    the batch (ranking buckets videos by length and cuts the padding)."""
    model = make_model(n_video_layers=n_layers, n_query_layers=n_layers)
    generator = torch.Generator().manual_seed(2)
    inputs = video_inputs(3, [5, 12, 2], generator=generator)
    full = model.encode_videos(inputs)
    cut = model.encode_videos({m: {k: v[:1, :5] for k, v in t.items()} for m, t in inputs.items()})
    assert torch.allclose(full["clips"][0, :, :5], cut["clips"][0], atol=1e-5)
    feat, mask = query_inputs(3, generator)
    length = int(mask[0].sum())
    queries = model.encode_queries(feat, mask)
    alone = model.encode_queries(feat[:1, :length], mask[:1, :length])
    for key in ("query", "modality_weights"):
        assert torch.allclose(queries[key][:1], alone[key], atol=1e-5)


def test_clips_without_a_transformer_are_the_layers_applied_to_every_clip():
    """Without a video Transformer only the valid clips are computed: each equals the projection and output
    layers applied to that clip of the padded input; padded clips are zero."""
    model = make_model(n_video_layers=0)
    inputs = video_inputs(3, [5, 12, 2], generator=torch.Generator().manual_seed(3))
    clips = model.encode_videos(inputs)["clips"]
    mask = inputs["visual"]["feat_mask"].bool()
    for m, modality in enumerate(model.modalities):
        expected = torch.nn.functional.normalize(
            model.video_output[modality](model.video_input[modality](inputs[modality]["feat"])), dim=-1)
        assert torch.allclose(clips[:, m][mask], expected[mask], atol=1e-5)
        assert torch.all(clips[:, m][~mask] == 0)


def plain_losses(scores, video_idx, n_videos, temperature):
    """The InfoNCE of both directions, one query (video) at a time, with plain Python sums."""
    batch_size = scores.shape[0]
    logits = scores.double() / temperature
    gt = [int(video_idx[i * n_videos]) for i in range(batch_size)]
    q2v, v2q = 0.0, 0.0
    for i in range(batch_size):
        columns = [j for j in range(scores.shape[1]) if j == i * n_videos or int(video_idx[j]) != gt[i]]
        q2v += -float(logits[i, i * n_videos]) + math.log(sum(math.exp(float(logits[i, j])) for j in columns))
        rows = [k for k in range(batch_size) if k == i or gt[k] != gt[i]]
        v2q += -float(logits[i, i * n_videos]) + math.log(sum(math.exp(float(logits[k, i * n_videos])) for k in rows))
    return q2v / batch_size, v2q / batch_size


@pytest.mark.parametrize("n_videos", [1, 3])
def test_contrastive_losses_match_a_plain_loop(n_videos):
    generator = torch.Generator().manual_seed(3)
    batch_size = 6
    scores = torch.rand(batch_size, batch_size * n_videos, generator=generator) * 2 - 1
    # Queries 0 and 3 share their GT video, and a hard negative of query 1 is query 4's GT video.
    video_idx = torch.randint(100, 200, (batch_size * n_videos,), generator=generator)
    video_idx[3 * n_videos] = video_idx[0]
    if n_videos > 1:
        video_idx[1 * n_videos + 1] = video_idx[4 * n_videos]
    q2v, v2q = contrastive_losses(scores, video_idx, n_videos, temperature=0.07)
    expected = plain_losses(scores, video_idx, n_videos, 0.07)
    assert (float(q2v), float(v2q)) == pytest.approx(expected, rel=1e-5)


def test_forward_returns_the_loss_and_its_parts():
    model = make_model()
    generator = torch.Generator().manual_seed(4)
    feat, mask = query_inputs(4, generator)
    videos = video_inputs(8, [3, 4, 5, 6, 7, 8, 9, 10], generator=generator)
    batch = {"query": {"feat": feat, "feat_mask": mask}, "video_idx": torch.arange(8).reshape(4, 2)}
    for m, tensors in videos.items():
        batch[m] = {k: v.reshape(4, 2, *v.shape[1:]) for k, v in tensors.items()}
    model.train()
    loss, loss_dict = model(batch)
    assert list(loss_dict) == list(LOSS_NAMES)
    assert loss_dict["loss_overall"] == pytest.approx((loss_dict["query_to_video_nce"]
                                                       + loss_dict["video_to_query_nce"]) / 2, rel=1e-6)
    loss.backward()
    assert model.logit_scale.grad is not None and model.video_input["sub"].linear.weight.grad.abs().sum() > 0


def test_fixed_temperature_is_a_buffer():
    model = make_model(temperature=0.1)
    assert "logit_scale" not in dict(model.named_parameters())
    assert float(model.temperature()) == pytest.approx(0.1)


def test_length_buckets_cover_every_video_once():
    mask = (torch.arange(10)[None, :] < torch.tensor([3, 10, 1, 7, 7, 2])[:, None])
    buckets = length_buckets(mask, 4)
    assert sorted(torch.cat([p for p, _ in buckets]).tolist()) == list(range(6))
    assert [length for _, length in buckets] == [7, 10]


def test_vr_metrics():
    ranked = torch.tensor([[5, 1, 2], [2, 5, 1], [1, 2, 3]])
    metrics = vr_metrics(ranked, torch.tensor([5, 5, 9]), max_vcmr_video=2)
    assert (metrics["r1"], metrics["r5"], metrics["gt_in_top_max_vcmr_video"]) == (33.33, 66.67, 66.67)


def test_first_stage_option_and_its_checks(tmp_path):
    argv = ["--exp_id", "x", "--results_root", str(tmp_path), "--device", "-1", "--model", "first_stage"]
    with pytest.raises(OptionError, match="--stop_task VR and --eval_tasks_at_training VR"):
        BaseOptions().parse(argv)
    opt = BaseOptions().parse(argv + ["--stop_task", "VR", "--eval_tasks_at_training", "VR"])
    assert opt.model == "first_stage"
    keys = list(BaseOptions().parse(["--exp_id", "y", "--results_root", str(tmp_path), "--device", "-1",
                                     "--use_interal_vr_scores"]))
    # The new option is the last of the extensions: every earlier key keeps its place in opt.json.
    assert keys[keys.index("gate_per_query") + 1] == "model"


@pytest.mark.parametrize("cfg, message", [
    (dict(temperature="0.05x"), r"key 'temperature' must be \"learned\" or a positive number, found '0.05x'"),
    (dict(temperature=0), r"key 'temperature' must be .* found 0"),
    (dict(init_temperature="hot"), r"key 'init_temperature' must be a positive number, found 'hot'")])
def test_a_bad_temperature_is_a_one_line_error(cfg, message):
    from method.first_stage import FirstStageError
    with pytest.raises(FirstStageError, match=message):
        make_model(**cfg)
    assert make_model(temperature="0.05").temperature() == pytest.approx(0.05)  # a numeric string is a number


def test_the_training_script_states_the_stop_metric():
    from method.first_stage import FirstStageRecipe
    from utils.run_dir import REPO_ROOT
    header = open(f"{REPO_ROOT}/scripts/train_first_stage.sh").read().split("set -euo")[0]
    assert FirstStageRecipe.stop_metric_names == {"VR": ("r10", "r100")}
    assert "VR R@10 + R@100" in header and "R@1," not in header
