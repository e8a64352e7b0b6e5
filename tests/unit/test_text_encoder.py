"""utils.text_encoder on a tiny random RoBERTa: batched features equal one-text-at-a-time model calls."""
import numpy as np
import pytest

from utils.synthetic_models import save_random_text_model
from utils.text_encoder import TextEncoder, TextEncoderError


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return TextEncoder(save_random_text_model(tmp_path_factory.mktemp("tiny_roberta")), device="cpu", batch_size=2)


def test_batched_tokens_equal_single_model_calls_in_input_order(encoder):
    texts = ["the dog runs into the red car with a cat", "hello", "", "a man opens the door"]
    tokens = encoder.encode_tokens(texts)
    for text, features in zip(texts, tokens):
        single = encoder.tokenizer(text, return_tensors="pt")
        direct = encoder.model(**single).last_hidden_state[0].detach().numpy()
        assert features.dtype == np.float32 and features.shape == (single["input_ids"].shape[1], encoder.dim)
        assert np.allclose(features, direct, atol=1e-5)


def test_long_text_is_truncated_to_the_model_positions(encoder):
    assert encoder.max_length == 38  # 40 positions, 2 kept by RoBERTa's padding offset
    assert encoder.encode_tokens(["a " * 100])[0].shape[0] == 38
    assert encoder.settings()["max_length"] == 38


def test_missing_model_is_a_one_line_error(tmp_path):
    with pytest.raises(TextEncoderError, match="cannot load tokenizer and model"):
        TextEncoder(str(tmp_path / "nothing"), device="cpu")
