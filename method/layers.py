"""Building blocks shared by every part of CONQUER.

* `LinearLayer`: LayerNorm -> Dropout(0.1) -> Linear -> ReLU, the projection used everywhere.
* `mask_logits`: the arithmetic logit masking of the original, with its two fill constants.
* `BertEmbeddings`, `BertEncoder`: a BERT-style post-LN Transformer without word embeddings. Parameter
  names follow the HuggingFace BERT layout so that checkpoints of the original load unchanged.

Modules with a `memory_light` attribute (True by default; CONQUER sets it) train with the formulations of
method/memory_light.py, which keep less for the backward pass; False gives the plain ops (the original's
memory use). Values and dropout masks are the same either way; eval mode always runs the plain ops.
"""
import torch
import torch.nn.functional as F
from torch import nn

from method import memory_light as light
from utils.errors import ConquerError

# The original defines mask_logits twice with different fill values [Q11]: ConvSE uses -1e4, the
# bi-directional attention (and disjoint post-processing) uses -1e10. Both are part of the numerics.
CONVSE_MASK_VALUE = -1e4
VERY_NEGATIVE_NUMBER = -1e10
# Additive key mask of the BERT attention; finite so that a fully masked row stays a uniform softmax.
ATTENTION_MASK_VALUE = -10000.0


class ModelConfigError(ConquerError):
    """The model configuration (model_config.json / constructor arguments) is inconsistent."""


def mask_logits(target, mask, fill_value):
    """Return target·mask + (1 − mask)·fill_value (mask: 1 = keep, 0 = replace; int, float or bool).

    Masked entries become exactly `fill_value` (the product with 0 is 0). An int64 mask promotes the
    fill term to float32, so -1e10 stays finite even when `target` is float16 under autocast.
    """
    if mask.dtype == torch.bool:
        mask = mask.long()
    return target * mask + (1 - mask) * fill_value


def uses_memory_light(module, x):
    """Whether `module` should run its memory-light training formulation on input `x`."""
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    return module.memory_light and module.training and torch.is_grad_enabled() and not autocast


class Dropout(nn.Dropout):
    """nn.Dropout whose training backward keeps a bool mask instead of a float32 one (`memory_light`)."""

    def __init__(self, p=0.5):
        super().__init__(p)
        self.memory_light = True

    def forward(self, x):
        if self.p > 0 and uses_memory_light(self, x):
            return light.dropout(x, self.p)
        return super().forward(x)


class LinearLayer(nn.Module):
    """y = ReLU(Linear(Dropout(LayerNorm(x)))); parameters `LayerNorm.*`, `net.1.*` (`net.0` is the dropout)."""

    def __init__(self, in_hsz, out_hsz, dropout=0.1):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(in_hsz)
        self.net = nn.Sequential(Dropout(dropout), nn.Linear(in_hsz, out_hsz))
        self.memory_light = True

    def forward(self, x):
        """x (..., in_hsz) -> (..., out_hsz)"""
        dropout, linear = self.net
        if dropout.p > 0 and uses_memory_light(self, x):
            return F.relu(light.layer_norm_dropout_linear(x, self.LayerNorm, dropout.p, linear))
        return F.relu(self.net(self.LayerNorm(x)))


class BertEmbeddings(nn.Module):
    """Dropout(LayerNorm(x + token_type_embedding + position_embedding)); there are no word embeddings."""

    def __init__(self, config):
        super().__init__()
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, features, position_ids, token_type_ids):
        """features (M, T, H), position_ids (M, T), token_type_ids (M, T) -> (M, T, H)"""
        embeddings = features + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention with an additive key mask (`attention.self`)."""

    def __init__(self, config):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ModelConfigError(
                f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob
        self.memory_light = True

    def _split_heads(self, x):
        m, t, _ = x.shape
        return x.view(m, t, self.num_heads, self.head_size).transpose(1, 2)

    def forward(self, hidden_states, additive_mask):
        """hidden_states (M, T, H), additive_mask (M, 1, 1, T) float -> context (M, T, H)

        softmax(QKᵀ/√d + mask) · V per head, with dropout on the attention probabilities in training.
        """
        m, t, h = hidden_states.shape
        q = self._split_heads(self.query(hidden_states))
        k = self._split_heads(self.key(hidden_states))
        v = self._split_heads(self.value(hidden_states))
        # With dropout, CPU SDPA runs its math kernel, which keeps three (T, T) float tensors per head for
        # backward; CUDA's fused kernels keep none, so the memory-light attention is for the CPU only.
        if self.dropout_prob > 0 and hidden_states.device.type == "cpu" and uses_memory_light(self, hidden_states):
            context = light.attention_context(q, k, v, additive_mask.to(q.dtype), self.dropout_prob)
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=additive_mask.to(q.dtype), dropout_p=self.dropout_prob if self.training else 0.0)
        return context.transpose(1, 2).reshape(m, t, h)


class BertSelfOutput(nn.Module):
    """LayerNorm(residual + Dropout(dense(x))) (`attention.output`)."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        """hidden_states, residual (M, T, H) -> (M, T, H)"""
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, additive_mask):
        """hidden_states (M, T, H), additive_mask (M, 1, 1, T) -> (M, T, H)"""
        return self.output(self.self(hidden_states, additive_mask), hidden_states)


_ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form x·½·(1 + erf(x/√2)), as the original's `gelu`
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swish": F.silu,
}


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ModelConfigError(
                f"hidden_act {config.hidden_act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states):
        """(M, T, H) -> (M, T, intermediate_size)"""
        return self.activation(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        """hidden_states (M, T, intermediate_size), residual (M, T, H) -> (M, T, H)"""
        return self.add_and_norm(self.dense(hidden_states), residual)

    def add_and_norm(self, projected, residual):
        """projected = dense(hidden_states), residual (M, T, H) -> LayerNorm(Dropout(projected) + residual)"""
        return self.LayerNorm(self.dropout(projected) + residual)


class BertLayer(nn.Module):
    """Post-LN Transformer layer: attention block then feed-forward block, each with residual + LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.memory_light = True

    def forward(self, hidden_states, additive_mask):
        """hidden_states (M, T, H), additive_mask (M, 1, 1, T) -> (M, T, H)"""
        attention_output = self.attention(hidden_states, additive_mask)
        if self.intermediate.activation is F.gelu and uses_memory_light(self, attention_output):
            # The 4H-wide GELU output is recomputed in backward instead of being kept.
            projected = light.gelu_linear(self.intermediate.dense(attention_output), self.output.dense.weight,
                                          self.output.dense.bias)
            return self.output.add_and_norm(projected, attention_output)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    """`num_hidden_layers` BertLayers (`layer.N`) sharing one key mask."""

    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, mask):
        """hidden_states (M, T, H), mask (M, T) 0/1 (1 = real token) -> (M, T, H)

        Only keys are masked: every position, padded or not, is computed as a query, and padded outputs
        are used downstream by CONQUER (the moment head scores every clip position).
        """
        additive_mask = (1.0 - mask[:, None, None, :].float()) * ATTENTION_MASK_VALUE
        for layer in self.layer:
            hidden_states = layer(hidden_states, additive_mask)
        return hidden_states
