"""CONQUER forward pass: shapes of every variant, an independent plain re-implementation, padding semantics
(padded clips are scored but never read), the encode-once evaluation path, losses and training behaviour."""
import itertools
import math

import pytest
import torch
from easydict import EasyDict

from method.conquer import CONQUER, ModelConfigError, index_encoded_videos
from method.qdf import QueryWeightEncoder
from model_fixtures import DIMS, clone_batch, load_model_config, make_batch, make_model

VARIANTS = [(measure, ctx_mode, moe) for measure, ctx_mode, moe in
            itertools.product(("general", "disjoint", "exclusive"), ("visual_sub", "visual"), (True, False))]


def predict(model, batch):
    with torch.no_grad():
        return model.eval().get_pred_from_raw_query(batch)


# ---------------------------------------------------------------------------------------------------
# Shapes, losses, input handling

@pytest.mark.parametrize("measure, ctx_mode, moe", VARIANTS)
def test_output_shapes_and_loss_dict(measure, ctx_mode, moe):
    torch.manual_seed(0)
    model = make_model(similarity_measure=measure, ctx_mode=ctx_mode, no_output_moe_weight=not moe)
    assert (model.query_weight is not None) == (moe and ctx_mode == "visual_sub")
    batch = make_batch(b=2, n=3)
    scores, begin, end = predict(model, batch)
    assert begin.shape == end.shape == (2, 3, 12)
    assert (scores is None) == (measure != "exclusive")
    if scores is not None:
        assert scores.shape == (2, 3)
    model.train()
    loss, parts = model(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(parts) == {"moment_ce_loss", "video_ce_loss", "loss_overall"}
    assert all(type(value) is float for value in parts.values())
    assert (parts["video_ce_loss"] == 0.0) == (measure != "exclusive")
    assert parts["loss_overall"] == pytest.approx(parts["moment_ce_loss"] + parts["video_ce_loss"], rel=1e-6)
    assert parts["loss_overall"] == pytest.approx(loss.item(), rel=1e-6)


def test_losses_follow_shared_normalization():
    """moment loss = lw_st_ed · (CE over the N·L clips of all videos, begin + end); video loss = lw_video_ce · CE."""
    torch.manual_seed(0)
    model = make_model(similarity_measure="exclusive", lw_st_ed=0.3, lw_video_ce=0.7).eval()
    batch = make_batch()
    scores, begin, end = model.get_pred_from_raw_query(batch)
    _, parts = model(batch)
    st_ed = batch["st_ed_indices"]

    def ce(logits, target):  # mean over queries of −log softmax(logits)[target]
        return -torch.stack([torch.log_softmax(row.double(), 0)[t] for row, t in zip(logits, target)]).mean()

    b = begin.shape[0]
    moment = 0.3 * (ce(begin.reshape(b, -1), st_ed[:, 0]) + ce(end.reshape(b, -1), st_ed[:, 1]))
    video = 0.7 * ce(scores, torch.zeros(b, dtype=torch.long))
    assert parts["moment_ce_loss"] == pytest.approx(moment.item(), rel=1e-5)
    assert parts["video_ce_loss"] == pytest.approx(video.item(), rel=1e-5)


def test_caller_batch_is_not_modified_and_rank3_inputs_agree():
    torch.manual_seed(0)
    model = make_model(similarity_measure="exclusive")
    batch = make_batch()
    original = clone_batch(batch)
    outputs = predict(model, batch)
    model.train()(batch)
    for modality in ("query", "visual", "sub"):
        for key, value in batch[modality].items():
            assert value.shape == original[modality][key].shape and torch.equal(value, original[modality][key])
    flat = clone_batch(batch)
    for modality in ("visual", "sub"):
        flat[modality] = {key: value.flatten(0, 1) for key, value in flat[modality].items()}
    for ours, theirs in zip(outputs, predict(model, flat)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_bad_configuration_and_inputs_give_clear_errors():
    with pytest.raises(ModelConfigError, match="ctx_mode 'sub'"):
        make_model(ctx_mode="sub")
    with pytest.raises(ModelConfigError, match="similarity_measure"):
        make_model(similarity_measure="cosine")
    config = load_model_config("tiny")
    with pytest.raises(ModelConfigError, match="hidden_dim"):
        CONQUER(config, hidden_dim=48, video_len=12, **DIMS)
    del config["netvlad_config"]["text_cluster"]
    with pytest.raises(ModelConfigError, match="netvlad_config.text_cluster"):
        CONQUER(config, hidden_dim=32, video_len=12, **DIMS)
    model = make_model(video_len=12)
    with pytest.raises(ValueError, match="max_ctx_len"):
        predict(model, make_batch(video_len=10))
    batch = make_batch()
    del batch["sub"]
    with pytest.raises(ValueError, match="'sub'"):
        predict(model, batch)
    with pytest.raises(ValueError, match="max_desc_len"):
        predict(model, make_batch(query_len=31))


# ---------------------------------------------------------------------------------------------------
# Independent plain re-implementation (float64, einsum, same weights)

def reference_forward(model, config, batch, measure, ctx_mode="visual_sub", moe=True):
    """The model written out directly: ctx_mode visual_sub (with or without the MoE gate) or visual."""
    sd = {name: tensor.double() for name, tensor in model.state_dict().items()}
    bert = config["bert_config"]
    heads = bert["num_attention_heads"]

    def layer_norm(x, prefix, eps=1e-5):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]

    def dense(x, prefix):
        return torch.einsum("...i,oi->...o", x, sd[prefix + ".weight"]) + sd[prefix + ".bias"]

    def linear_layer(x, prefix):
        return torch.relu(dense(layer_norm(x, prefix + ".LayerNorm"), prefix + ".net.1"))

    def bert_layer(h, mask, prefix):
        m, t, hidden = h.shape
        d = hidden // heads
        q, k, v = (dense(h, f"{prefix}.attention.self.{name}").view(m, t, heads, d)
                   for name in ("query", "key", "value"))
        additive_mask = (1 - mask.double())[:, None, None, :] * -10000.0
        scores = torch.einsum("mthd,mshd->mhts", q, k) / math.sqrt(d) + additive_mask
        probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
        probs = probs / probs.sum(-1, keepdim=True)
        context = torch.einsum("mhts,mshd->mthd", probs, v).reshape(m, t, hidden)
        a = layer_norm(h + dense(context, f"{prefix}.attention.output.dense"), f"{prefix}.attention.output.LayerNorm")
        f = dense(a, f"{prefix}.intermediate.dense")
        f = f * 0.5 * (1 + torch.erf(f / math.sqrt(2.0)))
        return layer_norm(a + dense(f, f"{prefix}.output.dense"), f"{prefix}.output.LayerNorm")

    def bert_encoder(h, mask, prefix):
        for i in range(bert["num_hidden_layers"]):
            h = bert_layer(h, mask, f"{prefix}.layer.{i}")
        return h

    def embedded_transformer(x, pos, tok, mask, prefix):
        e = x + sd[f"{prefix}.embeddings.token_type_embeddings.weight"][tok] \
            + sd[f"{prefix}.embeddings.position_embeddings.weight"][pos]
        return bert_encoder(layer_norm(e, f"{prefix}.embeddings.LayerNorm", bert["layer_norm_eps"]), mask,
                            f"{prefix}.encoder")

    def fc_transformer(x, mask, prefix):
        return bert_encoder(linear_layer(x, prefix + ".trans_linear"), mask, prefix + ".encoder")

    def conv_se(x, mask, prefix):
        w1 = sd[prefix + ".clip_score_predictor.0.weight"]  # (C, H, k)
        w2 = sd[prefix + ".clip_score_predictor.2.weight"]  # (1, C, 1)
        m, l, h = x.shape
        k = w1.shape[2]
        padded = torch.cat([x.new_zeros(m, k // 2, h), x, x.new_zeros(m, k // 2, h)], dim=1)
        hidden = sum(torch.einsum("mlh,ch->mlc", padded[:, j:j + l], w1[:, :, j]) for j in range(k))
        logits = torch.einsum("mlc,c->ml", torch.relu(hidden), w2[0, :, 0])
        return logits * mask + (1 - mask) * -1e4

    def flat(x):
        return x.flatten(0, 1)

    query, visual, sub = batch["query"], batch["visual"], batch.get("sub")
    b, n, l = visual["feat_mask"].shape
    q_hat = embedded_transformer(linear_layer(query["feat"].double(), "encoder.queryEncoder.linear"),
                                 query["feat_pos_id"], query["feat_token_id"], query["feat_mask"],
                                 "encoder.queryEncoder.transformer")
    q = q_hat.repeat_interleave(n, 0)
    mq = query["feat_mask"].repeat_interleave(n, 0).double()
    mv = flat(visual["feat_mask"]).double()
    if ctx_mode == "visual":  # one modality: no gate, the fused features are the encoded visual ones
        fused = embedded_transformer(linear_layer(flat(visual["feat"]).double(), "encoder.videoEncoder.linear"),
                                     flat(visual["feat_pos_id"]), flat(visual["feat_token_id"]),
                                     flat(visual["feat_mask"]), "encoder.videoEncoder.transformer")
    else:
        sequence = torch.cat([linear_layer(flat(visual["feat"]).double(), "encoder.videoEncoder.img_linear"),
                              linear_layer(flat(sub["feat"]).double(), "encoder.videoEncoder.text_linear")], dim=1)
        encoded = embedded_transformer(
            sequence, torch.cat([flat(visual["feat_pos_id"]), flat(sub["feat_pos_id"])], 1),
            torch.cat([flat(visual["feat_token_id"]), flat(sub["feat_token_id"])], 1),
            torch.cat([flat(visual["feat_mask"]), flat(sub["feat_mask"])], 1), "encoder.videoEncoder.transformer")
        v_hat, s_hat = encoded[:, :l], encoded[:, l:]
        if moe:
            # NetVLAD gate over every query token, padded ones included.
            assign = torch.softmax(layer_norm(torch.einsum("mtd,dk->mtk", q, sd["query_weight.text_pooling.clusters"]),
                                              "query_weight.text_pooling.LayerNorm"), dim=-1)
            centres = sd["query_weight.text_pooling.clusters2"]
            vlad = torch.einsum("mtk,mtd->mdk", assign, q) - assign.sum(1)[:, None, :] * centres
            vlad = vlad / vlad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            vlad = vlad.reshape(vlad.shape[0], -1)
            vlad = vlad / vlad.norm(dim=1, keepdim=True).clamp_min(1e-12)
            gate = torch.softmax(vlad @ sd["query_weight.moe_fc_txt.weight"].T, dim=1)
            fused = gate[:, 0, None, None] * v_hat + gate[:, 1, None, None] * s_hat
        else:  # plain mean of the two modalities
            fused = (v_hat + s_hat) / 2

    # Trilinear similarity from the explicit concat, BiDAF attention, QAL.
    lq = q.shape[1]
    f_rep = fused[:, :, None, :].expand(-1, -1, lq, -1)
    q_rep = q[:, None, :, :].expand(-1, l, -1, -1)
    similarity = torch.cat([f_rep, q_rep, f_rep * q_rep], dim=-1) @ sd[
        "query_aware_feature_learning_layer.similarity_weight.weight"][0]
    pair = mv[:, :, None] * mq[:, None, :]
    similarity = similarity * pair + (1 - pair) * -1e10
    v2q = torch.einsum("mlj,mjh->mlh", torch.softmax(similarity, -1), q)
    q2v = torch.einsum("ml,mlh->mh", torch.softmax(similarity.max(-1).values, -1), fused)
    qal = torch.cat([fused, v2q, fused * v2q, fused * q2v[:, None, :]], dim=-1)

    contextual = fc_transformer(qal, mv, "contextual_QAL_feature_learning")
    g = torch.cat([qal, contextual], dim=-1)
    begin_features = fc_transformer(g, mv, "moment_localization_head.begin_feature_modeling")
    end_features = fc_transformer(torch.cat([contextual, begin_features], -1), mv,
                                  "moment_localization_head.end_feature_modeling")
    begin = conv_se(begin_features, mv, "moment_localization_head.begin_score_modeling").view(b, n, l)
    end = conv_se(end_features, mv, "moment_localization_head.end_score_modeling").view(b, n, l)
    scores = None
    if measure == "exclusive":
        pooled = fc_transformer(g, mv, "video_scoring_head.video_feature_modeling").max(dim=1).values
        hidden = torch.relu(pooled @ sd["video_scoring_head.video_score_predictor.0.weight"].T)
        scores = (hidden @ sd["video_scoring_head.video_score_predictor.2.weight"].T).view(b, n)
    return scores, begin, end


def reference_loss(scores, begin, end, st_ed, lw_st_ed=0.01, lw_video_ce=0.05):
    """Shared-normalization losses written out: -log softmax over all N*L clips of the query's videos."""
    def ce(logits, target):
        return -(logits.log_softmax(dim=1)[torch.arange(len(target)), target]).mean()

    b = begin.shape[0]
    loss = lw_st_ed * (ce(begin.reshape(b, -1), st_ed[:, 0]) + ce(end.reshape(b, -1), st_ed[:, 1]))
    return loss if scores is None else loss + lw_video_ce * ce(scores, torch.zeros(b, dtype=torch.int64))


FORWARD_VARIANTS = [("general", "visual_sub", True, "decomposed"), ("general", "visual_sub", True, "plain"),
                    ("exclusive", "visual_sub", True, "decomposed"), ("exclusive", "visual_sub", True, "plain"),
                    ("general", "visual", False, "decomposed"), ("exclusive", "visual", False, "plain"),
                    ("general", "visual_sub", False, "decomposed"), ("exclusive", "visual_sub", False, "plain")]


@pytest.mark.parametrize("measure, ctx_mode, moe, qal_impl", FORWARD_VARIANTS)
def test_forward_and_loss_match_independent_reimplementation(measure, ctx_mode, moe, qal_impl):
    torch.manual_seed(0)
    dims = {"visual_dim": 40, "text_dim": 24, "query_dim": 16}
    model = make_model("small", dims=dims, similarity_measure=measure, qal_impl=qal_impl, ctx_mode=ctx_mode,
                       no_output_moe_weight=not moe)
    with torch.no_grad():  # leave the trivial init: nonlinearities in their curved range, LayerNorms not (1, 0)
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
            elif param.dim() == 2:
                param.normal_(0.0, 0.15)
    batch = make_batch(b=2, n=3, dims=dims, seed=1)
    if ctx_mode == "visual":
        del batch["sub"]
    assert (batch["visual"]["feat_mask"] == 0).any() and (batch["query"]["feat_mask"] == 0).any()
    ours = predict(model, batch)
    reference = reference_forward(model, load_model_config("small"), batch, measure, ctx_mode, moe)
    for mine, theirs in zip(ours, reference):
        if theirs is None:
            assert mine is None
        else:
            torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=5e-6)
    masked = batch["visual"]["feat_mask"] == 0
    assert torch.all(ours[1][masked] == -1e4) and torch.all(ours[2][masked] == -1e4)
    with torch.no_grad():
        loss, loss_dict = model.eval()(clone_batch(batch))
    expected = reference_loss(*reference, batch["st_ed_indices"])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert loss_dict["loss_overall"] == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Padding semantics: what is read and what is provably not

def perturbed(batch, modality, index, positions):
    """Copy of `batch` with large random values written into feat[index][positions] (padding stays masked)."""
    batch = clone_batch(batch)
    target = batch[modality]["feat"][index]
    target[positions] = 5 * torch.randn_like(target[positions])
    return batch


def max_change(outputs_a, outputs_b):
    return max((a - b).abs().max().item() for a, b in zip(outputs_a, outputs_b) if a is not None)


def valid_logit_change(outputs_a, outputs_b, valid):
    return max((a[valid] - b[valid]).abs().max().item() for a, b in zip(outputs_a[1:], outputs_b[1:]))


def test_padded_query_token_and_adjacent_padded_clip_are_read():
    """A padded query token reaches valid logits through NetVLAD [Q13] and through the uniform V2Q rows of
    padded clips, which the kernel-5 ConvSE reads at the last two valid clips; the first padded clip is
    read by that convolution too."""
    torch.manual_seed(0)
    model = make_model()
    batch = make_batch(visual_valid=torch.tensor([[6, 12, 9], [12, 5, 12]]), query_valid=torch.tensor([4, 7]))
    valid = batch["visual"]["feat_mask"].bool()
    base = predict(model, batch)
    assert valid_logit_change(base, predict(model, perturbed(batch, "query", 0, slice(5, 7))), valid) > 1e-4
    assert valid_logit_change(base, predict(model, perturbed(batch, "visual", (0, 0), slice(6, 7))), valid) > 1e-4


@pytest.mark.parametrize("measure, masked_vs_pool, score_changes", [
    ("general", False, False), ("exclusive", False, True), ("exclusive", True, False)])
def test_padded_clips_two_past_the_last_valid_clip_are_unread(measure, masked_vs_pool, score_changes):
    """Video (0, 0) has 6 valid visual clips and 4 valid subtitle rows out of L = 12. Rows t ≥ 8 (both
    modalities padded) are read only as: keys of masked attention (weight exp(−10000 − max) = 0 exactly);
    their own query rows of every Transformer, which only feed row t of F, QAL, C, G, begin/end features;
    Q2V, whose softmax gives them weight exp(−1e10 − max) = 0; ConvSE, whose kernel-5 window reaches t only
    from outputs at t − 2 ≥ 6, which are masked to exactly −1e4; and the VS-head max-pool over all L [Q12].
    So begin/end logits are unchanged, and so is the video score once the max-pool is masked."""
    torch.manual_seed(0)
    model = make_model(similarity_measure=measure, masked_vs_pool=masked_vs_pool)
    batch = make_batch(visual_valid=torch.tensor([[6, 12, 9], [12, 5, 12]]),
                       sub_valid=torch.tensor([[4, 12, 3], [12, 7, 2]]))
    changed = perturbed(perturbed(batch, "visual", (0, 0), slice(8, 12)), "sub", (0, 0), slice(8, 12))
    base, after = predict(model, batch), predict(model, changed)
    torch.testing.assert_close(after[1:], base[1:], rtol=0, atol=1e-6)
    if measure == "exclusive":
        assert ((after[0] - base[0]).abs().max().item() > 1e-5) == score_changes


@pytest.mark.parametrize("options, outputs_change", [
    ({}, True), ({"masked_netvlad": True}, False), ({"no_output_moe_weight": True}, False)])
def test_padded_query_token_with_full_length_videos(options, outputs_change):
    """With every clip valid there are no uniform V2Q rows; a padded query token then only reaches the outputs
    through the NetVLAD gate [Q13]: its similarity entries are masked to −1e10, so its V2Q weight is exactly
    0 and it never wins the Q2V max. Masked NetVLAD, or no gate at all, makes it unread."""
    torch.manual_seed(0)
    model = make_model(**options)
    batch = make_batch(visual_valid=torch.full((2, 3), 12), query_valid=torch.tensor([4, 7]))
    change = max_change(predict(model, batch), predict(model, perturbed(batch, "query", 0, slice(4, 7))))
    assert (change > 1e-4) == outputs_change
    if not outputs_change:
        assert change < 1e-6


# ---------------------------------------------------------------------------------------------------
# Encode-once evaluation path and the MoE gate

@pytest.mark.parametrize("measure, ctx_mode", [("general", "visual_sub"), ("exclusive", "visual_sub"),
                                               ("disjoint", "visual")])
def test_encode_videos_once_then_index_equals_per_pair_forward(measure, ctx_mode):
    torch.manual_seed(0)
    model = make_model(similarity_measure=measure, ctx_mode=ctx_mode).eval()
    pool = make_batch(b=1, n=5, seed=3)  # 5 distinct videos
    pool_videos = {m: {k: v[0] for k, v in pool[m].items()} for m in ("visual", "sub")}
    rows = torch.tensor([[0, 2, 2], [4, 0, 1]])  # repeated videos, as in evaluation [Q38]
    batch = make_batch(b=2, n=3, seed=4)
    for modality in ("visual", "sub"):
        batch[modality] = {k: v[rows] for k, v in pool_videos[modality].items()}
    with torch.no_grad():
        per_pair = model.get_pred_from_raw_query(batch)
        encoded = index_encoded_videos(model.encode_videos(pool_videos), rows.flatten())
        once = model.score_encoded(model.encode_query(batch["query"]), batch["query"]["feat_mask"], encoded,
                                   pool_videos["visual"]["feat_mask"][rows.flatten()], rows.shape[1])
    for a, b in zip(per_pair, once):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_gate_dropout_per_copy_or_per_query():
    """[Q14] in training the faithful gate draws its dropout per (query, video) copy; gate_per_query once per
    query. In eval both equal one gate per query repeated."""
    config = load_model_config("tiny")["netvlad_config"]
    config = dict(config, moe_dropout_prob=0.5)
    torch.manual_seed(0)
    faithful = QueryWeightEncoder(EasyDict(config), ["visual", "sub"])
    torch.nn.init.normal_(faithful.moe_fc_txt.weight, std=1.0)
    per_query = QueryWeightEncoder(EasyDict(config), ["visual", "sub"], gate_per_query=True)
    per_query.load_state_dict(faithful.state_dict())
    query, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.long)
    copies = faithful.train()(query, mask, 4).view(2, 4, 2)
    assert not torch.allclose(copies[:, 0], copies[:, 1])
    repeated = per_query.train()(query, mask, 4).view(2, 4, 2)
    assert torch.equal(repeated[:, 0], repeated[:, 3])
    torch.testing.assert_close(faithful.eval()(query, mask, 4), per_query.eval()(query, mask, 4))


# ---------------------------------------------------------------------------------------------------
# Training behaviour

def test_gradients_reach_every_parameter_and_are_finite():
    torch.manual_seed(0)
    model = make_model(similarity_measure="exclusive").train()
    loss, _ = model(make_batch())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert sum(param.grad.abs().sum().item() > 0 for param in model.parameters()) == len(list(model.parameters()))


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = make_model(similarity_measure="exclusive").train()
    batch = make_batch(seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss, parts = model(batch)
        loss.backward()
        optimizer.step()
        losses.append(parts["loss_overall"])
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0], losses
