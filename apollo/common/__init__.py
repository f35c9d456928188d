"""Mesh/sharding, checkpointing and metrics shared by the lm and agents trainers."""
