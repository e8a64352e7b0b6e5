"""CONQUER: contextual query-aware ranking for video corpus moment retrieval.

Pipeline for B queries with N candidate videos each (M = B·N, query-major):
query encoder -> Q̂ (B, Lq, H); video encoder -> V̂, Ŝ (M, L, H); QDF gate -> F (M, L, H);
bi-directional attention -> QAL (M, L, 4H); FCPlusTransformer -> C (M, L, H); G = [QAL, C] (M, L, 5H);
moment-localization head -> begin/end logits (B, N, L); video-scoring head (exclusive) -> (B, N).

The video encoder does not see the query, so prediction is split into `encode_query`, `encode_videos`
and `score_encoded`: evaluation can encode every corpus video once and index the result.
"""
import logging

import torch
import torch.nn.functional as F
from easydict import EasyDict
from torch import nn

from method.encoders import VideoQueryEncoder
from method.heads import MomentLocalizationHead, VideoScoringHead
from method.layers import ModelConfigError
from method.qal import BiDirectionalAttention, FCPlusTransformer
from method.qdf import QueryWeightEncoder, query_dependent_fusion
from utils.tvr_format import CTX_MODES

logger = logging.getLogger(__name__)

SIMILARITY_MEASURES = ("general", "exclusive", "disjoint")
INPUT_KEYS = ("feat", "feat_mask", "feat_pos_id", "feat_token_id")


