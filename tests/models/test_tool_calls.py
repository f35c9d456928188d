"""Tests for apollo.models.tool_calls: each text form parsed, rendered, and broken."""

import json

import pytest

from apollo.models import tool_calls as T

CALLS = [
  T.ToolCall("check_run", {"run_id": "r1"}),
  T.ToolCall("set_config", {"key": "learning_rate", "value": 0.001, "tags": ["a", "b"]}),
]


@pytest.mark.parametrize("fmt", T.FORMATS)
def test_render_then_parse_round_trips(fmt):
  text = "Checking the run first.\n" + T.render(CALLS, fmt)
  parsed = T.parse(text, fmt)
  assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
    (c.name, c.arguments) for c in CALLS
  ]
  assert parsed.errors == [] and parsed.content == "Checking the run first."


def test_hermes_as_qwen_writes_it():
  text = (
    "I will look.\n<tool_call>\n"
    '{"name": "view_file", "arguments": {"path": "train.py"}}\n</tool_call>'
  )
  parsed = T.parse(text, "hermes")
  assert parsed.tool_calls[0].name == "view_file"
  assert parsed.tool_calls[0].arguments == {"path": "train.py"}
  assert parsed.content == "I will look."


def test_hermes_unclosed_call_at_the_end_counts():
  parsed = T.parse('<tool_call>\n{"name": "sleep", "arguments": {"hours": 0.5}}', "hermes")
  assert [c.arguments for c in parsed.tool_calls] == [{"hours": 0.5}]


def test_hermes_string_encoded_arguments():
  body = json.dumps({"name": "sleep", "arguments": json.dumps({"hours": 1})})
  assert T.parse(f"<tool_call>{body}</tool_call>", "hermes").tool_calls[0].arguments == {"hours": 1}


@pytest.mark.parametrize(
  "text, message",
  [
    ('<tool_call>{"name": "sleep", "arguments": {"hours": }}</tool_call>', "invalid JSON"),
    ('<tool_call>{"arguments": {}}</tool_call>', "no tool name"),
    ('<tool_call>{"name": "sleep", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>["sleep"]</tool_call>', "expected a JSON object"),
  ],
)
def test_hermes_malformed_calls_are_errors_not_exceptions(text, message):
  parsed = T.parse(text, "hermes")
  assert parsed.tool_calls == [] and len(parsed.errors) == 1 and message in parsed.errors[0]


def test_glm45_with_thinking_and_typed_values():
  text = (
    "<think>The run may still be training.</think>\n"
    "<tool_call>launch_run\n<arg_key>gpu</arg_key>\n<arg_value>1</arg_value>\n"
    "<arg_key>data</arg_key>\n<arg_value>filtered</arg_value>\n</tool_call>"
  )
  parsed = T.parse(text, "glm45")
  assert parsed.tool_calls[0].name == "launch_run"
  assert parsed.tool_calls[0].arguments == {"gpu": 1, "data": "filtered"}
  assert parsed.reasoning == "The run may still be training." and parsed.content == ""


def test_glm45_malformed():
  assert "no tool name" in T.parse("<tool_call><arg_key>a</arg_key></tool_call>", "glm45").errors[0]
  broken = T.parse("<tool_call>sleep\n<arg_key>hours</arg_key>\n</tool_call>", "glm45")
  assert broken.tool_calls == [] and "unpaired" in broken.errors[0]


def test_json_fallback_form():
  text = 'Reasoning. ```json\n{"tool": "check_run", "arguments": {"run_id": "r2"}}\n```'
  parsed = T.parse(text, "json")
  assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("check_run", {"run_id": "r2"})]
  assert T.parse("no call here", "json").errors == []
  assert T.parse("a { broken", "json").errors == ["no JSON object in the reply"]


def test_openai_form_and_unknown_format():
  entry = CALLS[0].to_openai()
  assert entry["type"] == "function" and json.loads(entry["function"]["arguments"]) == {
    "run_id": "r1"
  }
  assert T.render([entry], "hermes") == T.render([CALLS[0]], "hermes")
  with pytest.raises(ValueError, match="Unknown tool-call format 'xml'"):
    T.parse("", "xml")
