"""Apollo: three published methods named Apollo on one JAX stack.

- `apollo.optim`: the Apollo optimizer (Ma, 2020) as optax transformations.
- `apollo.lm`: APOLLO logical-reasoning adaptive pretraining (Sanyal et al., 2023).
- `apollo.agents`: Apollo asynchronous human-agent rollout (Fu et al., 2025).
- `apollo.common`: mesh, checkpoint and metrics code shared by the trainers.
- `apollo.models`: every model (encoder and decoder families, HF / GGUF readers,
  tokenizers, chat templates, sampling, serving) and `apollo.models.load`.
- `apollo.studies`: comparisons and reports; no library module imports them.

The dependency rule (tests/test_layering.py): optim <- common <- models <- lm, agents
<- studies <- experiments, benchmarks.
"""
