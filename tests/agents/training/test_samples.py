"""Training samples from masked trajectories: loss masks, guidance, segments, export."""

import os

import numpy as np
import pytest

from apollo.agents import agent, storage
from apollo.agents.envs import research as research_env
from apollo.agents.envs import research_policy
from apollo.agents.service import client as client_lib
from apollo.agents.supervision import judging, labels, simulated_human
from apollo.agents.training import samples as samples_lib
from apollo.models import chat_template as C
from apollo.models import tool_calls as tool_calls_lib
from tests.agents.helpers import ListBackend, call

GUIDANCE_TEXT = "GPU 0 is shared with another team's job. Use gpu 1 instead."


RESPONSES = [
  call("list_files"),  # 0
  call("read_file", path="README.md"),  # 1
  call("read_file", path="README.md"),  # 2 mask: repeated no-op
  '{"tool": "sleep", "arguments": {"hours": 0.5}',  # 3 mask: unparseable
  call("set_config", key="learning_rate", value=0.0005),  # 4 (guidance delivered here)
  call("launch_run", gpu=1),  # 5
  call("check_run", run_id="r1"),  # 6 mask: flagged by the human
  call("sleep", hours=0.5),  # 7
]
KEPT, MASKED = [0, 1, 4, 5, 7], [2, 3, 6]


@pytest.fixture(scope="module")
def template():
  return C.ChatTemplate(C.train_chat_tokenizer(), guidance_tag="human_guidance")


@pytest.fixture
def store(tmp_path):
  s = storage.SQLiteStore(os.path.join(tmp_path, "store.sqlite"))
  yield s
  s.close()


def crafted_session(store, session_id="a"):
  """8 steps through the real loop; guidance delivered with step 4; judged."""

  def listener(step):
    if step.step_index == 3:
      store.add_guidance(session_id, GUIDANCE_TEXT)

  agent.run_episode(
    session_id,
    research_env.ResearchEnv(),
    ListBackend(RESPONSES),
    store,
    1,
    config=agent.AgentConfig(max_steps=len(RESPONSES)),
    listeners=[listener],
  )
  store.set_flag(session_id, 6, "bad", "check after sleeping, not before")
  label_store = labels.LabelStore(store.path)
  result = judging.judge_session(
    store, session_id, [judging.RuleJudge(), judging.HumanFlagJudge()], label_store
  )
  assert result.masked_steps() == MASKED
  return label_store


def decode(template, ids):
  return template.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def target_runs(sample):
  """The maximal runs of loss-masked positions, as (start, end) pairs."""
  mask = np.concatenate([[False], sample.loss_mask, [False]]).astype(np.int8)
  edges = np.flatnonzero(np.diff(mask))
  return list(zip(edges[::2], edges[1::2]))


def test_per_step_samples_train_exactly_the_kept_response(store, template):
  label_store = crafted_session(store)
  samples, stats = samples_lib.build_samples(store, template, label_store=label_store)
  assert [s.meta["step"] for s in samples] == KEPT
  for sample in samples:
    step = store.get_step("a", sample.meta["step"])
    # The input is the exact stored prompt followed by the stored response.
    expected = template.render(
      step.messages + [{"role": "assistant", "content": step.response}],
      trainable=[False] * len(step.messages) + [True],
    )
    np.testing.assert_array_equal(sample.input_ids, expected.ids)
    np.testing.assert_array_equal(sample.loss_mask, expected.loss_mask)
    # One target run: the response's content and its <|im_end|>, nothing else.
    [(start, end)] = target_runs(sample)
    assert decode(template, sample.input_ids[start:end]) == step.response + C.IM_END
    assert sample.input_ids[end - 1] == template.im_end_id
    assert decode(template, sample.input_ids[:start]).endswith("<|im_start|>assistant\n")
    assert np.all(sample.roles[sample.loss_mask] == C.ROLE_ASSISTANT)
    assert np.all(sample.segment_ids[sample.loss_mask] == len(step.messages))
    assert sample.meta["trainable_steps"] == [step.step_index]
    assert sample.meta["verdicts"][str(step.step_index)]["verdict"] == "keep"
  # Masked actions are in later contexts, never trained.
  last = samples[-1]
  context = decode(template, last.input_ids[~last.loss_mask])
  for index in MASKED:
    assert store.get_step("a", index).response in context
  assert stats.actions == 8 and stats.masked_actions == 3
  assert stats.fraction_masked == pytest.approx(3 / 8)
  assert dict(stats.masked_by_reason) == {"repeated_noop": 1, "invalid_call": 1, "human_flag": 1}
  assert stats.samples == 5 and stats.target_tokens == sum(int(s.loss_mask.sum()) for s in samples)


