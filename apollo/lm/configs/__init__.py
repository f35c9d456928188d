"""ml_collections config files of the APOLLO trainers.

Use one as `--config=apollo/lm/configs/NAME.py:preset`.
"""
