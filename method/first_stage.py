"""The first stage: a video retriever that writes the ranklists CONQUER re-ranks.

A dual encoder in the XML / ReLoCLNet style. The video side never sees the query, so every video of a split
is encoded once and every query is scored against every video with matrix products:

    query tokens -> input projection -> (Transformer) -> one learned attention pooling per modality
                 -> q_m (L2-normalised), and modality weights w (softmax over the modalities)
    video clips  -> per modality: input projection (+ positions -> Transformer) -> c_{m,l} (L2-normalised)
    score(q, v)  = sum_m w_m * max over the video's clips l of <q_m, c_{m,l}>      (cosine, in [-1, 1])

Training is contrastive (InfoNCE) over the in-batch negatives in both directions (query -> videos and
video -> queries), optionally with hard negatives drawn from an existing ranklist. Under torchrun the
embeddings of all ranks are gathered, so every rank computes the loss of the global batch and a 2-process
step equals the 1-process step.

Long videos (`--window_stride` S > 0, utils/windows.py): a video of more than L = max_ctx_len clips is read as
windows of L clips every S clips. A video's score is its best window's score: the query's modalities must match
within one window (a moment), where the score of the whole video would add up each modality's best clip wherever
it lies; with one modality and no video Transformer the two are equal (with one, a clip's context is its
window). Training shows a window of the GT video that holds the whole GT moment, and a random window of each hard
negative.

Also here: the datasets (training items; the queries and the videos of a split), the encoding of a split's
windows (`encode_video_bank`), exact ranking (`rank_videos`: the top k per query chunk; `top_videos`;
`best_windows`: the best window of each listed video), the VR metrics of a ranking, and the recipe that lets train.py train this model (`TRAINING_RECIPE`).
"""
import copy
import logging
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from method.scoring import select_top_n
from utils import distributed
from utils.feature_stores import (FeatureStoreError, QueryFeatureStore, RanklistStore, SubtitleFeatureStore,
                                  VideoFeatureStore, expect_dims)
from utils.io_utils import load_jsonl, save_json
from utils.tvr_format import (RECALL_TOPK, SPLIT_FILE_KEYS, SPLITS, DatasetError, annotation_problems,
                              split_video_indices, st_ed_label)
from utils.windows import WindowError, check_stride, gt_window, window_starts

logger = logging.getLogger(__name__)

LOSS_NAMES = ("query_to_video_nce", "video_to_query_nce", "loss_overall")
MODALITIES = {"visual_sub": ("visual", "sub"), "visual": ("visual",)}
DEFAULT_CONFIG = dict(n_video_layers=0, n_query_layers=0, n_heads=4, dropout=0.1, temperature="learned",
                      init_temperature=0.05, n_hard_negatives=0, hard_negative_pool=100)
MAX_LOGIT_SCALE = 100.0
# --debug evaluates the first queries of the split only.
_MAX_REPORTED_PROBLEMS = 5


class FirstStageError(DatasetError):
    """Bad first-stage input (a split, a query, a video, a feature); the message names it."""


# ----------------------------------------------------------------------------------------------------
# model

class InputProjection(nn.Module):
    """Linear -> LayerNorm -> dropout: (..., in_dim) -> (..., hidden_dim)."""

    def __init__(self, in_dim, hidden_dim, dropout):
        super().__init__()
        self.linear = nn.Linear(in_dim, hidden_dim)
        self.LayerNorm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.LayerNorm(self.linear(x)))


def transformer(hidden_dim, n_heads, n_layers, dropout):
    """A pre-norm Transformer encoder (batch first), or None for 0 layers."""
    if n_layers == 0:
        return None
    layer = nn.TransformerEncoderLayer(hidden_dim, n_heads, dim_feedforward=2 * hidden_dim, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    # No nested-tensor fast path: padded positions stay computed, so results do not depend on the batch.
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


def apply_to_valid(layer, x, mask):
    """layer(x) on the valid positions only: x (..., L, Din), mask (..., L) bool -> (..., L, Dout), zero at
    padded positions. For position-wise layers: the padding costs no compute."""
    valid = layer(x[mask])
    out = valid.new_zeros(*mask.shape, valid.shape[-1])
    out[mask] = valid
    return out


def masked_softmax(logits, mask, dim):
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)


