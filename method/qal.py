"""Query-aware learning (QAL): bi-directional video/query attention and FCPlusTransformer."""
import torch
import torch.nn.functional as F
from torch import nn

from method.layers import VERY_NEGATIVE_NUMBER, BertEncoder, LinearLayer, mask_logits

QAL_IMPLEMENTATIONS = ("decomposed", "plain")


class BiDirectionalAttention(nn.Module):
    """BiDAF-style attention between fused clip features F and query tokens Q.

    Trilinear similarity S_tj = w·[F_t; Q_j; F_t∘Q_j] with `similarity_weight` (1, 3H), no bias.
    impl "decomposed" computes it as (F·w1) + (Q·w2) + (F∘w3)·Qᵀ without materialising the
    (M, L, Lq, 3H) concat; impl "plain" is the original formulation (for tests and benchmarks).
    """

    def __init__(self, hidden_dim, impl="decomposed"):
        super().__init__()
        if impl not in QAL_IMPLEMENTATIONS:
            raise ValueError(f"qal_impl must be one of {QAL_IMPLEMENTATIONS}, got {impl!r}")
        self.hidden_dim = hidden_dim
        self.impl = impl
        self.similarity_weight = nn.Linear(hidden_dim * 3, 1, bias=False)

    def _similarity_plain(self, video_feat, query_feat):
        """video_feat (M, L, H), query_feat (M, Lq, H) -> S (M, L, Lq)"""
        m, l, h = video_feat.shape
        lq = query_feat.shape[1]
        f = video_feat[:, :, None, :].expand(m, l, lq, h)
        q = query_feat[:, None, :, :].expand(m, l, lq, h)
        return self.similarity_weight(torch.cat([f, q, f * q], dim=3)).squeeze(3)

    def _similarity_decomposed(self, video_feat, query_feat, n_videos_per_query):
        """video_feat (B·N, L, H), query_feat (B, Lq, H) -> S (B·N, L, Lq)"""
        m, l, h = video_feat.shape
        b, lq, _ = query_feat.shape
        n = n_videos_per_query
        w_video, w_query, w_product = self.similarity_weight.weight[0].split(self.hidden_dim)
        # The N videos of one query share its tokens: the product term is one (N·L, H)x(H, Lq) matmul per query.
        product = (video_feat * w_product).view(b, n * l, h) @ query_feat.transpose(1, 2)
        similarity = (product.view(b, n, l, lq) + (video_feat @ w_video).view(b, n, l, 1)
                      + (query_feat @ w_query).view(b, 1, 1, lq))
        return similarity.view(m, l, lq)

    def forward(self, video_feat, query_feat, video_mask, query_mask):
        """video_feat F (B·N, L, H), query_feat Q̂ (B, Lq, H), video_mask (B·N, L), query_mask (B, Lq)
        -> QAL (B·N, L, 4H) = [F, V2Q, F∘V2Q, F∘Q2V]

        Each query is shared by its N = (B·N)/B consecutive videos (query-major order).
        """
        m, l, h = video_feat.shape
        b = query_feat.shape[0]
        n = m // b
        if self.impl == "plain":
            repeated_query = query_feat.repeat_interleave(n, dim=0)  # (M, Lq, H), as the original
            similarity = self._similarity_plain(video_feat, repeated_query)
        else:
            similarity = self._similarity_decomposed(video_feat, query_feat, n)
        pair_mask = (video_mask.view(b, n, l, 1) * query_mask.view(b, 1, 1, -1)).view(m, l, -1)
        similarity = mask_logits(similarity, pair_mask, VERY_NEGATIVE_NUMBER)  # (M, L, Lq)

        # V2Q: every clip attends over the query tokens (padded clips: uniform over all Lq tokens).
        video_to_query = F.softmax(similarity, dim=-1)
        if self.impl == "plain":
            v2q = video_to_query @ repeated_query
        else:
            v2q = (video_to_query.view(b, n * l, -1) @ query_feat).view(m, l, h)
        # Q2V: one attention over clips from each clip's best-matching token, broadcast to every clip.
        query_to_video = F.softmax(similarity.max(dim=-1).values, dim=-1)  # (M, L)
        q2v = query_to_video[:, None, :] @ video_feat  # (M, 1, H)
        return torch.cat([video_feat, v2q, video_feat * v2q, video_feat * q2v], dim=2)


class FCPlusTransformer(nn.Module):
    """LinearLayer(input_dim -> H) (`trans_linear`) then a BertEncoder (`encoder`); no embeddings."""

    def __init__(self, config, input_dim):
        super().__init__()
        self.trans_linear = LinearLayer(input_dim, config.hidden_size)
        self.encoder = BertEncoder(config)

    def forward(self, features, mask):
        """features (M, L, input_dim), mask (M, L) -> (M, L, H)"""
        return self.encoder(self.trans_linear(features), mask)
