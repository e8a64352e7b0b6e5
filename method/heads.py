"""Output heads: moment localization (begin/end logits) and video scoring."""
import torch
from torch import nn

from method.layers import CONVSE_MASK_VALUE, mask_logits
from method.qal import FCPlusTransformer


class ConvSE(nn.Module):
    """Clip scorer over time: Conv1d(H->C, k) -> ReLU -> Conv1d(C->1, 1) (`clip_score_predictor.0/.2`)."""

    def __init__(self, config):
        super().__init__()
        self.clip_score_predictor = nn.Sequential(
            nn.Conv1d(**config.conv_cfg_1), nn.ReLU(), nn.Conv1d(**config.conv_cfg_2))

    def forward(self, features, mask):
        """features (M, L, H), mask (M, L) -> logits (M, L), masked clips exactly -1e4

        The kernel-5 convolution reads the two (padded) neighbours of the last valid clips.
        """
        scores = self.clip_score_predictor(features.transpose(1, 2)).squeeze(1)
        return mask_logits(scores, mask, CONVSE_MASK_VALUE)


class MomentLocalizationHead(nn.Module):
    """Begin features from G, end features from [C, begin features]; ConvSE turns each into logits."""

    def __init__(self, config, bert_config, hidden_dim):
        super().__init__()
        self.begin_feature_modeling = FCPlusTransformer(bert_config, hidden_dim * 5)
        self.end_feature_modeling = FCPlusTransformer(bert_config, hidden_dim * 2)
        self.begin_score_modeling = ConvSE(config)
        self.end_score_modeling = ConvSE(config)

    def forward(self, g, contextual_qal, mask):
        """g (M, L, 5H), contextual_qal C (M, L, H), mask (M, L) -> begin, end logits, each (M, L)"""
        begin_features = self.begin_feature_modeling(g, mask)
        end_features = self.end_feature_modeling(torch.cat([contextual_qal, begin_features], dim=2), mask)
        return self.begin_score_modeling(begin_features, mask), self.end_score_modeling(end_features, mask)


class VideoScoringHead(nn.Module):
    """Video score from a max-pool over clips of FCPlusTransformer(G), then a two-layer MLP (exclusive only)."""

    def __init__(self, config, bert_config, hidden_dim, masked_pool=False):
        super().__init__()
        self.video_feature_modeling = FCPlusTransformer(bert_config, hidden_dim * 5)
        self.video_score_predictor = nn.Sequential(
            nn.Linear(**config.linear_1_cfg), nn.ReLU(), nn.Linear(**config.linear_2_cfg))
        self.masked_pool = masked_pool

    def forward(self, g, mask):
        """g (M, L, 5H), mask (M, L) -> scores (M,)

        Faithful [Q12]: the max-pool runs over all L clips, padded ones included. With `masked_pool` only
        valid clips count (a video without any valid clip falls back to all clips).
        """
        features = self.video_feature_modeling(g, mask)
        pooled = features.max(dim=1).values
        if self.masked_pool:
            valid = mask.bool()[:, :, None]
            masked_max = features.masked_fill(~valid, float("-inf")).max(dim=1).values
            pooled = torch.where(valid.any(dim=1), masked_max, pooled)
        return self.video_score_predictor(pooled).squeeze(1)