class FirstStageRetriever(nn.Module):
    """Dual encoder: queries and videos are embedded apart and compared by `score`."""

    def __init__(self, model_cfg, query_dim, visual_dim, text_dim, hidden_dim, max_ctx_len, ctx_mode):
        super().__init__()
        cfg = dict(DEFAULT_CONFIG, **model_cfg)
        unknown = set(cfg) - set(DEFAULT_CONFIG)
        if unknown:
            raise FirstStageError(f"first-stage model config: unknown key(s) {sorted(unknown)}; "
                                  f"expected {sorted(DEFAULT_CONFIG)}")
        if hidden_dim % cfg["n_heads"]:
            raise FirstStageError(f"--hidden_dim {hidden_dim} is not divisible by n_heads {cfg['n_heads']}")
        self.modalities = MODALITIES[ctx_mode]
        self.hidden_dim = hidden_dim
        n_modalities = len(self.modalities)
        dropout = cfg["dropout"]

        self.query_input = InputProjection(query_dim, hidden_dim, dropout)
        self.query_encoder = transformer(hidden_dim, cfg["n_heads"], cfg["n_query_layers"], dropout)
        self.query_pooling = nn.Linear(hidden_dim, n_modalities)
        self.query_output = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in self.modalities)
        self.modality_gate = nn.Linear(hidden_dim, n_modalities)

        input_dims = {"visual": visual_dim, "sub": text_dim}
        self.video_input = nn.ModuleDict({m: InputProjection(input_dims[m], hidden_dim, dropout)
                                          for m in self.modalities})
        # Positions only feed a Transformer (clip context): without one a clip's embedding would carry its
        # position, which then biases the max over clips toward positions instead of content.
        self.video_encoder = None
        if cfg["n_video_layers"]:
            self.clip_position = nn.Embedding(max_ctx_len, hidden_dim)
            self.video_encoder = nn.ModuleDict({m: transformer(hidden_dim, cfg["n_heads"], cfg["n_video_layers"],
                                                               dropout) for m in self.modalities})
        self.video_output = nn.ModuleDict({m: nn.Linear(hidden_dim, hidden_dim) for m in self.modalities})

        if cfg["temperature"] == "learned":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / positive_setting(cfg, "init_temperature"))))
        else:
            fixed = positive_setting(cfg, "temperature", alternative='"learned"')
            self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / fixed)))

    def encode_queries(self, query_feat, query_mask):
        """query_feat (Q, Lq, Dq), query_mask (Q, Lq) -> {"query": (Q, M, D) L2-normalised per modality,
        "modality_weights": (Q, M) softmax}."""
        mask = query_mask.bool()
        if self.query_encoder is None:
            tokens = apply_to_valid(self.query_input, query_feat, mask)
        else:
            tokens = self.query_encoder(self.query_input(query_feat), src_key_padding_mask=~mask)
        attention = masked_softmax(self.query_pooling(tokens), mask[:, :, None], dim=1)  # (Q, Lq, M)
        pooled = torch.einsum("qlm,qld->qmd", attention, tokens)
        query = torch.stack([layer(pooled[:, m]) for m, layer in enumerate(self.query_output)], dim=1)
        mean_token = (tokens * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        weights = torch.softmax(self.modality_gate(mean_token), dim=-1)
        return {"query": F.normalize(query.float(), dim=-1), "modality_weights": weights.float()}

    def encode_videos(self, video_inputs):
        """video_inputs {"visual": {"feat" (V, L, Dv), "feat_mask" (V, L)}, "sub": {"feat" (V, L, Dt), ...}}
        -> {"clips": (V, M, L, D) L2-normalised (zero at padded clips without a video Transformer),
        "clip_mask": (V, L) bool (the visual mask)}."""
        mask = video_inputs["visual"]["feat_mask"].bool()
        clips = []
        for m in self.modalities:
            if self.video_encoder is None:  # clips are independent: only the valid ones are computed
                clips.append(apply_to_valid(nn.Sequential(self.video_input[m], self.video_output[m]),
                                            video_inputs[m]["feat"], mask))
                continue
            x = self.video_input[m](video_inputs[m]["feat"]) + self.clip_position.weight[:mask.shape[1]]
            clips.append(self.video_output[m](self.video_encoder[m](x, src_key_padding_mask=~mask)))
        return {"clips": F.normalize(torch.stack(clips, dim=1).float(), dim=-1), "clip_mask": mask}

    @staticmethod
    def score(query_emb, video_emb):
        """-> (Q, V): sum over modalities m of w_qm * max over the valid clips l of <q_m, c_{v,m,l}>."""
        similarity = torch.einsum("qmd,vmld->qvml", query_emb["query"], video_emb["clips"])
        similarity = similarity.masked_fill(~video_emb["clip_mask"][None, :, None, :], float("-inf"))
        return (similarity.amax(dim=-1) * query_emb["modality_weights"][:, None, :]).sum(dim=-1)

    def temperature(self):
        return 1.0 / self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, model_inputs):
        """Training batch -> (loss, {name: float} for LOSS_NAMES).

        model_inputs: "query" {"feat" (B, Lq, Dq), "feat_mask"}, "visual"/"sub" {"feat" (B, N, L, D),
        "feat_mask" (B, N, L)} with the GT video first and N - 1 hard negatives, "video_idx" (B, N) global
        video indices (videos of equal index are never each other's negatives).
        """
        batch_size, n_videos = model_inputs["video_idx"].shape
        query_emb = self.encode_queries(model_inputs["query"]["feat"], model_inputs["query"]["feat_mask"])
        flat = {m: {key: value.flatten(0, 1) for key, value in model_inputs[m].items()} for m in self.modalities}
        video_emb = self.encode_videos(flat)
        video_idx = model_inputs["video_idx"].reshape(-1)
        temperature = self.temperature()
        world_size = distributed.get_world_size() if distributed.is_distributed() else 1
        if world_size > 1:
            # Every rank computes the loss of the global batch, each with gradients through its own rows only;
            # DistributedDataParallel averages the ranks' gradients, so the loss is scaled by the world size
            # (and the temperature's gradient, which every rank computes in full, is not).
            query_emb = {key: gather_around_local(value) for key, value in query_emb.items()}
            video_emb = {key: gather_around_local(value) for key, value in video_emb.items()}
            video_idx = gather_around_local(video_idx)
            temperature = scale_gradient(temperature, 1.0 / world_size)
        scores = self.score(query_emb, video_emb)  # (B, B * N)
        query_to_video, video_to_query = contrastive_losses(scores, video_idx, n_videos, temperature)
        loss = (query_to_video + video_to_query) / 2
        values = (query_to_video, video_to_query, loss)
        loss_dict = {name: float(value.detach()) for name, value in zip(LOSS_NAMES, values)}
        return loss * world_size, loss_dict


