"""ml_collections config files for the experiments (`--config=experiments/configs/NAME.py:preset`)."""
