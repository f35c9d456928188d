"""An LLM as judge of single actions, behind any OpenAI-compatible server.

`LLMJudge` implements `judging.Judge`: for one action step it shows a model the
task, the human advice delivered so far, the recent history, the action and the
observation that followed it (`JUDGE_SYSTEM_PROMPT`, `JUDGE_USER_TEMPLATE`), and
reads one strict JSON verdict (`parse_judge_answer`). A malformed answer or an
unreachable server gives 'keep' with reason 'judge_error' (counted in
`LLMJudge.errors`), never an exception: a judge outage must not stop data
building. Greedy sampling through `backends.openai_chat.OpenAIChatBackend`
(`LLMJudge.from_openai`) makes a verdict reproducible for one model.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Any

from apollo.agents.backends import base as backends_lib
from apollo.agents.backends import openai_chat
from apollo.agents.supervision import judging
from apollo.agents.supervision import labels as labels_lib

JUDGE_REASONS = ("ok", "invalid_call", "redundant", "destroys_progress", "ignores_advice", "other")

JUDGE_SYSTEM_PROMPT = """You review the actions of an autonomous agent. The agent works on a long task through tools, one tool call per turn, and a human expert may send it advice at any time. You judge ONE action: should a model be trained to imitate it?

Answer "mask" when the action is sub-optimal in a way a model should not learn:
- invalid_call: the tool call is malformed, names an unknown tool, has bad arguments, or the environment rejected it;
- redundant: it repeats an earlier action while nothing has changed, or spends time or budget without gaining information;
- destroys_progress: it throws away useful work, for example killing a training run that was healthy and only needed more time;
- ignores_advice: it contradicts advice the human gave earlier;
- other: another clear mistake (say which in the explanation).
Answer "keep" for reasonable actions, including ordinary or cautious ones. When in doubt, keep.

Reply with exactly one JSON object and nothing else:
{"verdict": "keep" or "mask", "reason": "ok", "invalid_call", "redundant", "destroys_progress", "ignores_advice" or "other", "explanation": "one sentence"}"""  # noqa: E501 (prompt text: one paragraph a line)

JUDGE_USER_TEMPLATE = """# Task
{task}

# Human advice shown to the agent so far
{guidance}

# Earlier steps (oldest first; observations shortened)
{history}

# The action to judge (step {step_index})
{response}

# The observation that followed it
{observation}

Judge the action of step {step_index}. Reply with the JSON object only."""


class JudgeAnswerError(ValueError):
  """The judge model's answer is not the required JSON verdict."""


def parse_judge_answer(text: str) -> tuple[str, str, str]:
  """(verdict, reason, explanation) from a strict JSON answer.

  The answer must be exactly one JSON object (surrounding whitespace and one
  Markdown code fence are tolerated) with `verdict` in keep/mask, `reason` in
  `JUDGE_REASONS` (a mask needs a reason other than 'ok') and an optional string
  `explanation`.

  Raises:
    JudgeAnswerError: otherwise.
  """
  body = text.strip()
  fence = re.fullmatch(r"```(?:json)?\s*\n(.*?)\n?```", body, re.DOTALL)
  if fence:
    body = fence.group(1).strip()
  try:
    data = json.loads(body)
  except json.JSONDecodeError as e:
    raise JudgeAnswerError(f"not a JSON object: {e}") from e
  if not isinstance(data, dict):
    raise JudgeAnswerError("not a JSON object")
  verdict, reason = data.get("verdict"), data.get("reason", "ok")
  explanation = data.get("explanation", "")
  if verdict not in labels_lib.VERDICTS:
    raise JudgeAnswerError(f"verdict must be keep or mask, got {verdict!r}")
  if reason not in JUDGE_REASONS:
    raise JudgeAnswerError(f"reason must be one of {JUDGE_REASONS}, got {reason!r}")
  if verdict == labels_lib.MASK and reason == "ok":
    raise JudgeAnswerError('a mask needs a reason other than "ok"')
  if not isinstance(explanation, str):
    raise JudgeAnswerError("explanation must be a string")
  return verdict, reason, explanation


def _shorten(text: str, limit: int) -> str:
  if len(text) <= limit:
    return text
  half = limit // 2
  return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


