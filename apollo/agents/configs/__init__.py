"""ml_collections config files of the agent trainers.

Use one as `--config=apollo/agents/configs/NAME.py:preset`.
"""
