"""The compact view of the context that small policies are shown."""

from apollo.agents.backends import compact_view


def test_policy_view_keeps_the_tail_and_optionally_guidance():
  messages = [
    {"role": "system", "content": "long"},
    {"role": "user", "content": "task"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "o1"},
    {"role": "user", "content": '<human_guidance id="1" source="h">x</human_guidance>'},
    {"role": "assistant", "content": "a2"},
    {"role": "user", "content": "o2"},
  ]
  view = compact_view.policy_view(messages, 2)
  assert [m["content"] for m in view[1:]] == ["a2", "o2"]
  view = compact_view.policy_view(messages, 3)
  assert view[0]["content"] == compact_view.COMPACT_SYSTEM_PROMPT
  assert [m["content"] for m in view[1:]][0] == "o1" and len(view) == 5
  assert len(compact_view.policy_view(messages, 3, keep_guidance=False)) == 4
