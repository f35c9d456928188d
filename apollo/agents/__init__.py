"""Apollo: asynchronous human-agent rollout with action-level filtering (Fu et al., 2025)."""
