"""method/memory_light.py: each memory-light formulation against the plain ops (values, dropout masks,
gradients, what autograd keeps), and the whole model with memory_light on vs off."""
import pytest
import torch
import torch.nn.functional as F

from method import memory_light as light
from method.layers import LinearLayer, uses_memory_light
from model_fixtures import make_batch, make_model


def saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while running fn()."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(storages.values())


def run_both(plain_fn, light_fn, inputs, seed=0):
    """Outputs and input gradients of both formulations, each run from the same RNG state."""
    results = []
    for fn in (plain_fn, light_fn):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        torch.manual_seed(seed)
        out, n_bytes = saved_bytes(lambda: fn(*leaves))
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype))
        results.append((out.detach(), [x.grad for x in leaves], n_bytes))
    return results


def assert_same(plain, memory_light, exact_values=True):
    (out_p, grads_p, _), (out_l, grads_l, _) = plain, memory_light
    if exact_values:
        assert torch.equal(out_p, out_l)
    else:
        torch.testing.assert_close(out_l, out_p)
    for g_p, g_l in zip(grads_p, grads_l):
        torch.testing.assert_close(g_l, g_p, rtol=1e-5, atol=1e-6)


def test_dropout_same_mask_and_grad_with_a_bool_mask():
    x = torch.randn(6, 50, 40)
    plain, memory_light = run_both(lambda t: F.dropout(t, 0.3, True), lambda t: light.dropout(t, 0.3), [x])
    assert_same(plain, memory_light)
    assert memory_light[2] * 4 <= plain[2]  # 1-byte mask instead of a float32 one


def test_attention_matches_sdpa_with_dropout():
    q, k, v = (torch.randn(3, 2, 25, 8) for _ in range(3))
    mask = (1.0 - (torch.arange(25) < torch.tensor([25, 10, 3])[:, None]).float())[:, None, None, :] * -10000.0
    plain, memory_light = run_both(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2),
        lambda q, k, v: light.attention_context(q, k, v, mask, 0.2), [q, k, v])
    assert_same(plain, memory_light, exact_values=False)
    assert memory_light[2] < plain[2] / 2


def test_gelu_linear_matches_plain():
    a, w, b = torch.randn(4, 9, 16), torch.randn(5, 16), torch.randn(5)
    plain, memory_light = run_both(lambda a, w, b: F.linear(F.gelu(a), w, b), light.gelu_linear, [a, w, b])
    assert_same(plain, memory_light)
    assert memory_light[2] < plain[2]


def test_layer_norm_dropout_linear_matches_plain():
    torch.manual_seed(0)
    layer = LinearLayer(16, 6).train()
    torch.nn.init.normal_(layer.LayerNorm.weight)
    torch.nn.init.normal_(layer.LayerNorm.bias)
    x = torch.randn(4, 9, 16)
    x[0, :3] = 0.0  # constant rows: LayerNorm gives its bias there
    norm, linear = layer.LayerNorm, layer.net[1]
    params = [norm.weight, norm.bias, linear.weight, linear.bias]

    def plain(x, *p):
        return F.linear(F.dropout(F.layer_norm(x, [16], p[0], p[1], norm.eps), 0.1, True), p[2], p[3])

    def fused(x, *p):
        return light._LayerNormDropoutLinear.apply(x, p[0], p[1], norm.eps, 0.1, p[2], p[3])

    ref, mine = run_both(plain, fused, [x] + [p.detach() for p in params])
    assert_same(ref, mine)
    assert mine[2] < ref[2]


def test_memory_light_only_in_training_with_grad_and_without_autocast():
    layer = LinearLayer(16, 6)
    x = torch.randn(2, 3, 16)
    assert uses_memory_light(layer.train(), x)
    assert not uses_memory_light(layer.eval(), x)
    layer.train()
    with torch.no_grad():
        assert not uses_memory_light(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_memory_light(layer, x)
        assert layer(x).dtype == torch.bfloat16
    layer.memory_light = False
    assert not uses_memory_light(layer, x)


@pytest.mark.parametrize("measure,qal_impl", [("general", "decomposed"), ("exclusive", "plain")])
def test_model_memory_light_on_off_same_loss_and_gradients(measure, qal_impl):
    batch = make_batch(b=3, n=4, video_len=12, query_len=7)
    results = []
    for memory_light in (False, True):
        torch.manual_seed(0)
        model = make_model("tiny", video_len=12, similarity_measure=measure, qal_impl=qal_impl,
                           memory_light=memory_light).train()
        torch.manual_seed(1)
        (loss, _), n_bytes = saved_bytes(lambda: model(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        n_bytes))
    (loss_plain, grads_plain, bytes_plain), (loss_light, grads_light, bytes_light) = results
    assert torch.equal(loss_plain, loss_light)  # same values and dropout masks in the forward pass
    assert grads_plain.keys() == grads_light.keys()
    for name, grad in grads_plain.items():
        # A key bias has a zero gradient in exact arithmetic (softmax ignores per-row shifts): rounding only.
        assert (grads_light[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-10, name
    assert bytes_light < 0.7 * bytes_plain