def positive_setting(cfg, key, alternative=None):
    """cfg[key] (a number or a numeric string) as a positive float; a FirstStageError naming the key otherwise
    (`alternative`: the other value the key accepts, named in the message), not a traceback from math.log."""
    value = cfg[key]
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0 < number < math.inf:
        expected = f"{alternative} or a positive number" if alternative else "a positive number"
        raise FirstStageError(f"first-stage model config: key {key!r} must be {expected}, found {value!r}")
    return number


def gather_around_local(tensor):
    """(n, ...) on every rank -> (world_size * n, ...) in rank order, where only this rank's own rows carry
    gradients (the others are copies)."""
    parts = [torch.empty_like(tensor) for _ in range(distributed.get_world_size())]
    torch.distributed.all_gather(parts, tensor.detach().contiguous())
    parts[distributed.get_rank()] = tensor
    return torch.cat(parts)


def scale_gradient(tensor, factor):
    """`tensor` in the forward pass, `factor` times its gradient in the backward pass."""
    return tensor * factor + (tensor * (1 - factor)).detach()


def contrastive_losses(scores, video_idx, n_videos, temperature):
    """InfoNCE both ways -> (query-to-video loss, video-to-query loss), means over the B queries / videos.

    scores (B, B * N): query i against the N videos of every item (item j's GT video is column j * N);
    video_idx (B * N,). A column showing the query's own GT video is no negative (the same video can be
    the GT of two queries of a batch, or a hard negative of another); neither is, for a GT video, a query
    whose GT it also is.
    """
    batch_size = scores.shape[0]
    gt_columns = torch.arange(batch_size, device=scores.device) * n_videos
    gt_idx = video_idx[gt_columns]
    logits = scores / temperature
    target = torch.arange(batch_size, device=scores.device)

    same_video = gt_idx[:, None] == video_idx[None, :]  # (B, B * N)
    not_target = torch.ones_like(same_video)
    not_target[target, gt_columns] = False
    query_to_video = F.cross_entropy(logits.masked_fill(same_video & not_target, float("-inf")), gt_columns)

    gt_logits = logits[:, gt_columns].t()  # (B videos, B queries)
    same_gt = gt_idx[:, None] == gt_idx[None, :]
    video_to_query = F.cross_entropy(gt_logits.masked_fill(same_gt & (target[:, None] != target[None, :]),
                                                           float("-inf")), target)
    return query_to_video, video_to_query


def build_first_stage(model_cfg, options):
    """The retriever from a model config and the options (a mapping)."""
    return FirstStageRetriever(model_cfg, query_dim=options["query_dim"], visual_dim=options["visual_dim"],
                               text_dim=options["text_dim"], hidden_dim=options["hidden_dim"],
                               max_ctx_len=options["max_ctx_len"], ctx_mode=options["ctx_mode"])


# ----------------------------------------------------------------------------------------------------
# datasets

def pad_features(rows, max_len):
    """Feature arrays [(n_i, D)] -> feat (N, max_len, D) float32 tensor, feat_mask (N, max_len) int64."""
    dim = rows[0].shape[1]
    feat = np.zeros((len(rows), max_len, dim), dtype=np.float32)
    mask = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, r in enumerate(rows):
        feat[i, :len(r)] = r[:max_len]
        mask[i, :len(r)] = 1
    return torch.from_numpy(feat), torch.from_numpy(mask)


def split_videos(config, split):
    """{vid_name: global_idx} of `split` in the data config's video table."""
    return split_video_indices(config.video_duration_idx_path, split)


def split_queries(config, split, data_path=None, data_ratio=1.0):
    """The annotation rows of `split` (checked), from the data config or `data_path`."""
    if split not in SPLITS:
        raise FirstStageError(f"split must be one of {SPLITS}, found {split!r}")
    data_path = data_path or config[SPLIT_FILE_KEYS[split][0]]
    rows = load_jsonl(data_path)
    if data_ratio != 1:
        rows = rows[:int(len(rows) * data_ratio)]
    if not rows:
        raise FirstStageError(f"{data_path}: split {split!r} has no queries")
    problems = annotation_problems(rows, data_path, split, split_videos(config, split), config.dset_name,
                                   single_moment=False)
    if problems:
        more = len(problems) - _MAX_REPORTED_PROBLEMS
        raise FirstStageError("invalid annotations:\n  " + "\n  ".join(problems[:_MAX_REPORTED_PROBLEMS])
                              + (f"\n  ... and {more} more" if more > 0 else ""))
    return rows


