import copy
import json
import math
import os

import pytest
import torch
from easydict import EasyDict

from method.amp import make_grad_scaler
from method.optimization import (BertAdamW, apply_warmup, build_optimizer, clip_gradients,
                                 split_parameter_groups, training_step, warmup_lr_multiplier, warmup_steps_for)
from utils.run_dir import REPO_ROOT

CONFIG_DIR = os.path.join(REPO_ROOT, "config")


def reference_adamw_step(params, grads, states, lr, wd, betas=(0.9, 0.999), eps=1e-6):
    """The original's BERT AdamW update written out per parameter, one tensor at a time, exactly as the original's loop."""
    beta1, beta2 = betas
    for p, g in zip(params, grads):
        if g is None:
            continue
        state = states.setdefault(id(p), {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        state["step"] += 1
        state["m"].mul_(beta1).add_(g, alpha=1.0 - beta1)
        state["v"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = state["v"].sqrt().add_(eps)
        step_size = lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        p.addcdiv_(state["m"], denom, value=-step_size)
        if wd > 0.0:
            p.add_(p, alpha=-lr * wd)


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (4, 2, 2), (7,), (1,)]
    return [torch.randn(s, generator=g) for s in shapes]


def grad_schedule(n_steps, params, seed=1):
    """Gradients per step; some parameters get None in some steps so their step counts diverge."""
    g = torch.Generator().manual_seed(seed)
    schedule = []
    for step in range(n_steps):
        grads = []
        for i, p in enumerate(params):
            missing = (i == 1 and step in (0, 3)) or (i == 3 and step % 2 == 1) or (i == 4 and step < 2)
            grads.append(None if missing else torch.randn(p.shape, generator=g))
        schedule.append(grads)
    return schedule


def run_bert_adamw(params, schedule, lr, wd_by_param, start=0, stop=None, optimizer=None):
    decayed = [p for p, wd in zip(params, wd_by_param) if wd > 0]
    plain = [p for p, wd in zip(params, wd_by_param) if wd == 0]
    if optimizer is None:
        optimizer = BertAdamW([{"params": decayed, "weight_decay": max(wd_by_param)},
                               {"params": plain, "weight_decay": 0.0}], lr=lr)
    for grads in schedule[start:stop]:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    return optimizer


def test_bert_adamw_matches_per_parameter_reference_bitwise():
    lr, wd = 3e-2, 0.1
    wd_by_param = [wd, 0.0, wd, 0.0, wd]
    params = [p.requires_grad_() for p in make_params()]
    reference = [p.detach().clone() for p in params]
    schedule = grad_schedule(6, params)

    run_bert_adamw(params, schedule, lr, wd_by_param)
    states = {}
    for grads in schedule:
        for p, g, p_wd in zip(reference, grads, wd_by_param):
            reference_adamw_step([p], [g], states, lr, p_wd)

    for p, r in zip(params, reference):
        assert torch.equal(p.detach(), r), (p, r)


def test_bert_adamw_skips_params_without_grad():
    params = [p.requires_grad_() for p in make_params()]
    before = params[4].detach().clone()
    optimizer = BertAdamW([{"params": params, "weight_decay": 0.5}], lr=0.1)
    for p in params[:4]:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.equal(params[4].detach(), before)  # not even decayed
    assert params[4] not in optimizer.state
    assert optimizer.state[params[0]]["step"] == 1


def test_bert_adamw_differs_from_torch_adamw():
    params = [p.requires_grad_() for p in make_params()]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = BertAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-2)
    theirs = torch.optim.AdamW([{"params": twins, "weight_decay": 0.1}], lr=1e-2, eps=1e-6)
    for p, q in zip(params, twins):
        p.grad = torch.full_like(p, 1e-4)
        q.grad = torch.full_like(q, 1e-4)
    ours.step()
    theirs.step()
    assert any(not torch.equal(p, q) for p, q in zip(params, twins))
    for p, q in zip(params, twins):  # both move each weight by about one LR
        torch.testing.assert_close(p, q, rtol=0, atol=1e-2)


def test_bert_adamw_state_dict_resume_is_exact():
    lr, wd_by_param = 1e-2, [0.01, 0.0, 0.01, 0.0, 0.01]
    schedule = grad_schedule(6, make_params())

    straight = [p.requires_grad_() for p in make_params()]
    run_bert_adamw(straight, schedule, lr, wd_by_param)

    first = [p.requires_grad_() for p in make_params()]
    optimizer = run_bert_adamw(first, schedule, lr, wd_by_param, stop=3)
    saved_params = [p.detach().clone() for p in first]
    saved_state = copy.deepcopy(optimizer.state_dict())

    resumed = [p.requires_grad_() for p in saved_params]
    fresh = BertAdamW([{"params": [p for p, wd in zip(resumed, wd_by_param) if wd > 0], "weight_decay": 0.01},
                       {"params": [p for p, wd in zip(resumed, wd_by_param) if wd == 0], "weight_decay": 0.0}],
                      lr=lr)
    fresh.load_state_dict(saved_state)
    run_bert_adamw(resumed, schedule, lr, wd_by_param, start=3, optimizer=fresh)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def test_split_parameter_groups_by_name():
    names = ["encoder.videoEncoder.img_linear.net.1.weight", "encoder.videoEncoder.img_linear.net.1.bias",
             "encoder.videoEncoder.img_linear.LayerNorm.weight", "query_weight.text_pooling.clusters",
             "query_weight.text_pooling.LayerNorm.bias", "query_aware_feature_learning_layer.similarity_weight.weight",
             "contextual_QAL_feature_learning.trans_linear.net.1.bias",
             "moment_localization_head.begin_feature_modeling.encoder.layer.0.output.LayerNorm.weight",
             "moment_localization_head.begin_score_modeling.clip_score_predictor.0.weight"]
    named = [(n, torch.nn.Parameter(torch.zeros(i + 1))) for i, n in enumerate(names)]
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    groups = split_parameter_groups(named + [("frozen.weight", frozen)], lr=1e-4, weight_decay=0.01, lr_mul=0.5)

    by_name = {g["name"]: [next(n for n, p in named if p is q) for q in g["params"]] for g in groups}
    assert [g["name"] for g in groups] == ["top_decay", "top_no_decay", "backbone_decay", "backbone_no_decay"]
    assert by_name["top_decay"] == [names[5], names[8]]
    # "encoder" inside a name is not the backbone: only the prefix counts.
    assert by_name["top_no_decay"] == [names[6], names[7]]
    assert by_name["backbone_decay"] == [names[0], names[3]]
    assert by_name["backbone_no_decay"] == [names[1], names[2], names[4]]
    assert [g["lr"] for g in groups] == [1e-4, 1e-4, 5e-5, 5e-5]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.0]
    assert [g["base_lr"] for g in groups] == [g["lr"] for g in groups]