def to_easydict(value):
    """Recursively turn every mapping (dict, OrderedDict, EasyDict) into an EasyDict; lists/tuples keep their type."""
    if isinstance(value, dict):
        return EasyDict({key: to_easydict(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(to_easydict(item) for item in value)
    return value


def _config_value(config, dotted_key):
    node = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ModelConfigError(f"model config: missing key {dotted_key!r}")
        node = node[part]
    return node


def validate_model_config(config, hidden_dim, video_len, similarity_measure, use_moe_gate):
    """Check that model_config.json agrees with itself and with the constructor dimensions."""
    bert_keys = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "type_vocab_size",
                 "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps",
                 "max_position_embeddings")
    must_equal_hidden = ["bert_config.hidden_size", "query_bert_config.hidden_size",
                         "moment_localization_config.conv_cfg_1.in_channels"]
    _config_value(config, "initializer_range")
    for section in ("bert_config", "query_bert_config"):
        for key in bert_keys:
            _config_value(config, f"{section}.{key}")
    _config_value(config, "moment_localization_config.conv_cfg_2")
    if use_moe_gate:
        for key in ("text_cluster", "moe_dropout_prob"):
            _config_value(config, f"netvlad_config.{key}")
        must_equal_hidden.append("netvlad_config.hidden_size")
    if similarity_measure == "exclusive":
        _config_value(config, "video_scoring_config.linear_2_cfg")
        must_equal_hidden.append("video_scoring_config.linear_1_cfg.in_features")
    for key in must_equal_hidden:
        if _config_value(config, key) != hidden_dim:
            raise ModelConfigError(
                f"model config {key} = {_config_value(config, key)} but hidden_dim (--hidden_dim) is {hidden_dim}; "
                "they must be equal")
    max_positions = _config_value(config, "bert_config.max_position_embeddings")
    if video_len > max_positions:
        raise ModelConfigError(
            f"video_len (--max_ctx_len) {video_len} exceeds bert_config.max_position_embeddings {max_positions}: the "
            f"model has no position for clips past {max_positions}; keep --max_ctx_len <= {max_positions} and read "
            "longer videos as windows of that many clips (--window_stride)")


def flatten_video_inputs(inputs):
    """Encoder input dict with feat (B, N, L, D) or (M, L, D) -> new dict of (M, L, ·) views (input untouched)."""
    rank = inputs["feat"].dim()
    if rank == 4:
        return {key: inputs[key].flatten(0, 1) for key in INPUT_KEYS}
    if rank == 3:
        return {key: inputs[key] for key in INPUT_KEYS}
    raise ValueError(f"video features must have shape (B, N, L, D) or (M, L, D), got {tuple(inputs['feat'].shape)}")


def index_encoded_videos(encoded_videos, index):
    """Select rows of `encode_videos` output: {modality: (V, L, H)}, index (M,) -> {modality: (M, L, H)}"""
    return {modality: features[index] for modality, features in encoded_videos.items()}


class CONQUER(nn.Module):
    """CONQUER re-ranker. `config` is the model config (model_config.json, dict or EasyDict); dimensions and
    variant options are those of config/options.py. Extensions, all off by default (faithful): qal_impl "plain" (original
    similarity formulation), masked_vs_pool [Q12], masked_netvlad [Q13], gate_per_query [Q14].
    `memory_light` (default True) trains with the formulations of method/memory_light.py (same values, less
    memory kept for backward); False keeps the plain ops, for tests and benchmarks."""

    def __init__(self, config, visual_dim=4352, text_dim=768, query_dim=768, hidden_dim=768, video_len=100,
                 ctx_mode="visual_sub", lw_st_ed=0.01, lw_video_ce=0.05, similarity_measure="general",
                 use_debug=False, no_output_moe_weight=False, qal_impl="decomposed", masked_vs_pool=False,
                 masked_netvlad=False, gate_per_query=False, memory_light=True):
        super().__init__()
        if ctx_mode not in CTX_MODES:  # [Q28]
            raise ModelConfigError(f"ctx_mode {ctx_mode!r} is unsupported; expected one of {CTX_MODES}")
        if similarity_measure not in SIMILARITY_MEASURES:
            raise ModelConfigError(
                f"similarity_measure {similarity_measure!r} is unsupported; expected one of {SIMILARITY_MEASURES}")
        self.video_modality = ctx_mode.split("_")
        use_moe_gate = not no_output_moe_weight and len(self.video_modality) > 1
        self.config = to_easydict(config)
        validate_model_config(self.config, hidden_dim, video_len, similarity_measure, use_moe_gate)
        self.video_len = video_len
        self.lw_st_ed = lw_st_ed
        self.lw_video_ce = lw_video_ce
        self.similarity_measure = similarity_measure
        if use_debug:
            logger.setLevel(logging.DEBUG)

        self.encoder = VideoQueryEncoder(self.config, self.video_modality, visual_dim=visual_dim, text_dim=text_dim,
                                         query_dim=query_dim, hidden_dim=hidden_dim, split_num=video_len)
        self.query_weight = (QueryWeightEncoder(self.config.netvlad_config, self.video_modality,
                                                masked_netvlad=masked_netvlad, gate_per_query=gate_per_query)
                             if use_moe_gate else None)
        self.query_aware_feature_learning_layer = BiDirectionalAttention(hidden_dim, impl=qal_impl)
        self.contextual_QAL_feature_learning = FCPlusTransformer(self.config.bert_config, hidden_dim * 4)
        self.moment_localization_head = MomentLocalizationHead(
            self.config.moment_localization_config, self.config.bert_config, hidden_dim)
        self.video_scoring_head = (VideoScoringHead(self.config.video_scoring_config, self.config.bert_config,
                                                    hidden_dim, masked_pool=masked_vs_pool)
                                   if similarity_measure == "exclusive" else None)
        self.set_memory_light(memory_light)
        self.reset_parameters()

    def set_memory_light(self, enabled):
        """Switch every submodule between its memory-light and plain training formulation."""
        for module in self.modules():
            if hasattr(module, "memory_light"):
                module.memory_light = bool(enabled)

    def reset_parameters(self):
        """The original's initialisation: Linear/Embedding weights N(0, initializer_range), biases 0, LayerNorm (1, 0),
        Conv1d PyTorch default; NetVLAD clusters keep their construction init."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv1d):
                module.reset_parameters()

    def encode_query(self, query_inputs):
        """query_inputs: dict feat (B, Lq, Dq), feat_mask, feat_pos_id, feat_token_id (B, Lq) -> Q̂ (B, Lq, H)"""
        max_positions = self.config.query_bert_config.max_position_embeddings
        if query_inputs["feat"].shape[1] > max_positions:
            raise ValueError(f"query length {query_inputs['feat'].shape[1]} exceeds "
                             f"query_bert_config.max_position_embeddings {max_positions} (--max_desc_len)")
        return self.encoder.encode_query(query_inputs)

    def encode_videos(self, video_inputs):
        """video_inputs: {"visual": dict (M, L, ·), "sub": dict (M, L, ·) if ctx_mode has sub}
        -> {"visual": V̂ (M, L, H), "sub": Ŝ (M, L, H)}; query-independent, rows independent of each other."""
        for modality in self.video_modality:
            if modality not in video_inputs:
                raise ValueError(f"model inputs have no {modality!r} features but ctx_mode is "
                                 f"{'_'.join(self.video_modality)!r}")
        return self.encoder.encode_videos(video_inputs)

    def score_encoded(self, query_feat, query_mask, encoded_videos, video_mask, n_videos_per_query):
        """query_feat Q̂ (B, Lq, H), query_mask (B, Lq), encoded_videos {modality: (M, L, H)},
        video_mask (M, L) visual mask, N = n_videos_per_query with M = B·N (videos of query i are rows i·N..i·N+N-1)
        -> (video_scores (B, N) or None, begin_logits (B, N, L), end_logits (B, N, L))"""
        b = query_feat.shape[0]
        m, l = video_mask.shape
        if m != b * n_videos_per_query:
            raise ValueError(f"{m} videos do not match {b} queries x {n_videos_per_query} videos per query")
        modality_features = [encoded_videos[modality] for modality in self.video_modality]
        modality_weights = (self.query_weight(query_feat, query_mask, n_videos_per_query)
                            if self.query_weight is not None else None)
        fused = query_dependent_fusion(modality_features, modality_weights)
        qal = self.query_aware_feature_learning_layer(fused, query_feat, video_mask, query_mask)
        contextual_qal = self.contextual_QAL_feature_learning(qal, video_mask)
        g = torch.cat([qal, contextual_qal], dim=2)
        begin_logits, end_logits = self.moment_localization_head(g, contextual_qal, video_mask)
        video_scores = None
        if self.video_scoring_head is not None:
            video_scores = self.video_scoring_head(g, video_mask).view(b, n_videos_per_query)
        return video_scores, begin_logits.view(b, n_videos_per_query, l), end_logits.view(b, n_videos_per_query, l)

    def get_pred_from_raw_query(self, model_inputs):
        """model_inputs: batch dict (method/dataset.py start_end_collate) with query (B, Lq, ·) and visual/sub (B, N, L, ·) or (B·N, L, ·)
        -> (video_scores (B, N) or None, begin_logits (B, N, L), end_logits (B, N, L)). The dict is not modified."""
        query_inputs = model_inputs["query"]
        video_inputs = {}
        for modality in self.video_modality:
            if modality not in model_inputs:
                raise ValueError(f"model inputs have no {modality!r} features but ctx_mode is "
                                 f"{'_'.join(self.video_modality)!r}")
            video_inputs[modality] = flatten_video_inputs(model_inputs[modality])
        b = query_inputs["feat"].shape[0]
        m = video_inputs["visual"]["feat"].shape[0]
        if m % b != 0:
            raise ValueError(f"{m} videos cannot be split evenly among {b} queries")
        logger.debug("CONQUER forward: %d queries x %d videos", b, m // b)
        return self.score_encoded(self.encode_query(query_inputs), query_inputs["feat_mask"],
                                  self.encode_videos(video_inputs), video_inputs["visual"]["feat_mask"], m // b)

    def forward(self, batch):
        """batch: training batch (method/dataset.py start_end_collate) with st_ed_indices (B, 2), GT video at index 0 of each query
        -> (loss, {"moment_ce_loss", "video_ce_loss", "loss_overall"} as floats, already weighted)

        Shared normalization: begin/end softmax runs over the N·L clips of all N videos of a query.
        """
        video_scores, begin_logits, end_logits = self.get_pred_from_raw_query(batch)
        b = begin_logits.shape[0]
        st_ed = batch["st_ed_indices"]
        moment_loss = self.lw_st_ed * (F.cross_entropy(begin_logits.reshape(b, -1), st_ed[:, 0])
                                       + F.cross_entropy(end_logits.reshape(b, -1), st_ed[:, 1]))
        video_loss = moment_loss.new_zeros(())
        if video_scores is not None:
            video_loss = self.lw_video_ce * F.cross_entropy(video_scores, st_ed.new_zeros(b))
        loss = moment_loss + video_loss
        moment_value, video_value, loss_value = torch.stack([moment_loss, video_loss, loss]).detach().tolist()
        return loss, {"moment_ce_loss": moment_value, "video_ce_loss": video_value, "loss_overall": loss_value}