class QueryItems(Dataset):
    """The queries `rows`: item i = {"feat" (Lq, Dq), "feat_mask" (Lq,)} of rows[i]."""

    def __init__(self, config, rows, max_desc_len, query_dim=None):
        self.rows = rows
        self.max_desc_len = max_desc_len
        self.store = QueryFeatureStore(config.desc_bert_path, max_len=max_desc_len, dim=query_dim)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        desc_id = self.rows[index]["desc_id"]
        try:
            feat, mask = pad_features([self.store.get(desc_id)], self.max_desc_len)
        except FeatureStoreError as e:
            raise FirstStageError(f"query desc_id {desc_id}: {e}") from None
        return {"feat": feat[0], "feat_mask": mask[0]}


class VideoItems(Dataset):
    """The videos `names`, read as windows of `max_ctx_len` (L) clips every `window_stride` clips
    (utils/windows.py; 0: only the first L clips, as the original). Item i = the first window of video i
    (start 0: the whole video when it fits): {"visual": {"feat" (L, Dv), "feat_mask" (L,)}, ("sub": ...)};
    `VideoWindowItems` yields all windows of a video."""

    def __init__(self, config, names, max_ctx_len, ctx_mode, visual_dim=None, text_dim=None, window_stride=0):
        try:
            check_stride(window_stride, max_ctx_len)
        except WindowError as e:
            raise FirstStageError(str(e)) from None
        self.names = list(names)
        self.max_ctx_len = max_ctx_len
        self.window_stride = window_stride
        # Windows slice the whole video (each video is read once); without them the stores cut to the first L.
        max_len = None if window_stride else max_ctx_len
        self.stores = {"visual": VideoFeatureStore(config.vid_feat_path, max_len=max_len, dim=visual_dim)}
        if "sub" in MODALITIES[ctx_mode]:
            self.stores["sub"] = SubtitleFeatureStore(config.sub_bert_path, max_len=max_len, dim=text_dim)

    def __len__(self):
        return len(self.names)

    def read_video(self, name):
        """{modality: (n, D) float32} of video `name`: all its clips with windows, its first L without; the
        subtitle rows cut or zero-padded to the visual clip count n (a subtitle store may hold another count)."""
        try:
            visual = self.stores["visual"].get(name)
            features = {"visual": visual}
            if "sub" in self.stores:
                features["sub"] = self._match_length(self.stores["sub"].get(name), len(visual))
        except FeatureStoreError as e:
            raise FirstStageError(f"video {name}: {e}") from None
        return features

    def window_starts(self, n_clips):
        """Start clips of the windows of a video of n_clips (as read by `read_video`)."""
        return window_starts(n_clips, self.max_ctx_len, self.window_stride)

    def windows(self, videos):
        """[(features of `read_video`, start)] -> {modality: {"feat" (N, L, D), "feat_mask" (N, L)}}: the window of
        each video at its start (rows [start, start + L), zero-padded); the mask of every modality is the visual
        one."""
        length = self.max_ctx_len
        inputs = {m: pad_features([features[m][start:start + length] for features, start in videos], length)
                  for m in self.stores}
        mask = inputs["visual"][1]
        return {m: {"feat": feat, "feat_mask": mask} for m, (feat, _) in inputs.items()}

    def get_many(self, names):
        """{modality: {"feat" (N, L, D), "feat_mask" (N, L)}}: the first window of each of `names`."""
        return self.windows([(self.read_video(name), 0) for name in names])

    @staticmethod
    def _match_length(features, n_clips):
        if len(features) >= n_clips:
            return features[:n_clips]
        return np.concatenate([features, np.zeros((n_clips - len(features), features.shape[1]), np.float32)])

    def __getitem__(self, index):
        inputs = self.get_many([self.names[index]])
        return {m: {key: value[0] for key, value in tensors.items()} for m, tensors in inputs.items()}


class VideoWindowItems(Dataset):
    """All windows of each video of `videos` (VideoItems), the video read once: item i = {"inputs": {modality:
    {"feat" (W_i, L, D), "feat_mask" (W_i, L)}}, "starts" (W_i,) int64} in start order."""

    def __init__(self, videos):
        self.videos = videos

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        features = self.videos.read_video(self.videos.names[index])
        starts = self.videos.window_starts(len(features["visual"]))
        return {"inputs": self.videos.windows([(features, start) for start in starts]),
                "starts": torch.tensor(starts, dtype=torch.int64)}


def check_input_dims(queries, videos, desc_id, video_name, query_dim, visual_dim, text_dim):
    """`expect_dims` on the stores of QueryItems / VideoItems (desc_id, video_name: the keys read now, or None)."""
    checks = [(queries.store, desc_id, query_dim, "--query_dim"),
              (videos.stores["visual"], video_name, visual_dim, "--visual_dim")]
    if "sub" in videos.stores:
        checks.append((videos.stores["sub"], video_name, text_dim, "--text_dim"))
    try:
        expect_dims(checks)
    except FeatureStoreError as e:
        raise FirstStageError(str(e)) from None