def build_conquer(model_config_name, similarity_measure="general", **dims):
    from method.conquer import CONQUER

    with open(os.path.join(CONFIG_DIR, model_config_name)) as f:
        config = EasyDict(json.load(f))
    return CONQUER(config, similarity_measure=similarity_measure, **dims)


def group_counts(model):
    groups = split_parameter_groups(model.named_parameters(), lr=1e-4, weight_decay=0.01, lr_mul=1)
    return [(len(g["params"]), sum(p.numel() for p in g["params"])) for g in groups]


@pytest.mark.parametrize("similarity_measure, expected", [
    ("general", [(26, 28_707_328), (39, 49_152), (22, 18_878_976), (35, 37_184)]),
    ("exclusive", [(35, 38_832_768), (52, 67_584), (22, 18_878_976), (35, 37_184)]),
])
def test_paper_config_group_counts(similarity_measure, expected):
    # Built on the meta device: names and shapes only, no memory or init cost.
    with torch.device("meta"):
        model = build_conquer("model_config.json", similarity_measure)
    assert group_counts(model) == expected


def test_tiny_config_group_counts_match_name_rules():
    model = build_conquer("model_config_tiny.json", visual_dim=48, text_dim=32, query_dim=32, hidden_dim=32)
    counts = group_counts(model)
    # Same tensor counts as the paper config (same architecture), tiny element counts.
    assert [c[0] for c in counts] == [26, 39, 22, 35]
    assert sum(c[1] for c in counts) == sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, EasyDict(lr=1e-4, wd=0.01, lr_mul=1, optimizer="bert_adamw"))
    assert isinstance(optimizer, BertAdamW) and len(optimizer.param_groups) == 4
    optimizer = build_optimizer(model, EasyDict(lr=1e-4, wd=0.01, lr_mul=1, optimizer="torch_adamw"))
    assert isinstance(optimizer, torch.optim.AdamW)


def test_warmup_schedule():
    assert warmup_steps_for(1000, 0.0) == 0
    assert warmup_steps_for(1000, 0.01) == 10
    assert [warmup_lr_multiplier(s, 0) for s in (0, 5)] == [1.0, 1.0]
    assert [warmup_lr_multiplier(s, 4) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]

    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    optimizer = BertAdamW(split_parameter_groups([("top.weight", p), ("encoder.weight", q)], 1e-3, 0.01, 0.1),
                          lr=1e-3)
    apply_warmup(optimizer, 2, 4)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-4, 5e-5, 5e-5]
    apply_warmup(optimizer, 9, 4)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3, 1e-4, 1e-4]


def test_clip_gradients(caplog):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)  # norm 6
    assert clip_gradients([p], -1) is None
    assert torch.equal(p.grad, torch.full((4,), 3.0))
    with caplog.at_level("INFO"):
        norm = clip_gradients([p], 2.0)
    assert float(norm) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(2.0, rel=1e-5)
    assert "clipping gradient" in caplog.text


class SquaredNorm(torch.nn.Module):
    """loss = 0.5 * |w|^2, so the gradient is w; forward returns (loss, loss dict) as CONQUER's does."""

    def __init__(self, values):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(values))

    def forward(self, batch):
        loss = 0.5 * (self.w ** 2).sum() * batch["scale"]
        return loss, {"loss_overall": loss.item()}


@pytest.mark.parametrize("grad_clip", [-1, 1.0])
def test_training_step_zeroes_clips_and_steps(grad_clip):
    model = SquaredNorm([3.0, 4.0])  # gradient w, norm 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_dict = training_step(model, {"scale": 1.0}, optimizer, make_grad_scaler("off", "cpu"), "off", grad_clip)
    assert loss_dict == {"loss_overall": 12.5}
    step = torch.tensor([3.0, 4.0]) * (1.0 if grad_clip == -1 else grad_clip / 5.0)
    assert torch.allclose(model.w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * step)
    before = model.w.detach().clone()
    training_step(model, {"scale": 1.0}, optimizer, make_grad_scaler("off", "cpu"), "off", -1)
    assert torch.allclose(model.w.grad, before)  # this step's gradient only: zeroed, not accumulated
