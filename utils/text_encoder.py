"""Token features of text from a Hugging Face `transformers` encoder (the TVR features come from RoBERTa).

    encoder = TextEncoder("roberta-base")                  # a hub name or a local folder; loaded once
    tokens = encoder.encode_tokens(["a man opens a door"])  # [(n_tokens, D) float32], one per text

A text's features are the last hidden states of all its tokens, the tokenizer's special tokens included
(so an empty text still has a row), truncated to `max_length` tokens. Texts are encoded in batches of
similar length (padding is masked, so a text's features do not depend on its batch), on the GPU when
there is one, optionally in float16 / bfloat16; the results are always float32. `settings()` is what a
later user needs to encode new text the same way (the corpus builder stores it in the data config).
"""
import logging

import numpy as np
import torch
from tqdm import tqdm

from utils.errors import ConquerError

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TextEncoderError(ConquerError):
    """The text encoder cannot be loaded or its settings are invalid; the message names the model and flag."""


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


class TextEncoder:
    """A tokenizer + encoder model pair, loaded once, in eval mode."""

    def __init__(self, name_or_path, device=None, dtype="float32", batch_size=64, max_length=None):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise TextEncoderError("the text encoder needs the `transformers` package: pip install transformers") from None
        if dtype not in DTYPES:
            raise TextEncoderError(f"text encoder dtype {dtype!r}: expected one of {list(DTYPES)}")
        self.name_or_path = name_or_path
        self.device = torch.device(device or default_device())
        self.dtype = dtype
        self.batch_size = batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModel.from_pretrained(name_or_path, dtype=DTYPES[dtype])
        except (OSError, ValueError) as e:
            raise TextEncoderError(f"text encoder {name_or_path!r}: cannot load tokenizer and model ({e})") from None
        self.model.to(self.device).eval()
        model_limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        # RoBERTa reserves two positions for its padding offset.
        model_limit -= 2 if getattr(self.model.config, "model_type", "") in ("roberta", "xlm-roberta") else 0
        self.max_length = min(max_length or model_limit, model_limit)

    @property
    def dim(self):
        return self.model.config.hidden_size

    def settings(self):
        """JSON-able description of how text is encoded."""
        return dict(name_or_path=self.name_or_path, dtype=self.dtype, max_length=self.max_length,
                    tokens="last hidden state of every token, special tokens included")

    @torch.no_grad()
    def encode_tokens(self, texts, progress=False, desc="encoding text"):
        """list of N str -> list of N float32 arrays (n_tokens_i, D), in input order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        results = [None] * len(texts)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not progress):
            encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**encoded).last_hidden_state.float().cpu().numpy()  # (B, T, D)
            lengths = encoded["attention_mask"].sum(dim=1).cpu().numpy()
            padded_left = self.tokenizer.padding_side == "left"
            for row, (i, n) in enumerate(zip(batch, lengths)):
                tokens = hidden[row, -n:] if padded_left else hidden[row, :n]
                results[i] = np.ascontiguousarray(tokens, dtype=np.float32)
        return results