def test_per_segment_sample_masks_bad_actions_in_place(store, template):
  label_store = crafted_session(store)
  [sample], _ = samples_lib.build_samples(
    store, template, mode="per_segment", label_store=label_store
  )
  assert sample.meta["steps"] == list(range(8))
  assert sample.meta["trainable_steps"] == KEPT
  assert sample.meta["masked_steps"] == MASKED
  assert sample.meta["verdicts"]["6"]["labels"] == [
    ["human", "mask", "human_flag"],
    ["rules", "keep", "ok"],
  ]
  runs = target_runs(sample)
  responses = [store.get_step("a", i).response for i in KEPT]
  assert [decode(template, sample.input_ids[a:b]) for a, b in runs] == [
    r + C.IM_END for r in responses
  ]
  for index in MASKED:
    assert store.get_step("a", index).response in decode(template, sample.input_ids)
  # Same targets as the per-step samples, in one sequence.
  per_step, _ = samples_lib.build_samples(store, template, label_store=label_store)
  assert int(sample.loss_mask.sum()) == sum(int(s.loss_mask.sum()) for s in per_step)


@pytest.mark.parametrize("mode", samples_lib.MODES)
def test_human_messages_kept_or_removed(store, template, mode):
  label_store = crafted_session(store)
  kept, kept_stats = samples_lib.build_samples(
    store, template, mode=mode, label_store=label_store, human_messages="keep"
  )
  removed, removed_stats = samples_lib.build_samples(
    store, template, mode=mode, label_store=label_store, human_messages="remove"
  )
  assert len(kept) == len(removed)
  with_guidance = [s for s in kept if (s.roles == C.ROLE_GUIDANCE).any()]
  assert with_guidance and GUIDANCE_TEXT in decode(template, with_guidance[-1].input_ids)
  for sample in removed:
    assert not (sample.roles == C.ROLE_GUIDANCE).any()
    assert GUIDANCE_TEXT not in decode(template, sample.input_ids)
  assert kept_stats.guidance_tokens > 0 and removed_stats.guidance_tokens == 0
  # Step 4's prompt was the first to hold it; kept steps 4, 5 and 7 saw it.
  assert removed_stats.guidance_messages_removed == (3 if mode == "per_step" else 1)
  # The targets do not change, only the context.
  for a, b in zip(kept, removed):
    assert decode(template, a.input_ids[a.loss_mask]) == decode(template, b.input_ids[b.loss_mask])
    assert len(b) < len(a) or not (a.roles == C.ROLE_GUIDANCE).any()


def test_segments_follow_context_compression(store, template):
  human = simulated_human.SimulatedHuman(client_lib.LocalClient.for_store(store))
  agent.run_episode(
    "s",
    research_env.ResearchEnv(),
    research_policy.ScriptedResearchPolicy(0),
    store,
    0,
    listeners=[human.on_step],
    config=agent.AgentConfig(context_token_threshold=3000, max_steps=40),
  )
  steps = store.get_steps("s", full=False)
  summaries = [s.step_index for s in steps if s.kind == "summary"]
  assert summaries, "the threshold should force compressions"
  result = judging.judge_session(store, "s", [judging.RuleJudge(), judging.HumanFlagJudge()])
  segments, _ = samples_lib.build_samples(store, template, ["s"], mode="per_segment")
  assert len(segments) == len(summaries) + 1
  # Every kept action is trained exactly once across the segments, no masked one is.
  trained = [i for s in segments for i in s.meta["trainable_steps"]]
  kept = sorted(i for i, l in result.combined.items() if not l.masked)
  assert sorted(trained) == kept and len(set(trained)) == len(trained)
  for sample in segments:
    # A segment sample starts at the system prompt and never spans a summary step.
    assert decode(template, sample.input_ids[:3]).startswith("<|im_start|>system")
    assert not any(sample.meta["first_step"] < i < sample.meta["last_step"] for i in summaries)
  per_step, stats = samples_lib.build_samples(store, template, ["s"], mode="per_step")
  assert sum(int(s.loss_mask.sum()) for s in segments) == stats.target_tokens
  assert len(per_step) == len(kept)


