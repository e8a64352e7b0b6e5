"""Optimizer, parameter groups, learning-rate warmup, gradient clipping and the training step used by train.py.

The original trains with the AdamW of BERT/UNITER, which differs from `torch.optim.AdamW` in two ways:
eps is added to the uncorrected sqrt(v) (the bias correction is folded into the step size), and the
decoupled weight decay is applied after the Adam step, to the already updated weights. `BertAdamW`
reproduces that update exactly; `--optimizer torch_adamw` selects `torch.optim.AdamW` instead (close, but
not the same numbers).
"""
import logging
import math
from collections import defaultdict

import torch

from method.amp import autocast_context

logger = logging.getLogger(__name__)

# Parameters whose names start with one of these form the "backbone" (their LR is scaled by --lr_mul).
BACKBONE_PREFIXES = ("encoder", "query_weight")
# A parameter whose name contains any of these substrings is not weight-decayed (all biases, all LayerNorm
# weights; the NetVLAD cluster centres are decayed).
NO_DECAY_SUBSTRINGS = ("bias", "LayerNorm.bias", "LayerNorm.weight")
GROUP_NAMES = ("top_decay", "top_no_decay", "backbone_decay", "backbone_no_decay")


def split_parameter_groups(named_parameters, lr, weight_decay, lr_mul):
    """The four parameter groups of the original, in its order (top-decay, top-no-decay, backbone-decay,
    backbone-no-decay); the order matters because `Train/LR_top` logs group 0 and `Train/LR_pretrain` the
    last group. Parameters with requires_grad False are left out.

    Every group also records `base_lr` (the LR before warmup) and `name`; empty groups are kept so that
    the group order never depends on the model variant.
    """
    members = {name: [] for name in GROUP_NAMES}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        part = "backbone" if name.startswith(BACKBONE_PREFIXES) else "top"
        decay = "no_decay" if any(s in name for s in NO_DECAY_SUBSTRINGS) else "decay"
        members[f"{part}_{decay}"].append(param)
    groups = []
    for group_name in GROUP_NAMES:
        group_lr = lr * lr_mul if group_name.startswith("backbone") else lr
        group_wd = 0.0 if group_name.endswith("no_decay") else weight_decay
        groups.append({"params": members[group_name], "lr": group_lr, "base_lr": group_lr,
                       "weight_decay": group_wd, "name": group_name})
    return groups


class BertAdamW(torch.optim.Optimizer):
    """AdamW as in BERT/UNITER (and the original CONQUER). For each parameter with a gradient, at its own
    step count t:

        m <- b1*m + (1-b1)*g;   v <- b2*v + (1-b2)*g^2
        theta <- theta - lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)
        theta <- theta - lr*wd*theta                    (if wd > 0, on the updated theta)

    Parameters whose grad is None are skipped entirely (no state, no decay, step count unchanged).
    The update runs on whole lists of tensors with torch._foreach_* ops; parameters of a group are batched
    by step count, so the step size (a Python float, computed as in the original) is shared by a batch.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        if lr < 0.0:
            raise ValueError(f"BertAdamW: invalid learning rate {lr} (expected >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"BertAdamW: invalid betas {betas} (each expected in [0, 1))")
        if eps < 0.0:
            raise ValueError(f"BertAdamW: invalid eps {eps} (expected >= 0)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params_by_step = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("BertAdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                params_by_step[state["step"]].append(param)
            for step, params in params_by_step.items():
                self._update(group, step, params)
        return loss

    def _update(self, group, step, params):
        beta1, beta2 = group["betas"]
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]

        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])

        step_size = group["lr"]
        if group["correct_bias"]:
            bias_correction1 = 1.0 - beta1 ** step
            bias_correction2 = 1.0 - beta2 ** step
            step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-step_size)

        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-group["lr"] * group["weight_decay"])


def build_optimizer(model, opt):
    """The optimizer selected by `--optimizer` over the four parameter groups of the original."""
    groups = split_parameter_groups(model.named_parameters(), opt.lr, opt.wd, opt.lr_mul)
    name = opt.get("optimizer", "bert_adamw")
    if name == "bert_adamw":
        return BertAdamW(groups, lr=opt.lr)
    if name == "torch_adamw":
        # torch's AdamW defaults (betas, eps 1e-8); it decays before the step and adds eps to the corrected
        # sqrt(v), so it is not equivalent to the original.
        return torch.optim.AdamW(groups, lr=opt.lr)
    raise ValueError(f"--optimizer {name!r}: expected bert_adamw or torch_adamw")


def warmup_steps_for(total_steps, warmup_proportion):
    """Number of warmup steps: `warmup_proportion` of `total_steps`, rounded down."""
    return int(total_steps * warmup_proportion)


def warmup_lr_multiplier(step, warmup_steps):
    """Linear warmup from 0 to 1 over `warmup_steps` optimizer steps, then constant 1.

    `step` counts the optimizer steps already taken, so the first step of a warmup runs at LR 0 (the
    convention of BERT's linear warmup). With warmup_steps 0 the LR is constant, as in the original.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def apply_warmup(optimizer, step, warmup_steps):
    """Set every group's LR to its `base_lr` times the warmup multiplier of `step`."""
    multiplier = warmup_lr_multiplier(step, warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier


def clip_gradients(parameters, max_norm):
    """Clip the global L2 norm of all gradients to `max_norm` (-1 disables) as the original; returns the
    norm before clipping (None when disabled)."""
    if max_norm == -1:
        return None
    total_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if total_norm > max_norm:
        logger.info("clipping gradient: %s with coef %s", float(total_norm), max_norm / float(total_norm))
    return total_norm


def training_step(model, model_inputs, optimizer, scaler, amp, grad_clip):
    """One optimizer step on a batch: forward and loss under autocast (`amp`), gradients zeroed (not set to
    None, as the original's torch did: a parameter that once had a gradient keeps being updated and decayed),
    scaled backward, clipping of the global norm to `grad_clip` (-1: none), optimizer step, scaler update.
    Returns the model's loss dict."""
    with autocast_context(amp, next(model.parameters()).device):
        loss, loss_dict = model(model_inputs)
    optimizer.zero_grad(set_to_none=False)
    scaler.scale(loss).backward()
    if grad_clip != -1:
        scaler.unscale_(optimizer)
        clip_gradients(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss_dict
