"""The research environment's properties, measured with the scripted baseline."""

from apollo.studies import research_baseline


def test_environment_properties_hold():
  """Measured on 16 train and 16 test seeds: long episodes, rare solo success,
  large gain from human knowledge."""
  for split in ("train", "test"):
    solo = research_baseline.measure(split, 16, with_human=False)
    guided = research_baseline.measure(split, 16, with_human=True)
    assert solo["median_steps"] >= 50 and guided["median_steps"] >= 50
    assert solo["success_rate"] <= 0.2
    assert guided["success_rate"] >= solo["success_rate"] + 0.5
    assert guided["mean_interventions"] <= 4
