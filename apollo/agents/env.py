"""The environment interface every rollout talks to.

An environment speaks text: `reset(seed)` returns the first observation, `step(action)`
returns the next one. An action is one tool call, a tool name plus JSON arguments,
and every tool is described by a `ToolSpec` whose `parameters` field is a JSON-schema
object; `ToolSpec.to_openai()` is the same tool in the OpenAI `tools` format that
native tool calling sends. `validate_action` checks a call against that schema
*before* the environment sees it, so environments only ever receive well-formed
arguments and a malformed call becomes an error observation in the agent loop
rather than an exception.

Environments also expose:
- a clock (`now_hours`): simulated hours for the built-in research tasks, real
  wall-clock hours for the workspace environment;
- `interrupt()`: called from another thread (the HTTP API) to cut short the command
  that is running right now, without stopping the episode;
- `snapshot()` / `restore()`: a JSON-serialisable state stored with every step, so a
  rollout killed at any moment resumes from its last completed step.

An observation that starts with "ERROR" reports a call the environment rejected.
Facts about a step that supervision needs (which job a call started or stopped,
what the agent was shown about a job) go into `StepResult.info` as structured
data, stored with the step; an environment's `EpisodeFacts` reads them back, so
judges and supervisors never parse observation text.
"""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from apollo.agents import guidance as guidance_lib
from apollo.agents import storage as storage_lib


@dataclasses.dataclass(frozen=True)
class ToolSpec:
  """One tool: its name, a description for the prompt, and a JSON schema of arguments."""

  name: str
  description: str
  parameters: Mapping[str, Any]  # a JSON-schema object: {"type": "object", ...}

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}

  def to_openai(self) -> dict[str, Any]:
    """The tool as an entry of an OpenAI chat-completions request's `tools`."""
    return {"type": "function", "function": self.to_json()}