class FirstStageDataset(Dataset):
    """Training items of one split: {"meta": {desc_id, vid_name, window_starts [N]}, "model_inputs": {"query":
    {feat (Lq, Dq), feat_mask}, "visual"/"sub": {feat (N, L, D), feat_mask (N, L)}, "video_idx" (N,)}}: a window
    of the GT video, then one of each of `n_hard_negatives` videos drawn from the first `hard_negative_pool`
    entries of the split's ranklist (which is read only then).

    With `window_stride` > 0 the GT window holds the whole GT moment (chosen at random among those that do, see
    utils.windows.gt_window; its clips from the query's ts, `clip_length` and the video's full clip count) and a
    hard negative shows a random window; windows of one video are never each other's negatives (same video_idx).
    A video of one window (every video at stride 0) draws no random number.
    """

    def __init__(self, config, mode="train", max_ctx_len=100, max_desc_len=30, ctx_mode="visual_sub",
                 data_ratio=1.0, n_hard_negatives=0, hard_negative_pool=100, window_stride=0, clip_length=None):
        if mode == "test_public":
            raise FirstStageError("split 'test_public' has no ground truth to train on")
        if window_stride and clip_length is None:
            raise FirstStageError("--window_stride > 0 needs --clip_length to place the GT moment in a window")
        self.mode = mode
        self.rows = split_queries(config, mode, data_ratio=data_ratio)
        self.video2idx = split_videos(config, mode)
        self.idx2video = {idx: name for name, idx in self.video2idx.items()}
        self.queries = QueryItems(config, self.rows, max_desc_len)
        self.videos = VideoItems(config, [], max_ctx_len, ctx_mode, window_stride=window_stride)
        self.clip_length = clip_length
        self.n_hard_negatives = n_hard_negatives
        self.hard_negative_pool = hard_negative_pool
        self.ranklist_store = RanklistStore(config[SPLIT_FILE_KEYS[mode][1]]) if n_hard_negatives else None

    def check_feature_dims(self, query_dim, visual_dim, text_dim):
        """The first query and its GT video against the model's input dims (then every read checks them)."""
        check_input_dims(self.queries, self.videos, self.rows[0]["desc_id"], self.rows[0]["vid_name"], query_dim,
                         visual_dim, text_dim)

    def __len__(self):
        return len(self.rows)

    def _hard_negatives(self, row):
        ranked = [self.idx2video[idx] for idx, _ in self.ranklist_store.get(row["desc_id"])[:self.hard_negative_pool]
                  if idx in self.idx2video and self.idx2video[idx] != row["vid_name"]]
        if len(ranked) < self.n_hard_negatives:
            raise FirstStageError(f"ranklist {self.ranklist_store.path}: desc_id {row['desc_id']} has "
                                  f"{len(ranked)} negatives, expected at least {self.n_hard_negatives}")
        return random.sample(ranked, k=self.n_hard_negatives)

    def gt_start(self, row, n_clips):
        """Start of the training window of `row`'s GT moment on its video of n_clips (all of them)."""
        starts = self.videos.window_starts(n_clips)
        if len(starts) == 1:
            return starts[0]
        try:
            st, ed = st_ed_label(row["ts"], n_clips, self.clip_length)
        except DatasetError as e:
            raise FirstStageError(f"desc_id {row['desc_id']}: {e}") from None
        return gt_window(starts, self.videos.max_ctx_len, st, ed, choose=random.choice)[0]

    def _random_start(self, n_clips):
        starts = self.videos.window_starts(n_clips)
        return starts[0] if len(starts) == 1 else random.choice(starts)

    def __getitem__(self, index):
        row = self.rows[index]
        gt_features = self.videos.read_video(row["vid_name"])
        videos = [(gt_features, self.gt_start(row, len(gt_features["visual"])))]
        negatives = self._hard_negatives(row) if self.n_hard_negatives else []
        for name in negatives:
            features = self.videos.read_video(name)
            videos.append((features, self._random_start(len(features["visual"]))))
        names = [row["vid_name"]] + negatives
        model_inputs = {"query": self.queries[index], **self.videos.windows(videos),
                        "video_idx": torch.tensor([self.video2idx[name] for name in names], dtype=torch.int64)}
        meta = {"desc_id": row["desc_id"], "vid_name": row["vid_name"],
                "window_starts": [start for _, start in videos]}
        return {"meta": meta, "model_inputs": model_inputs}


# ----------------------------------------------------------------------------------------------------
# ranking

