"""Shared helpers of the model tests: configs, tiny models and padded batches (as the dataset collates them)."""
import copy
import json
import os

import torch

from method.conquer import CONQUER
from utils.run_dir import REPO_ROOT as REPO

DIMS = {"visual_dim": 12, "text_dim": 10, "query_dim": 8}


def load_model_config(name="tiny"):
    suffix = "" if name == "paper" else f"_{name}"
    with open(os.path.join(REPO, "config", f"model_config{suffix}.json")) as f:
        return json.load(f)


def make_model(config_name="tiny", video_len=12, dims=DIMS, **kwargs):
    config = load_model_config(config_name)
    return CONQUER(config, hidden_dim=config["bert_config"]["hidden_size"], video_len=video_len, **dims, **kwargs)


def _modality(n_valid, length, dim, token_type, generator):
    """n_valid (B, N) real rows per video -> encoder input dict of (B, N, L, ·), zero-padded."""
    b, n = n_valid.shape
    mask = (torch.arange(length)[None, None, :] < n_valid[:, :, None]).long()
    feat = torch.randn(b, n, length, dim, generator=generator) * mask[..., None]
    return {"feat": feat, "feat_mask": mask,
            "feat_pos_id": torch.arange(length).expand(b, n, length).clone(),
            "feat_token_id": torch.full((b, n, length), token_type, dtype=torch.long)}


def make_batch(b=2, n=3, video_len=12, query_len=7, dims=DIMS, visual_valid=None, sub_valid=None,
               query_valid=None, seed=0):
    """A batch as the data loader produces it: query (B, Lq, ·), visual/sub (B, N, L, ·), st_ed_indices (B, 2).

    Valid lengths default to a mix of padded and full rows; the GT moment lies inside video 0.
    """
    g = torch.Generator().manual_seed(seed)
    if visual_valid is None:
        visual_valid = torch.randint(3, video_len + 1, (b, n), generator=g)
        visual_valid[0, 0] = video_len - 4
    if sub_valid is None:
        sub_valid = torch.randint(1, video_len + 1, (b, n), generator=g)
    if query_valid is None:
        query_valid = torch.randint(2, query_len, (b,), generator=g)
    query = _modality(query_valid[:, None], query_len, dims["query_dim"], 1, g)
    batch = {
        "query": {key: value[:, 0] for key, value in query.items()},
        "visual": _modality(visual_valid, video_len, dims["visual_dim"], 0, g),
        "sub": _modality(sub_valid, video_len, dims["text_dim"], 1, g),
    }
    st = torch.stack([torch.randint(0, int(v), (1,), generator=g)[0] for v in visual_valid[:, 0]])
    ed = torch.minimum(st + 2, visual_valid[:, 0] - 1)
    batch["st_ed_indices"] = torch.stack([st, ed], dim=1)
    return batch


def clone_batch(batch):
    return copy.deepcopy(batch)