@dataclasses.dataclass(frozen=True)
class Action:
  """One tool call: `{"tool": name, "arguments": {...}}`."""

  tool: str
  arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {"tool": self.tool, "arguments": dict(self.arguments)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> Action:
    return cls(tool=data["tool"], arguments=dict(data.get("arguments") or {}))


@dataclasses.dataclass
class StepResult:
  """What `Environment.step` returns."""

  observation: str
  reward: float = 0.0
  done: bool = False
  info: dict[str, Any] = dataclasses.field(default_factory=dict)


class Environment(abc.ABC):
  """Base class of text environments with schema-checked tool calls."""

  name: str = "environment"

  @abc.abstractmethod
  def tools(self) -> Sequence[ToolSpec]:
    """The tools the agent may call (fixed for the whole episode)."""

  @abc.abstractmethod
  def reset(self, seed: int) -> str:
    """Starts the episode determined by `seed`; returns the task and first observation."""

  @abc.abstractmethod
  def step(self, action: Action) -> StepResult:
    """Executes one already-validated tool call."""

  def close(self) -> None:
    """Releases processes and files; safe to call twice."""

  def now_hours(self) -> float:
    """Elapsed episode time in hours (simulated or wall-clock)."""
    return 0.0

  def interrupt(self) -> bool:
    """Cuts short the running command, if any. Returns whether one was running."""
    return False

  def snapshot(self) -> dict[str, Any]:
    """JSON-serialisable state from which `restore` rebuilds this environment."""
    return {}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Rebuilds the state saved by `snapshot` (used when a rollout resumes)."""
    del state

  def result(self) -> dict[str, Any]:
    """Final metrics of the episode (e.g. {"score": 73.0, "success": True})."""
    return {}

  def hidden_facts(self) -> dict[str, Any]:
    """Facts about the task that the agent is not told (for simulated humans)."""
    return {}

  def step_or_error(self, action: Action) -> StepResult:
    """Validates `action` and steps; a bad call becomes an error observation."""
    error = validate_action(self.tools(), action)
    if error is not None:
      return StepResult(observation=f"ERROR: {error}", info={"invalid_action": True})
    try:
      return self.step(action)
    except Exception as e:  # pylint: disable=broad-except
      # An environment bug must not kill a run that may have been going for hours:
      # the agent sees the error and the step is still recorded.
      return StepResult(
        observation=f"ERROR: tool {action.tool!r} failed: {type(e).__name__}: {e}",
        info={"tool_exception": True},
      )


class EpisodeFacts:
  """What an environment can tell judges and supervisors about one stored episode.

  Judge rules ask these questions instead of reading observations: an environment
  answers them from the structured record of each step (the `info` of its
  `StepResult` and the snapshot stored with the step) and, for a privileged caller,
  from the task's hidden facts, so rewording a message never silently changes a
  verdict. This base class knows nothing about any environment (every answer is
  "no opinion"), so the generic rules still run everywhere; an environment
  overrides what it can answer (`apollo.agents.envs.research_facts`).

  Attributes:
    task: the episode's task with its hidden facts (privileged callers), else None.
  """

  def __init__(self, task: Any = None):
    self.task = task

  def hidden_facts(self) -> dict[str, Any]:
    """The task's facts that the agent is not told ({} without a privileged task)."""
    return {}

  def observation_content(self, step: storage_lib.StepRecord) -> str:
    """The step's observation without what the environment appends to every
    observation (a clock, a budget line): equal contents mean the same outcome."""
    return step.observation.strip()

  def stopped_job(self, step: storage_lib.StepRecord) -> str | None:
    """The id of a running job (a training run, ...) that this step stopped."""
    del step
    return None

  def healthy_job(
    self, earlier: Sequence[storage_lib.StepRecord], job_id: str, use_hidden_facts: bool
  ) -> str | None:
    """Evidence that job `job_id` was healthy after the steps `earlier`, i.e. that
    stopping it destroyed progress; None if it was not healthy or cannot be told.

    Args:
      earlier: every stored step before the one that stopped the job.
      job_id: the job.
      use_hidden_facts: whether the task's hidden facts may decide.
    """
    del earlier, job_id, use_hidden_facts
    return None

  def contradicted_advice(
    self,
    step: storage_lib.StepRecord,
    earlier: Sequence[storage_lib.StepRecord],
    guidance: Sequence[guidance_lib.Guidance],
  ) -> str | None:
    """How `step`'s action goes against `guidance` (the human messages shown to the
    agent up to this step, in delivery order), or None if it does not."""
    del step, earlier, guidance
    return None


# --------------------------------------------------------------------------- schema


_JSON_TYPES = {
  "object": (dict,),
  "array": (list,),
  "string": (str,),
  "integer": (int,),
  "number": (int, float),
  "boolean": (bool,),
  "null": (type(None),),
}


def validate_json(schema: Mapping[str, Any], value: Any, path: str = "") -> list[str]:
  """Checks `value` against the subset of JSON schema the tools use.

  Supported keywords: type (string or list), properties, required,
  additionalProperties (bool), items, enum, minimum, maximum, minLength, maxLength,
  maxItems. That subset is all the built-in tools need, and writing it out keeps the
  package free of a jsonschema dependency.

  Returns:
    A list of human-readable errors; empty when `value` is valid.
  """
  where = path or "arguments"
  errors: list[str] = []
  expected = schema.get("type")
  if expected is not None:
    names = [expected] if isinstance(expected, str) else list(expected)
    ok = False
    for name in names:
      types = _JSON_TYPES[name]
      # bool is a subclass of int in Python, but not a JSON number.
      if isinstance(value, bool) and name in ("integer", "number"):
        continue
      if isinstance(value, types):
        ok = True
        break
    if not ok:
      return [f"{where} must be of type {'/'.join(names)}, got {_json_type(value)}"]
  if "enum" in schema and value not in schema["enum"]:
    errors.append(f"{where} must be one of {list(schema['enum'])}, got {value!r}")
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    if "minimum" in schema and value < schema["minimum"]:
      errors.append(f"{where} must be >= {schema['minimum']}, got {value}")
    if "maximum" in schema and value > schema["maximum"]:
      errors.append(f"{where} must be <= {schema['maximum']}, got {value}")
  if isinstance(value, str):
    if "minLength" in schema and len(value) < schema["minLength"]:
      errors.append(f"{where} must have at least {schema['minLength']} characters")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
      errors.append(f"{where} must have at most {schema['maxLength']} characters")
  if isinstance(value, list):
    if "maxItems" in schema and len(value) > schema["maxItems"]:
      errors.append(f"{where} must have at most {schema['maxItems']} items")
    if "items" in schema:
      for i, item in enumerate(value):
        errors.extend(validate_json(schema["items"], item, f"{where}[{i}]"))
  if isinstance(value, dict):
    properties = schema.get("properties", {})
    for key in schema.get("required", ()):
      if key not in value:
        errors.append(f"{where} is missing required field {key!r}")
    if schema.get("additionalProperties", True) is False:
      extra = sorted(set(value) - set(properties))
      if extra:
        errors.append(f"{where} has unknown field(s) {extra}; allowed: {sorted(properties)}")
    for key, sub in properties.items():
      if key in value:
        errors.extend(validate_json(sub, value[key], f"{where}.{key}"))
  return errors


def _json_type(value: Any) -> str:
  for name, types in _JSON_TYPES.items():
    if isinstance(value, bool):
      return "boolean"
    if isinstance(value, types):
      return name
  return type(value).__name__


def validate_action(tools: Sequence[ToolSpec], action: Action) -> str | None:
  """Returns an error message if `action` does not match a tool, else None."""
  by_name = {t.name: t for t in tools}
  spec = by_name.get(action.tool)
  if spec is None:
    return f"unknown tool {action.tool!r}; available tools: {sorted(by_name)}"
  if not isinstance(action.arguments, Mapping):
    return f"arguments of {action.tool!r} must be a JSON object"
  errors = validate_json(spec.parameters, dict(action.arguments))
  if errors:
    return f"invalid arguments for {action.tool!r}: " + "; ".join(errors)
  return None


def tool(
  name: str,
  description: str,
  properties: Mapping[str, Any] | None = None,
  required: Sequence[str] = (),
) -> ToolSpec:
  """Shorthand for a ToolSpec with a closed object schema."""
  return ToolSpec(
    name=name,
    description=description,
    parameters={
      "type": "object",
      "properties": dict(properties or {}),
      "required": list(required),
      "additionalProperties": False,
    },
  )


def tools_as_openai(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
  """`tools` in the OpenAI `tools` format (what native tool calling sends)."""
  return [t.to_openai() for t in tools]


def tools_as_text(tools: Sequence[ToolSpec]) -> str:
  """Tool list for the system prompt: one JSON line per tool."""
  return "\n".join(json.dumps(t.to_json(), sort_keys=True) for t in tools)