class VideoBank:
    """Every window of every video of a split encoded once.

    names (V) and video_idx (V,) global indices: the videos, in order. embeddings {"clips" (W, M, L, D),
    "clip_mask" (W, L)} on `device`: one row per window, the rows of a video together and in video order (every
    video has at least one row); window_video (W,) int64: the video position of each row; window_start (W,)
    int64: its first clip in the video. Without windows W = V and row v is video v (window_video = arange(V),
    window_start 0), the defaults. The memory is W * L * M * D floats: it grows with the clips of all windows,
    about L / stride times the clips of a split whose videos are longer than L.
    """

    def __init__(self, names, video_idx, embeddings, window_video=None, window_start=None):
        self.names, self.video_idx, self.embeddings = names, video_idx, embeddings
        n_windows = len(embeddings["clips"])
        device = embeddings["clips"].device
        self.window_video = (torch.arange(n_windows, device=device) if window_video is None
                             else window_video.to(device))
        self.window_start = (torch.zeros(n_windows, dtype=torch.int64, device=device) if window_start is None
                             else window_start.to(device))
        if not torch.equal(torch.unique_consecutive(self.window_video).cpu(), torch.arange(len(names))):
            raise FirstStageError(f"video bank: window rows must cover the {len(names)} videos together and in "
                                  "order")
        self.window_table = window_table(self.window_video, len(names))

    def __len__(self):
        return len(self.names)

    @property
    def n_windows(self):
        return len(self.window_video)

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.embeddings.values())

    def rows_of(self, positions):
        """positions (C,) video positions -> (rows (R,) of all their windows, owner (R,) int64: the index in
        `positions` of each row's video), grouped by video in the order of `positions`."""
        table = self.window_table[positions.to(self.window_table.device)]  # (C, Wmax)
        valid = table >= 0
        owner = torch.arange(len(positions), device=table.device)[:, None].expand_as(table)
        return table[valid], owner[valid]


def window_table(window_video, n_videos):
    """window_video (W,) non-decreasing -> (V, Wmax) int64: row v = the bank rows of video v's windows, padded
    with -1."""
    counts = torch.bincount(window_video, minlength=n_videos)
    first = torch.cumsum(counts, 0) - counts
    offsets = torch.arange(int(counts.max()) if n_videos else 0, device=window_video.device)
    return torch.where(offsets[None, :] < counts[:, None], first[:, None] + offsets[None, :], -1)


def _loader(dataset, batch_size, num_workers, collate_fn=default_collate):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)


def _check_finite(tensor, what):
    if not torch.isfinite(tensor).all():
        raise FirstStageError(f"{what}: the model output NaN/inf (check the features and the checkpoint)")


def window_batches(items, batch_size):
    """Per-video items of VideoWindowItems -> batches {modality: {"feat" (n, L, D), "feat_mask" (n, L)}} of
    exactly `batch_size` windows (the last one fewer), in order: a long video's windows may span batches, and
    without windows (one per video) the batches are those of `batch_size` videos. Holds at most one batch plus
    one video of windows."""
    pending, n_pending = [], 0
    for item in items:
        pending.append(item["inputs"])
        n_pending += len(item["starts"])
        if n_pending < batch_size:
            continue
        joined = _concat_inputs(pending)
        for start in range(0, n_pending - batch_size + 1, batch_size):
            yield _slice_inputs(joined, start, start + batch_size)
        rest = n_pending % batch_size
        pending, n_pending = ([_slice_inputs(joined, n_pending - rest, n_pending)] if rest else []), rest
    if pending:
        yield _concat_inputs(pending)


def _concat_inputs(parts):
    if len(parts) == 1:
        return parts[0]
    return {m: {k: torch.cat([p[m][k] for p in parts]) for k in parts[0][m]} for m in parts[0]}


def _slice_inputs(inputs, start, stop):
    return {m: {k: v[start:stop] for k, v in t.items()} for m, t in inputs.items()}


@torch.inference_mode()
def encode_video_bank(model, videos, device, batch_size=64, num_workers=0, progress=True):
    """Encode every window of every video of `videos` (VideoItems), in their order -> VideoBank on `device`.

    `batch_size` windows are encoded at a time (videos, without windows); each video is read once, by one of
    `num_workers` DataLoader processes meanwhile, and only the windows of the batch being built are held raw. A
    window's clips do not depend on its batch neighbours or its padding (masked in a Transformer, not computed
    at all without one); with a video Transformer a clip's context is its window."""
    model.eval()
    video_idx_of = getattr(videos, "video2idx", None)
    items = DataLoader(VideoWindowItems(videos), batch_size=None, shuffle=False, num_workers=num_workers)
    counts, starts = [], []

    def record(items):  # the window layout, as the items pass to the batching
        for item in items:
            counts.append(len(item["starts"]))
            starts.append(item["starts"])
            yield item

    clips, masks = [], []
    for inputs in tqdm(window_batches(record(items), batch_size), desc="Encoding videos", disable=not progress,
                       leave=False):
        inputs = {m: {k: v.to(device) for k, v in t.items()} for m, t in inputs.items()}
        encoded = model.encode_videos(inputs)
        clips.append(encoded["clips"])
        masks.append(encoded["clip_mask"])
    embeddings = {"clips": torch.cat(clips), "clip_mask": torch.cat(masks)}
    _check_finite(embeddings["clips"], "video embeddings")
    video_idx = torch.tensor([video_idx_of[name] for name in videos.names]) if video_idx_of else None
    window_video = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return VideoBank(videos.names, video_idx, embeddings, window_video, torch.cat(starts))


@torch.inference_mode()
def encode_query_bank(model, queries, device, batch_size=512, num_workers=0, progress=True):
    """Encode every query of `queries` (QueryItems) -> {"query" (Q, M, D), "modality_weights" (Q, M)}."""
    model.eval()
    parts = []
    for inputs in tqdm(_loader(queries, batch_size, num_workers), desc="Encoding queries", disable=not progress,
                       leave=False):
        parts.append(model.encode_queries(inputs["feat"].to(device), inputs["feat_mask"].to(device)))
    encoded = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    _check_finite(encoded["query"], "query embeddings")
    return encoded


