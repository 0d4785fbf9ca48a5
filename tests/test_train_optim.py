"""Optimizers, parameter groups, LR schedules and the static option checks, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hpckd.train.experiment import load_experiment
from hpckd.errors import ConfigError
from hpckd.train.optim import (build_optimizer, build_scheduler, finite_step_gate, is_fused, load_optimizer_state,
                               param_groups, scaled_lr)


def optim_cfg(*overrides: str):
    return load_experiment(None, list(overrides)).optim


def lrs(cfg, steps_per_epoch: int, steps: int) -> list[float]:
    """The LR each optimizer step uses, read from a real optimizer driven by the real scheduler."""
    model = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, steps_per_epoch)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_cosine_with_floor_follows_sgdr_eq5():
    cfg = optim_cfg("optim.lr=0.05", "optim.min_lr=1e-4", "optim.epochs=2", "optim.schedule=cosine")
    got = lrs(cfg, steps_per_epoch=4, steps=8)
    # eta_min + (eta_max - eta_min) (1 + cos(pi t / T)) / 2 with T = 8 steps (fidelity study: 0.05 -> 1e-4)
    want = [1e-4 + (0.05 - 1e-4) * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(8)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx(0.05) and got[4] == pytest.approx((0.05 + 1e-4) / 2)


def test_linear_warmup_then_cosine_to_zero():
    cfg = optim_cfg("optim.lr=0.4", "optim.epochs=3", "optim.warmup_epochs=1", "optim.schedule=cosine")
    got = lrs(cfg, steps_per_epoch=2, steps=6)
    # warmup: 0.4 * (t + 1) / 2 for t = 0, 1; then cosine over the remaining 2 epochs = 4 steps
    want = [0.2, 0.4] + [0.4 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    assert got == pytest.approx(want, rel=1e-12)


def test_multistep_gamma_and_explicit_factors():
    # The augmentation study: x0.1 at epochs 150, 180, 210 of 240 (scaled down here to 3, 4, 5 of 6).
    cfg = optim_cfg("optim.lr=0.05", "optim.epochs=6", "optim.schedule=multistep", "optim.milestones=[3,4,5]")
    assert lrs(cfg, steps_per_epoch=1, steps=6) == pytest.approx([0.05, 0.05, 0.05, 0.005, 0.0005, 0.00005])
    # An explicit step list (attention-study style lambda schedule): factors need not be powers of one gamma.
    cfg = optim_cfg("optim.lr=0.1", "optim.epochs=4", "optim.schedule=multistep", "optim.milestones=[1,3]",
                    "optim.step_factors=[0.2,0.01]")
    assert lrs(cfg, steps_per_epoch=2, steps=8) == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.02, 0.02, 0.001, 0.001])


def test_linear_scaling_rule_and_scheduler_state_has_no_config():
    cfg = optim_cfg("optim.lr=0.1", "optim.min_lr=0.001", "optim.lr_reference_batch=256")
    assert scaled_lr(cfg, 64) == pytest.approx((0.025, 0.00025))  # Goyal et al.: lr * 64 / 256
    opt = build_optimizer(cfg, nn.Linear(2, 2), batch_size=1024)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    state = build_scheduler(cfg, opt, 10).state_dict()
    assert state["lr_lambdas"] == [None]  # a plain function: the config is not pickled into checkpoints


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)


def test_weight_decay_exclusion_of_norms_and_biases():
    model = Tiny()
    (one,) = param_groups(model, 5e-4, exclude_norm_bias=False)
    assert len(one["params"]) == 7 and one["weight_decay"] == 5e-4
    decay, no_decay = param_groups(model, 5e-4, exclude_norm_bias=True)
    assert {id(p) for p in decay["params"]} == {id(model.conv.weight), id(model.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in (model.bn.weight, model.bn.bias, model.ln.weight,
                                                                    model.ln.bias, model.fc.bias)}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0


def test_sgd_nesterov_and_adamw_step_like_their_formulas():
    p0 = torch.tensor([1.0, -2.0])
    grad = torch.tensor([0.5, 0.25])
    # SGD, momentum 0.9, Nesterov, wd 0.1: g' = g + wd p; buf = g'; update = g' + mu buf
    model = nn.Module()
    model.w = nn.Parameter(p0.clone())
    opt = build_optimizer(optim_cfg("optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=0.1"), model)
    model.w.grad = grad.clone()
    opt.step()
    g = grad + 0.1 * p0
    assert torch.allclose(model.w.detach(), p0 - 0.1 * (g + 0.9 * g))
    # AdamW first step: decoupled decay p (1 - lr wd), then p - lr * m_hat / (sqrt(v_hat) + eps) = p - lr * sign(g)
    model.w = nn.Parameter(p0.clone())
    opt = build_optimizer(optim_cfg("optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.1"), model)
    model.w.grad = grad.clone()
    opt.step()
    assert torch.allclose(model.w.detach(), p0 * (1 - 0.01 * 0.1) - 0.01 * grad / (grad.abs() + 1e-8), atol=1e-7)


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.accum_steps=3", "data.batch_size=64"], "not divisible by optim.accum_steps=3"),
    (["optim.milestones=[2,4]", "optim.step_factors=[0.1]"], "one LR factor per milestone"),
    (["dist.zero_stage=3"], "ZeRO stages 0, 1 or 2"),
    (["dist.backend=deepspeed", "train.precision=fp16", "dist.zero_stage=2"], "needs dist.zero_stage=0"),
    (["optim.min_lr=1.0", "optim.lr=0.1"], "'optim.min_lr' (1.0) is above"),
    (["train.preempt_signals=[USR3]"], "unknown signal 'USR3'"),
    (["train.keep_last=0"], "keep at least 1"),
    (["dist.backend=horovod"], "choose one of ddp, deepspeed"),
    (["train.precision=fp8"], "choose one of fp32, bf16, fp16"),
])
def test_inconsistent_options_are_one_line_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_global_batch_must_split_over_accumulation_and_ranks():
    from hpckd.train.options import check_batch_split

    check_batch_split(64, 2, 4)  # 64 = 2 micro-batches x 4 ranks x 8 images
    with pytest.raises(ConfigError, match=r"data.batch_size=48 does not split into optim.accum_steps=4 micro-batches "
                                          r"on 8 processes; use a multiple of 32"):
        check_batch_split(48, 4, 8)


def test_deepspeed_config_is_explicit():
    from hpckd.train.backends import deepspeed_config

    cfg = load_experiment(None, ["data.batch_size=64", "optim.accum_steps=2", "dist.backend=deepspeed", "dist.zero_stage=2",
                             "train.precision=bf16"])
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 2)
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed would clip at 1.0 if we left it out
    assert ds["zero_optimization"] == {"stage": 2} and ds["zero_allow_untested_optimizer"] is True
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in ds and "fp16" not in ds  # parameters and BatchNorm buffers stay fp32
    fp32 = deepspeed_config(load_experiment(None, ["dist.backend=deepspeed", "optim.clip_grad_norm=5"]), world_size=1)
    assert "zero_optimization" not in fp32 and "torch_autocast" not in fp32 and fp32["gradient_clipping"] == 5.0


def gated_step(opt: torch.optim.Optimizer) -> float | None:
    with finite_step_gate(opt) as skipped:
        opt.step()
    return None if skipped is None else float(skipped)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_finite_step_gate_skips_a_nonfinite_first_sgd_step_and_the_next_step_is_a_first_step(bad):
    """A skipped first step leaves weights and momentum as they were; the next step is SGD's first step by hand:
    g' = g + wd p, buf = g', p <- p - lr (g' + mu buf) (Nesterov), as if the skipped step never happened."""
    p0 = torch.tensor([1.0, -2.0, 0.5])
    model = nn.Module()
    model.w = nn.Parameter(p0.clone())
    opt = build_optimizer(optim_cfg("optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true",
                                    "optim.weight_decay=0.1"), model)
    assert is_fused(opt)
    model.w.grad = torch.tensor([0.5, bad, 0.25])
    assert gated_step(opt) == 1.0
    assert torch.equal(model.w.detach(), p0)
    assert torch.equal(opt.state[model.w]["momentum_buffer"], torch.zeros(3))
    grad = torch.tensor([0.5, -1.0, 0.25])
    model.w.grad = grad.clone()
    assert gated_step(opt) == 0.0
    g = grad + 0.1 * p0
    assert torch.allclose(model.w.detach(), p0 - 0.1 * (g + 0.9 * g), rtol=0, atol=1e-7)
    assert torch.allclose(opt.state[model.w]["momentum_buffer"], g, rtol=0, atol=1e-7)


def test_finite_step_gate_leaves_adamw_moments_and_step_count_unchanged():
    p0 = torch.tensor([1.0, -2.0])
    model = nn.Module()
    model.w = nn.Parameter(p0.clone())
    opt = build_optimizer(optim_cfg("optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.1"), model)
    model.w.grad = torch.tensor([0.5, 0.25])
    assert gated_step(opt) == 0.0
    after_one = model.w.detach().clone()
    state = {k: v.clone() for k, v in opt.state[model.w].items()}
    model.w.grad = torch.tensor([float("nan"), 0.25])
    assert gated_step(opt) == 1.0
    assert torch.equal(model.w.detach(), after_one)
    assert float(opt.state[model.w]["step"]) == 1.0  # the skipped step is not counted (bias correction stays right)
    assert all(torch.equal(opt.state[model.w][k], state[k]) for k in ("exp_avg", "exp_avg_sq"))
    # The first step by hand (decoupled decay, then lr * m_hat / (sqrt(v_hat) + eps) = lr * sign(g)):
    grad = torch.tensor([0.5, 0.25])
    assert torch.allclose(after_one, p0 * (1 - 0.01 * 0.1) - 0.01 * grad / (grad.abs() + 1e-8), atol=1e-7)


def test_without_fused_kernels_there_is_no_gate_and_a_resume_keeps_the_kernel_choice():
    model = nn.Linear(3, 2)
    plain = build_optimizer(optim_cfg("optim.fused=false"), model)
    assert not is_fused(plain) and "momentum_buffer" not in plain.state[model.weight]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert gated_step(plain) is None
    # A state saved by the foreach optimizer (or an older hpckd) restores its numbers into a fused one, which stays fused.
    fused = build_optimizer(optim_cfg(), model)
    load_optimizer_state(fused, plain.state_dict())
    assert is_fused(fused)
    assert torch.equal(fused.state[model.weight]["momentum_buffer"], plain.state[model.weight]["momentum_buffer"])
