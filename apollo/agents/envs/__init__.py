"""The environments agents act in: the research task family (`research`, with its
scripted policy `research_policy` and its answers to judges `research_facts`) and
real shell workspaces (`workspace`)."""

from apollo.agents import env as env_lib
from apollo.agents.envs import research, research_facts


def episode_facts(env_name: str, seed: int, privileged: bool) -> env_lib.EpisodeFacts:
  """What environment `env_name` can tell judges about its episode of `seed`.

  Args:
    env_name: the session's environment (`Environment.name`).
    seed: the session's seed.
    privileged: also give the task's hidden facts, where the environment has them.
  """
  if env_name == research.ResearchEnv.name:
    return research_facts.ResearchFacts(research.generate_task(seed) if privileged else None)
  return env_lib.EpisodeFacts()
