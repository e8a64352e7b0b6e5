"""Building blocks against plain formulations: LinearLayer, mask_logits, SDPA attention, decomposed QAL."""
import math

import pytest
import torch
from easydict import EasyDict

from method.layers import (CONVSE_MASK_VALUE, VERY_NEGATIVE_NUMBER, BertEncoder, BertSelfAttention, LinearLayer,
                           mask_logits)
from method.qal import BiDirectionalAttention
from model_fixtures import load_model_config


def tiny_bert_config(**overrides):
    config = EasyDict(load_model_config("tiny")["bert_config"])
    config.update(overrides)
    return config


def test_linear_layer_names_and_formula():
    layer = LinearLayer(6, 4).eval()
    assert sorted(layer.state_dict()) == ["LayerNorm.bias", "LayerNorm.weight", "net.1.bias", "net.1.weight"]
    torch.nn.init.normal_(layer.LayerNorm.weight)
    torch.nn.init.normal_(layer.LayerNorm.bias)
    x = torch.randn(3, 5, 6)
    normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    normed = normed * layer.LayerNorm.weight + layer.LayerNorm.bias
    expected = torch.clamp(normed @ layer.net[1].weight.T + layer.net[1].bias, min=0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fill", [CONVSE_MASK_VALUE, VERY_NEGATIVE_NUMBER])
def test_mask_logits_fills_exactly_and_keeps_valid_entries(fill):
    assert (CONVSE_MASK_VALUE, VERY_NEGATIVE_NUMBER) == (-1e4, -1e10)
    target = torch.randn(4, 9) * 100
    int_mask = (torch.rand(4, 9) > 0.4).long()
    out = mask_logits(target, int_mask, fill)
    assert out.dtype == torch.float32
    assert torch.equal(out[int_mask == 1], target[int_mask == 1])
    assert torch.all(out[int_mask == 0] == torch.tensor(fill, dtype=torch.float32))
    # [Q39] int, float and bool masks give identical values.
    assert torch.equal(out, mask_logits(target, int_mask.float(), fill))
    assert torch.equal(out, mask_logits(target, int_mask.bool(), fill))


def plain_attention(module, hidden, mask):
    """softmax(QKᵀ/√d + (1 − mask)·(−10000))·V per head, with the module's weights."""
    m, t, h = hidden.shape
    heads, d = module.num_heads, module.head_size

    def split(x):
        return x.view(m, t, heads, d).permute(0, 2, 1, 3)

    q, k, v = split(module.query(hidden)), split(module.key(hidden)), split(module.value(hidden))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + (1.0 - mask[:, None, None, :].float()) * -10000.0
    context = torch.softmax(scores, dim=-1) @ v
    return context.permute(0, 2, 1, 3).reshape(m, t, h)


def test_sdpa_attention_matches_plain_softmax():
    torch.manual_seed(0)
    module = BertSelfAttention(tiny_bert_config()).eval()
    hidden = torch.randn(4, 9, 32)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[0, 5:] = 0
    mask[1, 1:] = 0
    mask[2] = 0  # a fully masked row: uniform attention, not NaN
    additive = (1.0 - mask[:, None, None, :].float()) * -10000.0
    out = module(hidden, additive)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, plain_attention(module, hidden, mask), rtol=1e-5, atol=1e-5)


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    encoder = BertEncoder(tiny_bert_config(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.0))
    hidden, mask = torch.randn(2, 6, 32), torch.ones(2, 6, dtype=torch.long)
    encoder.train()
    assert not torch.allclose(encoder(hidden, mask), encoder(hidden, mask))
    encoder.eval()
    assert torch.equal(encoder(hidden, mask), encoder(hidden, mask))


def padded_mask(lengths, size):
    return (torch.arange(size)[None, :] < torch.as_tensor(lengths)[:, None]).long()


def test_decomposed_qal_equals_plain():
    torch.manual_seed(0)
    b, n, l, lq, h = 3, 4, 10, 7, 16
    plain = BiDirectionalAttention(h, impl="plain")
    torch.nn.init.normal_(plain.similarity_weight.weight, std=0.5)
    decomposed = BiDirectionalAttention(h, impl="decomposed")
    decomposed.load_state_dict(plain.state_dict())
    video = torch.randn(b * n, l, h)
    query = torch.randn(b, lq, h)
    video_mask = padded_mask(torch.randint(1, l + 1, (b * n,)), l)
    video_mask[0] = 1
    query_mask = padded_mask([lq, 3, 1], lq)
    out_plain = plain(video, query, video_mask, query_mask)
    out_decomposed = decomposed(video, query, video_mask, query_mask)
    assert out_plain.shape == (b * n, l, 4 * h)
    torch.testing.assert_close(out_decomposed, out_plain, rtol=1e-5, atol=1e-5)
    # Gradients with respect to the similarity weight agree as well.
    grad_plain, = torch.autograd.grad(out_plain.square().sum(), plain.similarity_weight.weight)
    grad_decomposed, = torch.autograd.grad(out_decomposed.square().sum(), decomposed.similarity_weight.weight)
    torch.testing.assert_close(grad_decomposed, grad_plain, rtol=1e-4, atol=1e-5)


def test_unknown_qal_impl_is_rejected():
    with pytest.raises(ValueError, match="qal_impl"):
        BiDirectionalAttention(8, impl="fast")