class LLMJudge:
  """An LLM as judge through any `backends.Backend` (normally `OpenAIChatBackend`).

  Args:
    backend: the model client; `complete(messages, ())` is called once per step.
    name: the judge's name in labels.
    history_steps: how many earlier action steps the prompt shows.
    max_observation_chars: observations are middle-cut to this length.
    max_response_chars: the judged response is middle-cut to this length.
    include_hidden_facts: also show the task's hidden facts (a
      privileged judge, like the simulated human); off by default.

  Attributes:
    calls: model calls made.
    errors: Counter of failures ('malformed', 'backend'); each gave 'judge_error'.
  """

  def __init__(
    self,
    backend: backends_lib.Backend,
    name: str = "llm",
    history_steps: int = 8,
    max_observation_chars: int = 1500,
    max_response_chars: int = 4000,
    include_hidden_facts: bool = False,
  ):
    self.backend = backend
    self.name = name
    self.history_steps = history_steps
    self.max_observation_chars = max_observation_chars
    self.max_response_chars = max_response_chars
    self.include_hidden_facts = include_hidden_facts
    self.calls = 0
    self.errors: collections.Counter[str] = collections.Counter()

  @classmethod
  def from_openai(
    cls,
    base_url: str,
    model: str,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    max_retries: int = 2,
    **kwargs: Any,
  ) -> LLMJudge:
    """A judge on an OpenAI-compatible server, sampling greedily."""
    backend = openai_chat.OpenAIChatBackend(
      base_url=base_url,
      model=model,
      api_key=api_key,
      timeout_s=timeout_s,
      max_retries=max_retries,
      temperature=0.0,
      max_tokens=512,
    )
    return cls(backend, **kwargs)

  def build_messages(self, view: judging.TrajectoryView, step_index: int) -> list[dict[str, str]]:
    """The judge's prompt for one step (system + one user message)."""
    step = view.step(step_index)
    guidance = view.delivered_guidance(step_index)
    guidance_text = (
      "\n".join(f"- [shown at step {g.delivered_step}] {g.text}" for g in guidance) or "(none)"
    )
    earlier = view.earlier(step_index)
    history = []
    summaries = [s for s in earlier if s.kind == "summary"]
    recent = [s for s in earlier if s.kind == "action"][-self.history_steps :]
    if summaries and (not recent or summaries[-1].step_index < recent[0].step_index):
      history.append(f"(summary of older steps)\n{_shorten(summaries[-1].response, 3000)}")
    for s in recent:
      call = json.dumps(s.action) if s.action else f"(invalid call: {s.parse_error})"
      history.append(
        f"step {s.step_index}: {call}\n  -> "
        f"{_shorten(s.observation, 300).replace(chr(10), chr(10) + '     ')}"
      )
    task = view.task_text()
    hidden = view.facts.hidden_facts() if self.include_hidden_facts else {}
    if hidden:
      task += "\n\nFacts about this task that the agent was not told: " + json.dumps(
        hidden, sort_keys=True
      )
    user = JUDGE_USER_TEMPLATE.format(
      task=_shorten(task, 4000),
      guidance=guidance_text,
      history="\n".join(history) or "(this is the first step)",
      step_index=step_index,
      response=_shorten(step.reply_text(), self.max_response_chars),
      observation=_shorten(step.observation, self.max_observation_chars),
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]

  def judge(self, view: judging.TrajectoryView, step_index: int) -> labels_lib.Label | None:
    if view.step(step_index).kind != "action":
      return None
    messages = self.build_messages(view, step_index)
    self.calls += 1
    try:
      text = self.backend.complete(messages, ()).text
    except Exception as e:  # pylint: disable=broad-except
      # A judge outage must not stop data building: the action is kept, and counted.
      self.errors["backend"] += 1
      return labels_lib.Label(
        labels_lib.KEEP, "judge_error", self.name, f"{type(e).__name__}: {e}"[:300]
      )
    try:
      verdict, reason, explanation = parse_judge_answer(text)
    except JudgeAnswerError as e:
      self.errors["malformed"] += 1
      return labels_lib.Label(
        labels_lib.KEEP, "judge_error", self.name, f"{e}; answer: {text[:200]!r}"
      )
    return labels_lib.Label(verdict, reason, self.name, explanation)
