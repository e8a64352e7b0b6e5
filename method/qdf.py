"""Query-dependent fusion (QDF).

A NetVLAD pooling of the encoded query feeds a softmax gate that weighs the video modalities
(visual, sub); the fused clip features are the gate-weighted sum of the encoded modalities.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from method.layers import Dropout


class NetVLAD(nn.Module):
    """NetVLAD pooling of a token sequence into one (feature_size · cluster_size) vector.

    Parameters: `clusters` (H, K) soft-assignment weights, `clusters2` (1, H, K) cluster centres,
    `LayerNorm` over the K assignment logits.
    """

    def __init__(self, feature_size, cluster_size):
        super().__init__()
        self.feature_size = feature_size
        self.cluster_size = cluster_size
        self.clusters = nn.Parameter(torch.randn(feature_size, cluster_size) / math.sqrt(feature_size))
        self.clusters2 = nn.Parameter(torch.randn(1, feature_size, cluster_size) / math.sqrt(feature_size))
        self.LayerNorm = nn.LayerNorm(cluster_size)
        self.out_dim = feature_size * cluster_size

    def forward(self, x, mask=None):
        """x (B, T, H), optional mask (B, T) -> (B, H·K), flattened with index d·K + k.

        Faithful [Q13]: no mask, padded tokens are pooled like real ones. With `mask`, padded tokens get
        zero assignment weight (option masked_netvlad).
        """
        assignment = F.softmax(self.LayerNorm(x @ self.clusters), dim=-1)  # (B, T, K)
        if mask is not None:
            assignment = assignment * mask[:, :, None].to(assignment.dtype)
        residual_sum = x.transpose(1, 2) @ assignment  # (B, H, K): Σ_t a_tk x_td
        vlad = residual_sum - assignment.sum(dim=1, keepdim=True) * self.clusters2
        vlad = F.normalize(vlad, dim=1)  # intra-normalisation over d for every cluster
        return F.normalize(vlad.reshape(vlad.shape[0], self.out_dim), dim=1)


class QueryWeightEncoder(nn.Module):
    """MoE gate `query_weight`: softmax(moe_fc_txt(Dropout(NetVLAD(Q̂)))) -> one weight per modality.

    Row m of `moe_fc_txt` belongs to modality m of `video_modality` (visual first, then sub).
    """

    def __init__(self, config, video_modality, masked_netvlad=False, gate_per_query=False):
        super().__init__()
        self.text_pooling = NetVLAD(feature_size=config.hidden_size, cluster_size=config.text_cluster)
        self.moe_txt_dropout = Dropout(config.moe_dropout_prob)
        self.moe_fc_txt = nn.Linear(self.text_pooling.out_dim, len(video_modality), bias=False)
        self.masked_netvlad = masked_netvlad
        self.gate_per_query = gate_per_query

    def forward(self, query_feat, query_mask, n_videos_per_query):
        """query_feat (B, Lq, H), query_mask (B, Lq), N -> modality weights (B·N, n_modalities), query-major

        NetVLAD is deterministic per query, so it always runs once per query. Faithful [Q14]: the original
        applies the gate to every repeated (query, video) copy, so in training each copy gets its own
        dropout mask; in eval (no dropout) that equals gating once per query and repeating, which is what
        `gate_per_query` does in training too.
        """
        pooled = self.text_pooling(query_feat, query_mask if self.masked_netvlad else None)  # (B, H·K)
        if self.training and not self.gate_per_query:
            pooled = pooled.repeat_interleave(n_videos_per_query, dim=0)
            return F.softmax(self.moe_fc_txt(self.moe_txt_dropout(pooled)), dim=1)
        weights = F.softmax(self.moe_fc_txt(self.moe_txt_dropout(pooled)), dim=1)
        return weights.repeat_interleave(n_videos_per_query, dim=0)


def query_dependent_fusion(modality_features, modality_weights=None):
    """modality_features: list of (M, L, H) in modality order; modality_weights (M, n) or None -> (M, L, H)

    With weights: Σ_m w_m ⊙ X_m (visual first). Without (MoE disabled or a single modality): the plain
    mean Σ_m X_m / n, which is X itself for one modality.
    """
    n = len(modality_features)
    fused = 0
    for m, features in enumerate(modality_features):
        if modality_weights is None:
            fused = fused + features / n
        else:
            fused = fused + modality_weights[:, m, None, None] * features
    return fused
