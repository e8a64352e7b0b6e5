"""Query and video encoders: a LinearLayer projection followed by a small Transformer.

Every encoder input is a dict as produced by the data loader:
{"feat" (M, T, D) float, "feat_mask" (M, T) 0/1, "feat_pos_id" (M, T), "feat_token_id" (M, T)}.
"""
import torch
from torch import nn

from method.layers import BertEmbeddings, BertEncoder, LinearLayer


class EmbeddedTransformer(nn.Module):
    """BertEmbeddings (position + token type, no words) followed by a BertEncoder."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, features, position_ids, token_type_ids, mask):
        """features (M, T, H), position_ids, token_type_ids, mask (M, T) -> (M, T, H)"""
        return self.encoder(self.embeddings(features, position_ids, token_type_ids), mask)


class OneModalEncoder(nn.Module):
    """LinearLayer(input_dim -> H) then the Transformer; used for the query and for visual-only videos."""

    def __init__(self, config, input_dim, hidden_dim):
        super().__init__()
        self.linear = LinearLayer(input_dim, hidden_dim)
        self.transformer = EmbeddedTransformer(config)

    def forward(self, inputs):
        """inputs: encoder input dict with feat (M, T, D) -> (M, T, H)"""
        return self.transformer(
            self.linear(inputs["feat"]), inputs["feat_pos_id"], inputs["feat_token_id"], inputs["feat_mask"])


class TwoModalEncoder(nn.Module):
    """Visual and subtitle clips encoded jointly as one sequence [v; s] of length 2L, then split at L."""

    def __init__(self, config, img_dim, text_dim, hidden_dim, split_num):
        super().__init__()
        self.img_linear = LinearLayer(img_dim, hidden_dim)
        self.text_linear = LinearLayer(text_dim, hidden_dim)
        self.transformer = EmbeddedTransformer(config)
        self.split_num = split_num

    def forward(self, visual, sub):
        """visual: input dict, feat (M, L, Dv); sub: input dict, feat (M, L, Dt) -> (V̂, Ŝ), each (M, L, H)"""
        for name, inputs in (("visual", visual), ("sub", sub)):
            if inputs["feat"].shape[1] != self.split_num:
                raise ValueError(
                    f"{name} features have {inputs['feat'].shape[1]} clips per video but the model was built "
                    f"with video_len (max_ctx_len) {self.split_num}; the padded length must equal max_ctx_len")
        features = torch.cat([self.img_linear(visual["feat"]), self.text_linear(sub["feat"])], dim=1)
        output = self.transformer(
            features,
            torch.cat([visual["feat_pos_id"], sub["feat_pos_id"]], dim=1),
            torch.cat([visual["feat_token_id"], sub["feat_token_id"]], dim=1),
            torch.cat([visual["feat_mask"], sub["feat_mask"]], dim=1))
        return output[:, :self.split_num], output[:, self.split_num:]


class VideoQueryEncoder(nn.Module):
    """`videoEncoder` (two-modal for visual_sub, one-modal for visual) and `queryEncoder`."""

    def __init__(self, config, video_modality, visual_dim=4352, text_dim=768, query_dim=768, hidden_dim=768,
                 split_num=100):
        super().__init__()
        self.video_modality = list(video_modality)
        if self.video_modality == ["visual", "sub"]:
            self.videoEncoder = TwoModalEncoder(config.bert_config, visual_dim, text_dim, hidden_dim, split_num)
        elif self.video_modality == ["visual"]:
            self.videoEncoder = OneModalEncoder(config.bert_config, visual_dim, hidden_dim)
        else:
            raise ValueError(f"video modalities {self.video_modality} are unsupported; expected visual_sub or visual")
        self.queryEncoder = OneModalEncoder(config.query_bert_config, query_dim, hidden_dim)

    def encode_query(self, query_inputs):
        """query_inputs: input dict, feat (B, Lq, Dq) -> Q̂ (B, Lq, H)"""
        return self.queryEncoder(query_inputs)

    def encode_videos(self, video_inputs):
        """video_inputs: {"visual": input dict (M, L, ·), "sub": ... if used} -> {modality: (M, L, H)}"""
        if len(self.video_modality) == 2:
            visual, sub = self.videoEncoder(video_inputs["visual"], video_inputs["sub"])
            return {"visual": visual, "sub": sub}
        return {"visual": self.videoEncoder(video_inputs["visual"])}