def test_jsonl_and_array_record_round_trip(store, template, tmp_path):
  label_store = crafted_session(store)
  samples, _ = samples_lib.build_samples(
    store, template, label_store=label_store, human_messages="remove"
  )
  jsonl = os.path.join(tmp_path, "samples.jsonl")
  records = os.path.join(tmp_path, "samples.array_record")
  assert samples_lib.write_jsonl(samples, jsonl) == len(samples)
  assert samples_lib.write_array_record(samples, records) == len(samples)
  assert not os.path.exists(jsonl + ".tmp") and not os.path.exists(records + ".tmp")
  with samples_lib.ArrayRecordSamples(records) as reader:
    assert len(reader) == len(samples)
    assert reader[3].meta == samples[3].meta
    with pytest.raises(IndexError):
      reader[len(samples)]
  for restored in (list(samples_lib.read_jsonl(jsonl)), samples_lib.read_array_record(records)):
    assert len(restored) == len(samples)
    for a, b in zip(samples, restored):
      for field in ("input_ids", "loss_mask", "roles", "segment_ids"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert getattr(a, field).dtype == getattr(b, field).dtype
      assert a.meta == b.meta


def test_outcome_filter_baseline_trains_every_action(store, template):
  crafted_session(store, "good")
  crafted_session(store, "bad")
  crafted_session(store, "unfinished")
  store.update_session("good", result={"score": 80.0})
  store.update_session("bad", result={"score": 20.0})
  store.update_session("unfinished", result={"steps": 8})  # no score
  assert samples_lib.outcome_filter(store, 50.0) == ["good"]
  assert samples_lib.outcome_filter(store, 10.0, ["bad", "unfinished", "missing"]) == ["bad"]
  samples, stats = samples_lib.build_outcome_baseline(store, template, 50.0, mode="per_step")
  assert {s.meta["session_id"] for s in samples} == {"good"}
  assert [s.meta["step"] for s in samples] == list(range(8))  # masked ones too
  assert stats.masked_actions == 0
  assert samples[3].meta["verdicts"]["3"]["reason"] == "outcome_filter"


def test_unjudged_steps_max_tokens_and_bad_options(store, template):
  agent.run_episode(
    "u",
    research_env.ResearchEnv(),
    ListBackend(RESPONSES[:4]),
    store,
    1,
    config=agent.AgentConfig(max_steps=4),
  )
  store.set_flag("u", 1, "bad", "no")
  samples, stats = samples_lib.build_samples(store, template, ["u"])
  # Never judged: only the human's flag masks.
  assert [s.meta["step"] for s in samples] == [0, 2, 3]
  assert samples[0].meta["verdicts"]["0"]["reason"] == "unjudged"
  limit = len(samples[1]) - 1
  short, stats = samples_lib.build_samples(store, template, ["u"], max_tokens=limit)
  assert all(len(s) <= limit for s in short) and stats.dropped_too_long == 2
  with pytest.raises(ValueError):
    samples_lib.SampleBuilder(store, template, mode="per_turn")
  with pytest.raises(ValueError):
    samples_lib.SampleBuilder(store, template, human_messages="fold")


# A checkpoint's own templates over the demo tokenizer: SmolLM2's (no tools, no tool
# calls, no tool role: the conversation is adapted) and a Qwen2.5-style one (all three).
SMOLLM2_TEMPLATE = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
  "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
  "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("which", ["smollm2", "qwen25"])
def test_native_tool_calls_train_as_the_model_writes_them(store, which):
  from tests.models.test_jinja_templates import QWEN25_STYLE

  template = C.ChatTemplate(
    C.train_chat_tokenizer(),
    "human_guidance",
    template=SMOLLM2_TEMPLATE if which == "smollm2" else QWEN25_STYLE,
    tool_call_format="hermes",
  )
  agent.run_episode(
    "n",
    research_env.ResearchEnv(),
    research_policy.ScriptedResearchPolicy(0, tool_mode="native", invalid_rate=0.0),
    store,
    0,
    config=agent.AgentConfig(max_steps=5),
  )
  steps = store.get_steps("n")
  assert all(s.tool_calls for s in steps)  # OpenAI tool_calls, results as tool messages
  samples, _ = samples_lib.build_samples(store, template, ["n"], verdicts="all")
  assert [s.meta["step"] for s in samples] == [s.step_index for s in steps]
  for sample, step in zip(samples, steps):
    [(start, end)] = target_runs(sample)
    call = tool_calls_lib.render(step.tool_calls, "hermes")
    content = step.assistant_message["content"]
    # Hermes text either way: written into the content for SmolLM2's template, by
    # the template itself for the Qwen2.5-style one (which puts "\n" before the call).
    assert decode(template, sample.input_ids[start:end]) == f"{content}\n{call}<|im_end|>"
    context = decode(template, sample.input_ids[:start])
    assert '"name": "check_run"' in context or '"name": "read_file"' in context  # the tools
    if step.step_index:
      assert "<tool_response>\n<observation" in context
  # Per segment: the same targets in one sequence.
  [segment], _ = samples_lib.build_samples(
    store, template, ["n"], mode="per_segment", verdicts="all"
  )
  assert int(segment.loss_mask.sum()) == sum(int(s.loss_mask.sum()) for s in samples)
  assert (segment.roles == C.ROLE_TOOL).sum() > 0
