"""The comparison pipeline at its tiniest: every stage runs and results.json has a..e."""

import json
import os

from apollo.agents.configs import sft as agent_sft_config
from apollo.studies import agent_compare

FIELDS = (
  "score_mean",
  "score_std",
  "success_rate_mean",
  "success_rate_std",
  "interventions_per_episode",
  "fraction_masked",
  "collection_env_steps",
)


def test_comparison_smoke_writes_results(tmp_path):
  c = agent_sft_config.get_config("compare")
  p = c.compare
  p.seeds = (0,)
  p.bc_episodes, p.bc_guided_episodes, p.bc_steps = 1, 1, 2
  p.collect_episodes, p.sft_steps, p.eval_episodes = 1, 1, 1
  p.max_steps, p.max_new_tokens, p.tokenizer_vocab = 6, 8, 300
  p.prompt_bucket = 64
  c.data.seq_len, c.data.batch_size = 256, 8
  c.model.hidden_size, c.model.intermediate_size = 32, 64
  results = agent_compare.run_comparison(c, str(tmp_path))
  with open(os.path.join(tmp_path, "results.json")) as f:
    saved = json.load(f)
  assert sorted(saved["variants"]) == list(agent_compare.VARIANTS)
  for v in agent_compare.VARIANTS:
    for field in FIELDS:
      assert field in saved["variants"][v], (v, field)
  assert saved["variants"]["a"]["interventions_per_episode"] == 0
  assert os.path.isfile(os.path.join(tmp_path, "results.md"))
  assert os.path.isfile(os.path.join(tmp_path, "results.png"))
  assert results["per_seed"][0]["variants"]["c"]["collection_env_steps"] > 0
