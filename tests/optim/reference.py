"""A float64 NumPy restatement of the reference Apollo step.

Written line by line from the author's reference PyTorch implementation
(github.com/XuezheMax/apollo, optim/apollo.py, the sigma = 0.01 version),
deliberately naive (one tensor at a time, no fusion, the reference's own order of
operations) so that it can serve as the oracle for `apollo.optim`.

References:
  X. Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for
  Nonconvex Stochastic Optimization", arXiv 2009.13586, 2020.
"""

import numpy as np


class NumpyApollo:
  """The reference algorithm on a dict of float64 NumPy tensors."""

  def __init__(
    self,
    lr,
    beta=0.9,
    eps=1e-4,
    rebound="constant",
    warmup=500,
    init_lr=None,
    weight_decay=0.0,
    weight_decay_type=None,
    sigma=0.01,
    dtype=np.float64,
  ):
    self.lr, self.beta, self.eps, self.rebound = lr, beta, eps, rebound
    self.warmup = warmup
    self.init_lr = lr / 1000.0 if init_lr is None else init_lr
    self.wd = weight_decay
    if weight_decay_type is None:
      weight_decay_type = "L2" if rebound == "constant" else "decoupled"
    self.wd_type = weight_decay_type
    self.sigma = sigma
    self.dtype = dtype  # float64 for the oracle; float32 to measure rounding alone.
    self.state = {}

  def step(self, params, grads):
    """Returns the new params (a dict of float64 arrays)."""
    new_params = {}
    for name, theta in params.items():
      theta = np.asarray(theta, self.dtype)
      g = np.asarray(grads[name], self.dtype)
      if name not in self.state:
        zeros = np.zeros_like(theta)
        self.state[name] = dict(t=0, m=zeros.copy(), B=zeros.copy(), d=zeros.copy())
      st = self.state[name]
      if self.wd_type == "L2":
        g = g + self.wd * theta
      st["t"] += 1
      t = st["t"]
      alpha = (1 - self.beta) / (1 - self.beta**t)
      if t - 1 < self.warmup:
        lr_t = self.init_lr + (self.lr - self.init_lr) * (t - 1) / self.warmup
      else:
        lr_t = self.lr
      delta = g - st["m"]
      if self.rebound == "constant":
        r, e = self.sigma, self.eps / self.sigma
      else:
        r, e = np.max(np.abs(delta)), self.eps
      st["m"] = st["m"] + alpha * delta
      D = np.sum(st["d"] ** 4) ** 0.25 + e
      u = st["d"] / D
      v = u * u
      c = -alpha * np.sum(delta * u) / D - np.sum(st["B"] * v)
      st["B"] = st["B"] + c * v
      if self.rebound == "constant":
        den = np.maximum(np.abs(st["B"]), self.sigma)
      else:
        den = np.maximum(np.abs(st["B"]), r) + e / alpha
      d = st["m"] / den
      if self.wd_type == "decoupled":
        d = d + self.wd * theta
      elif self.wd_type == "stable":
        d = d + (self.wd / np.mean(den)) * theta
      st["d"] = d
      new_params[name] = theta - lr_t * d
    return new_params