def length_buckets(clip_mask, bucket_size):
    """Window rows grouped by clip count: [(rows (n,), their max clip count)], n <= bucket_size."""
    lengths = clip_mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    return [(order[i:i + bucket_size], int(lengths[order[i:i + bucket_size]].max()))
            for i in range(0, len(order), bucket_size)]


def bucket_clip_matrices(bank, rows, length):
    """The clips of the windows at `rows`, cut to `length` clips, as one (D, n * length) matrix per modality,
    plus a (n,) bool "has a clip" mask. Each padded clip is replaced by a copy of its window's first clip, which
    leaves every max over clips unchanged, so scoring needs no mask."""
    clips = bank.embeddings["clips"][rows, :, :length]  # (n, M, length, D)
    mask = bank.embeddings["clip_mask"][rows, :length]
    clips = torch.where(mask[:, None, :, None], clips, clips[:, :, :1])
    return [clips[:, m].reshape(-1, clips.shape[-1]).t().contiguous() for m in range(clips.shape[1])], mask.any(1)


def window_score_chunks(query_emb, bank, query_chunk=1024, video_bucket=512, progress=True):
    """Yield (start, stop, (stop - start, W) scores of queries [start, stop) against every window of `bank`),
    equal to FirstStageRetriever.score: per modality one matrix product of a query chunk with a bucket of
    windows of similar clip count (cut to its longest), then the max over each window's clips."""
    queries, weights = query_emb["query"], query_emb["modality_weights"]
    n_queries = queries.shape[0]
    buckets = [(rows, length, *bucket_clip_matrices(bank, rows, length))
               for rows, length in length_buckets(bank.embeddings["clip_mask"], video_bucket)]
    for start in tqdm(range(0, n_queries, query_chunk), desc="Scoring queries", disable=not progress, leave=False):
        stop = min(start + query_chunk, n_queries)
        scores = torch.empty(stop - start, bank.n_windows, device=queries.device)
        for rows, length, matrices, has_clip in buckets:
            chunk_scores = 0
            for m, matrix in enumerate(matrices):
                best = (queries[start:stop, m] @ matrix).view(stop - start, -1, length).amax(dim=-1)
                chunk_scores = chunk_scores + weights[start:stop, m:m + 1] * best
            scores[:, rows.to(scores.device)] = chunk_scores.masked_fill(~has_clip, float("-inf"))
        yield start, stop, scores


def video_max(window_scores, window_video, n_videos):
    """window_scores (Q, W), window_video (W,) the video of each column, grouped in video order -> (Q, V): each
    video's best window. W = V means one window per video: the scores are returned as they are."""
    if window_scores.shape[1] == n_videos:
        return window_scores
    out = window_scores.new_full((window_scores.shape[0], n_videos), float("-inf"))
    index = window_video.to(window_scores.device)[None, :].expand_as(window_scores)
    return out.scatter_reduce_(1, index, window_scores, "amax")


@torch.inference_mode()
def rank_videos(query_emb, bank, top_k, query_chunk=1024, video_bucket=512, progress=True):
    """The top k videos of every query by their best window, one query chunk at a time -> (values (Q, k), positions (Q, k)) on the
    CPU, k = min(top_k, V). Only a chunk's (chunk, W) window scores are held besides the (Q, k) result, so memory
    does not grow with the split's queries (87k x 17k scores on TVR train would be 6 GB)."""
    n_queries, k = query_emb["query"].shape[0], min(top_k, len(bank))
    values, positions = torch.empty(n_queries, k), torch.empty(n_queries, k, dtype=torch.int64)
    for start, stop, window_scores in window_score_chunks(query_emb, bank, query_chunk, video_bucket, progress):
        chunk_values, chunk_positions = top_videos(video_max(window_scores, bank.window_video, len(bank)), k)
        values[start:stop], positions[start:stop] = chunk_values.cpu(), chunk_positions.cpu()
    return values, positions


@torch.inference_mode()
def best_windows(query_emb, bank, positions, query_chunk=1024, video_bucket=512, progress=True):
    """The best window of each listed video: positions (Q, k) bank video positions (e.g. of `top_videos`) ->
    (starts (Q, k) int64 first clip of the window in the video, scores (Q, k) its score = the video's score),
    the earliest window on ties. Scores every window again, chunk by chunk."""
    starts = torch.empty(positions.shape, dtype=torch.int64)
    scores = torch.empty(positions.shape)
    table = bank.window_table
    for start, stop, window_scores in window_score_chunks(query_emb, bank, query_chunk, video_bucket, progress):
        rows = table[positions[start:stop].to(table.device)].to(window_scores.device)  # (n, k, Wmax)
        listed = window_scores.gather(1, rows.clamp(min=0).flatten(1)).view(rows.shape)
        values, best = listed.masked_fill(rows < 0, float("-inf")).max(dim=-1)
        best_rows = rows.gather(-1, best[..., None])[..., 0]
        starts[start:stop] = bank.window_start.to(best_rows.device)[best_rows].cpu()
        scores[start:stop] = values.cpu()
    return starts, scores


