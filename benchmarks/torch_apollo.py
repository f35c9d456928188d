"""The reference PyTorch Apollo step, restated for speed comparisons only.

A `torch.optim.Optimizer` written from the author's reference implementation
(github.com/XuezheMax/apollo, optim/apollo.py, the sigma = 0.01 version) in the
reference's own style: one tensor at a time, in-place torch ops, one host sync per
tensor for 'stable' decay. `benchmarks/optim_step.py` times it against the JAX
`apollo`; torch is not a dependency of this project and this module is imported
only when `import torch` works.

References:
  X. Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for
  Nonconvex Stochastic Optimization", arXiv 2009.13586, 2020.
"""

from __future__ import annotations

import math

import torch


class TorchApollo(torch.optim.Optimizer):
  """Apollo (Ma, 2020) as the reference implements it, tensor by tensor."""

  def __init__(
    self,
    params,
    lr,
    beta=0.9,
    eps=1e-4,
    rebound="constant",
    warmup=500,
    init_lr=None,
    weight_decay=0.0,
    weight_decay_type=None,
    sigma=0.01,
  ):
    if not lr > 0.0:
      raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= beta < 1.0:
      raise ValueError(f"Invalid beta: {beta}")
    if rebound not in ("constant", "belief"):
      raise ValueError(f"Invalid rebound: {rebound}")
    init_lr = lr / 1000.0 if init_lr is None else init_lr
    if weight_decay_type is None:
      weight_decay_type = "L2" if rebound == "constant" else "decoupled"
    if weight_decay_type not in ("L2", "decoupled", "stable"):
      raise ValueError(f"Invalid weight decay type: {weight_decay_type}")
    defaults = dict(
      lr=lr,
      beta=beta,
      eps=eps,
      rebound=rebound,
      warmup=warmup,
      init_lr=init_lr,
      weight_decay=weight_decay,
      weight_decay_type=weight_decay_type,
      sigma=sigma,
    )
    super().__init__(params, defaults)

  @torch.no_grad()
  def step(self, closure=None):
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    for group in self.param_groups:
      beta, sigma, wd = group["beta"], group["sigma"], group["weight_decay"]
      for p in group["params"]:
        if p.grad is None:
          continue
        state = self.state[p]
        if not state:
          state["step"] = 0
          state["exp_avg_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
          state["approx_hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
          state["update"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # Warmup is evaluated at the count before this update (t - 1).
        if state["step"] < group["warmup"]:
          lr_t = (
            group["init_lr"] + (group["lr"] - group["init_lr"]) * state["step"] / group["warmup"]
          )
        else:
          lr_t = group["lr"]

        grad = p.grad
        if wd != 0 and group["weight_decay_type"] == "L2":
          grad = grad.add(p, alpha=wd)
        m = state["exp_avg_grad"]
        B = state["approx_hessian"]
        d = state["update"]

        state["step"] += 1
        alpha = (1 - beta) / (1 - beta ** state["step"])
        delta = grad - m
        if group["rebound"] == "belief":
          rebound, eps = delta.norm(p=math.inf), group["eps"]
        else:
          rebound, eps = sigma, group["eps"] / sigma

        m.add_(delta, alpha=alpha)
        denom = d.norm(p=4).add(eps)
        d.div_(denom)  # d is now u; it is overwritten with the new direction below.
        v = d.mul(d)
        coeff = delta.div_(denom).mul_(d).sum().mul(-alpha) - B.mul(v).sum()
        B.addcmul_(v, coeff)

        if group["rebound"] == "belief":
          den = torch.max(B.abs(), rebound).add_(group["eps"] / alpha)
        else:
          den = B.abs().clamp_(min=rebound)
        d.copy_(m.div(den))
        if wd != 0 and group["weight_decay_type"] != "L2":
          if group["weight_decay_type"] == "stable":
            d.add_(p, alpha=wd / den.mean().item())
          else:
            d.add_(p, alpha=wd)
        p.add_(d, alpha=-lr_t)
    return loss
