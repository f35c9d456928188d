"""APOLLO: adaptive pretraining of language models for logical reasoning (Sanyal et al., 2023)."""