def top_videos(scores, top_k):
    """(Q, V) scores -> (values (Q, k), positions (Q, k)), k = min(top_k, V), best first, ties by position."""
    return select_top_n(scores, top_k)


def vr_metrics(ranked_video_idx, gt_video_idx, max_vcmr_video):
    """ranked_video_idx (Q, k) global indices best first, gt_video_idx (Q,) -> {"r1", "r5", "r10", "r100",
    "gt_in_top_max_vcmr_video", "max_vcmr_video", "n_queries"}: % of queries whose GT is in the top n."""
    hits = ranked_video_idx == gt_video_idx[:, None]
    n_queries = len(gt_video_idx)

    def recall(n):
        return round(100.0 * float(hits[:, :n].any(dim=1).sum()) / n_queries, 2)

    metrics = {f"r{n}": recall(n) for n in RECALL_TOPK}
    metrics.update(gt_in_top_max_vcmr_video=recall(max_vcmr_video), max_vcmr_video=max_vcmr_video,
                   n_queries=n_queries)
    return metrics


# ----------------------------------------------------------------------------------------------------
# training recipe (train.py)

class FirstStageRecipe:
    """What train.py needs to train the first stage: its datasets, its evaluation, its loss names."""
    loss_names = LOSS_NAMES
    # A first stage is judged by the share of queries whose GT it hands on (its top 10 and top 100), not by
    # its top 1: R@1 levels off epochs before R@10 and R@100 do.
    stop_metric_names = {"VR": ("r10", "r100")}

    @staticmethod
    def build_datasets(opt, model_cfg):
        """(train, eval-loss, evaluation) datasets; the last two are None with --disable_eval. The evaluation
        "dataset" is the data config and the split: evaluation ranks all its queries against all its videos."""
        from utils.data_config import load_data_config
        config = load_data_config(opt.dataset_config)
        cfg = dict(DEFAULT_CONFIG, **model_cfg)
        common = dict(max_ctx_len=opt.max_ctx_len, max_desc_len=opt.max_desc_len, ctx_mode=opt.ctx_mode,
                      data_ratio=opt.data_ratio, n_hard_negatives=cfg["n_hard_negatives"],
                      hard_negative_pool=cfg["hard_negative_pool"], window_stride=opt.get("window_stride", 0),
                      clip_length=opt.clip_length)
        train_dataset = FirstStageDataset(config, mode="train", **common)
        if opt.disable_eval:
            return train_dataset, None, None
        eval_loss_dataset = FirstStageDataset(config, mode="val", **dict(common, n_hard_negatives=0))
        return train_dataset, eval_loss_dataset, SplitRanking(config, opt.eval_split_name, opt)

    @staticmethod
    def evaluate(model, eval_dataset, opt, save_submission_filename, tasks, max_after_nms):
        """VR metrics of the split's exact ranking (rank 0 ranks; the other ranks return (None, None, [])):
        ({"VR": metrics}, None, [metrics file]), the file `<submission name>_metrics.json` in the run dir."""
        if not distributed.is_main_process():
            return None, None, []
        metrics = {"VR": eval_dataset.metrics(model, opt)}
        stem = save_submission_filename[:-len(".json")] if save_submission_filename.endswith(".json") \
            else save_submission_filename
        path = os.path.join(opt.results_dir, stem + "_metrics.json")
        save_json(metrics, path, save_pretty=True)
        return metrics, None, [path]


class SplitRanking:
    """A split to rank during training: its queries and videos (the evaluation 'dataset' of the recipe)."""

    def __init__(self, config, split, opt):
        self.rows = split_queries(config, split, data_ratio=opt.data_ratio)
        video2idx = split_videos(config, split)
        self.queries = QueryItems(config, self.rows, opt.max_desc_len)
        self.videos = VideoItems(config, sorted(video2idx, key=video2idx.get), opt.max_ctx_len, opt.ctx_mode,
                                 window_stride=opt.get("window_stride", 0))
        self.videos.video2idx = video2idx
        self.gt_video_idx = torch.tensor([video2idx[row["vid_name"]] for row in self.rows])

    def __len__(self):
        return len(self.rows)

    def subset(self, start, stop):
        """This split restricted to its queries [start, stop) (--debug); the videos are all kept."""
        view = copy.copy(self)
        view.rows = self.rows[start:stop]
        view.queries = copy.copy(self.queries)
        view.queries.rows = view.rows
        view.gt_video_idx = self.gt_video_idx[start:stop]
        return view

    def check_feature_dims(self, query_dim, visual_dim, text_dim):
        """Every read of the split's stores checks its dim against the model's input dims."""
        check_input_dims(self.queries, self.videos, None, None, query_dim, visual_dim, text_dim)

    def metrics(self, model, opt):
        """VR metrics of every query of the split ranked against every video (a video scored by its best
        window)."""
        device = next(model.parameters()).device
        bank = encode_video_bank(model, self.videos, device, batch_size=opt.eval_query_bsz * 8)
        query_emb = encode_query_bank(model, self.queries, device)
        _, positions = rank_videos(query_emb, bank, max(RECALL_TOPK))
        return vr_metrics(bank.video_idx[positions], self.gt_video_idx, opt.max_vcmr_video)


TRAINING_RECIPE = FirstStageRecipe
