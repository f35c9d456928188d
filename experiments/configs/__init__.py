"""ml_collections config files for the experiments.

Use one as `--config=experiments/configs/NAME.py:preset`.
"""
