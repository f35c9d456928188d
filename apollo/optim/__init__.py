"""The Apollo optimizer (Ma, 2020) as optax gradient transformations.

`apollo` is the user-facing optimizer; `scale_by_apollo` is its preconditioner for
your own optax chains; `init_sharded` builds any optimizer's state already sharded
like the params.

X. Ma, "Apollo: An Adaptive Parameter-wise Diagonal Quasi-Newton Method for Nonconvex
Stochastic Optimization", arXiv 2009.13586, 2020; reference implementation
github.com/XuezheMax/apollo.
"""

from apollo.optim.apollo import ScaleByApolloState, apollo, apollo_learning_rate, scale_by_apollo
from apollo.optim.sharding import init_sharded, state_shardings

__all__ = [
  "ScaleByApolloState",
  "apollo",
  "apollo_learning_rate",
  "init_sharded",
  "scale_by_apollo",
  "state_shardings",
]
