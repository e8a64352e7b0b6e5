"""Memory-light training formulations of the building blocks (CONQUER's `memory_light=True`, the default).

During a training step autograd keeps, for the backward pass, every tensor that an op needs. For this model
most of that memory is not matmul results but elementwise by-products: dropout masks (float32 on the CPU,
one per dropout, each as large as its input), the dropped copies of the attention probabilities and of the
LinearLayer inputs, and the GELU outputs. The functions below compute the same forward values, draw their
dropout masks from the same random stream as `F.dropout` (so a seeded run gives the same masks), and keep
only what cannot be recomputed by a cheap elementwise pass:

* `dropout`: `native_dropout`, whose backward keeps a bool mask (1 byte per element) instead of a float32 one.
* `attention_context` (on the CPU, where SDPA with dropout runs its math kernel): Dropout(softmax(QKᵀ/√d +
  mask)) V keeping q, k, v and the bool mask; the (T, T) probabilities are recomputed in backward (QKᵀ is
  2·T·d FLOPs per score, well under 1% of a training step).
* `gelu_linear`: Linear(GELU(a)) keeping a only; GELU(a) is recomputed in backward.
* `layer_norm_dropout_linear`: Linear(Dropout(LayerNorm(x))) keeping x, the LayerNorm statistics and the bool
  mask; the LayerNorm output and its dropped copy are recomputed in backward.

Apart from QKᵀ no matmul runs twice, so the step time does not grow. These functions are for training in
fp32: the modules fall back to the plain ops under autocast (the fused backward passes do not handle mixed
dtypes) and in eval mode.
"""
import torch
import torch.nn.functional as F


def dropout(x, p):
    """Training-mode dropout of `x` with probability p (> 0); the backward keeps a bool mask."""
    return torch.ops.aten.native_dropout(x, p, True)[0]


def _dropped(values, mask, p):
    """values · mask / (1 − p): the output of `native_dropout` recomputed from its mask."""
    return values.mul(mask).mul_(1.0 / (1.0 - p))


def _sum_to_last_dim(x):
    return x.reshape(-1, x.shape[-1]).sum(dim=0)


def _attention_probs(q, k, additive_mask):
    # The scale is split between q and k as in PyTorch's math attention, so the scores match it bitwise.
    root_scale = q.shape[-1] ** -0.25
    return torch.softmax((q * root_scale) @ (k.transpose(-2, -1) * root_scale) + additive_mask, dim=-1)


class _AttentionContext(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, additive_mask, p):
        dropped, mask = torch.ops.aten.native_dropout(_attention_probs(q, k, additive_mask), p, True)
        ctx.save_for_backward(q, k, v, additive_mask, mask)
        ctx.p = p
        return dropped @ v

    @staticmethod
    def backward(ctx, grad_context):
        q, k, v, additive_mask, mask = ctx.saved_tensors
        p = ctx.p
        # The (T, T) probabilities are recomputed: QKᵀ costs 2·T·d FLOPs per score, tiny next to the model.
        probs = _attention_probs(q, k, additive_mask)
        grad_v = _dropped(probs, mask, p).transpose(-2, -1) @ grad_context
        grad_probs = _dropped(grad_context @ v.transpose(-2, -1), mask, p)
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True))
        scale = q.shape[-1] ** -0.5
        grad_q = (grad_scores @ k) * scale
        grad_k = (grad_scores.transpose(-2, -1) @ q) * scale
        return grad_q, grad_k, grad_v, None, None


def attention_context(q, k, v, additive_mask, p):
    """q, k, v (M, heads, T, d), additive_mask broadcastable to (M, heads, T, T) (no grad), p > 0
    -> Dropout_p(softmax(q kᵀ/√d + additive_mask)) v, (M, heads, T, d)"""
    return _AttentionContext.apply(q, k, v, additive_mask, p)


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_activation, weight, bias):
        ctx.save_for_backward(pre_activation, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(pre_activation), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        pre_activation, weight = ctx.saved_tensors
        grad_pre = grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            activation = F.gelu(pre_activation)
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ activation.reshape(-1, activation.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = _sum_to_last_dim(grad_out)
        if ctx.needs_input_grad[0]:
            grad_pre = torch.ops.aten.gelu_backward(grad_out @ weight, pre_activation)
        return grad_pre, grad_weight, grad_bias


def gelu_linear(pre_activation, weight, bias):
    """F.linear(F.gelu(pre_activation), weight, bias) (exact erf GELU) keeping only `pre_activation`."""
    return _GeluLinear.apply(pre_activation, weight, bias)


class _LayerNormDropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, p, weight, bias):
        shape = [x.shape[-1]]
        normed, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, norm_weight, norm_bias, eps)
        dropped, mask = torch.ops.aten.native_dropout(normed, p, True)
        ctx.save_for_backward(x, mean, rstd, mask, norm_weight, norm_bias, weight)
        ctx.eps, ctx.p, ctx.has_bias = eps, p, bias is not None
        return F.linear(dropped, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, mask, norm_weight, norm_bias, weight = ctx.saved_tensors
        shape = [x.shape[-1]]
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[5]:
            normed = torch.ops.aten.native_layer_norm(x, shape, norm_weight, norm_bias, ctx.eps)[0]
            dropped = _dropped(normed, mask, ctx.p)
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped.reshape(-1, dropped.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_bias = _sum_to_last_dim(grad_out)
        grad_normed = _dropped(grad_out @ weight, mask, ctx.p)
        grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_normed, x, shape, mean, rstd, norm_weight, norm_bias, list(ctx.needs_input_grad[:3]))
        return grad_x, grad_norm_weight, grad_norm_bias, None, None, grad_weight, grad_bias


def layer_norm_dropout_linear(x, norm, p, linear):
    """linear(Dropout_p(norm(x))) for an nn.LayerNorm `norm` over the last dim and an nn.Linear `linear`,
    keeping x, the normalisation statistics and a bool mask instead of two float copies of x."""
    return _LayerNormDropoutLinear.apply(x, norm.weight, norm.bias, norm.eps, p, linear.weight, linear.bias)
