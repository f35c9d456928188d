"""apollo.models.chat_template: a checkpoint's own Jinja template (tools, tool calls, tool
results), rendered as transformers renders it, cut into turns for loss masks."""

import json

import jinja2
import numpy as np
import pytest

from apollo.models import chat_template as C

# A Qwen2.5-style template: tools in the system turn, assistant tool calls as
# <tool_call> JSON, tool results as user turns wrapped in <tool_response>.
QWEN25_STYLE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}
{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

TOOLS = [
  {
    "type": "function",
    "function": {
      "name": "check_run",
      "description": "Status of a training run.",
      "parameters": {
        "type": "object",
        "properties": {"run_id": {"type": "string", "description": 'e.g. "r3"'}},
        "required": ["run_id"],
      },
    },
  }
]
MESSAGES = [
  {"role": "system", "content": "You are a research agent. Ünïcode stays as is."},
  {"role": "user", "content": "Is r1 healthy?"},
  {
    "role": "assistant",
    "content": "",
    "tool_calls": [
      {
        "id": "call_1",
        "type": "function",
        "function": {"name": "check_run", "arguments": {"run_id": "r1"}},
      }
    ],
  },
  {"role": "tool", "tool_call_id": "call_1", "content": "run r1: status=running loss=2.31"},
]


def test_tools_and_tool_messages_render():
  text = C.render_jinja(QWEN25_STYLE, MESSAGES, tools=TOOLS, add_generation_prompt=True)
  assert json.dumps(TOOLS[0], ensure_ascii=False) in text  # transformers' tojson: unsorted.
  assert '<tool_call>\n{"name": "check_run", "arguments": {"run_id": "r1"}}\n</tool_call>' in text
  assert "<tool_response>\nrun r1: status=running loss=2.31\n</tool_response>" in text
  assert "Ünïcode" in text and text.endswith("<|im_start|>assistant\n")


def test_without_tools_the_template_takes_its_other_branch():
  text = C.render_jinja(QWEN25_STYLE, MESSAGES[:2], add_generation_prompt=False)
  assert text == (
    "<|im_start|>system\nYou are a research agent. Ünïcode stays as is.<|im_end|>\n"
    "<|im_start|>user\nIs r1 healthy?<|im_end|>\n"
  )


def test_raise_exception_and_the_sandbox():
  with pytest.raises(jinja2.exceptions.TemplateError, match="no system"):
    C.render_jinja("{{ raise_exception('no system') }}", [])
  with pytest.raises(jinja2.exceptions.SecurityError):
    C.render_jinja("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])


def test_token_identical_to_transformers_with_tools():
  transformers = pytest.importorskip("transformers")
  tokenizer = C.train_chat_tokenizer()
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=QWEN25_STYLE)
  expected = hf.apply_chat_template(
    MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False
  )
  if hasattr(expected, "keys"):
    expected = expected["input_ids"]
  text = C.render_jinja(QWEN25_STYLE, MESSAGES, tools=TOOLS, add_generation_prompt=True)
  np.testing.assert_array_equal(tokenizer.encode(text, add_special_tokens=False).ids, expected)


# -----------------------------------------------------------------------------
# ChatTemplate over a template that renders tools: ids, masks, errors
# -----------------------------------------------------------------------------

REPLY = {"role": "assistant", "content": "r1 is running; loss 2.31."}


@pytest.fixture(scope="module")
def qwen25():
  return C.ChatTemplate(C.train_chat_tokenizer(), template=QWEN25_STYLE, tool_call_format="hermes")


def test_support_is_probed_from_the_template():
  assert C.tool_support(QWEN25_STYLE) == C.ToolSupport(tools=True, tool_calls=True, tool_role=True)
  assert C.tool_support(C.CHATML_TEMPLATE) == C.ToolSupport(False, False, False)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_with_tools_is_token_identical_to_transformers(qwen25, add_generation_prompt):
  transformers = pytest.importorskip("transformers")
  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_object=qwen25.tokenizer, chat_template=QWEN25_STYLE
  )
  messages = MESSAGES + [REPLY]
  expected = hf.apply_chat_template(
    messages,
    tools=TOOLS,
    add_generation_prompt=add_generation_prompt,
    tokenize=True,
    return_dict=False,
  )
  if hasattr(expected, "keys"):
    expected = expected["input_ids"]
  rendered = qwen25.render(messages, tools=TOOLS, add_generation_prompt=add_generation_prompt)
  np.testing.assert_array_equal(rendered.ids, expected)
  # OpenAI sends the arguments as a JSON string; they render as the same object.
  as_openai = json.loads(json.dumps(messages))
  as_openai[2]["tool_calls"][0]["function"]["arguments"] = '{"run_id": "r1"}'
  np.testing.assert_array_equal(
    qwen25.render(as_openai, tools=TOOLS, add_generation_prompt=add_generation_prompt).ids,
    expected,
  )


def test_masks_cover_the_tool_call_and_the_end_of_turn(qwen25):
  r = qwen25.render(MESSAGES + [REPLY], tools=TOOLS)
  decode = lambda ids: qwen25.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
  targets = [decode(r.ids[r.loss_mask & (r.segments == s)]) for s in np.unique(r.segments)]
  call = '<tool_call>\n{"name": "check_run", "arguments": {"run_id": "r1"}}\n</tool_call>'
  assert [t for t in targets if t] == [call + "<|im_end|>", REPLY["content"] + "<|im_end|>"]
  assert decode(r.ids[(r.segments == 2) & ~r.loss_mask]) == "<|im_start|>assistant\n\n"
  assert (r.roles[r.segments == 3] == C.ROLE_TOOL).all()
  # Tools are the template's own: in the system turn, not a message of their own.
  assert r.segments.min() == 0 and json.dumps(TOOLS[0], ensure_ascii=False) in decode(r.ids)


def test_consecutive_tool_results_share_one_turn(qwen25):
  second = {"role": "tool", "tool_call_id": "call_2", "content": "run r2: status=failed"}
  messages = MESSAGES + [second, REPLY]
  r = qwen25.render(messages, tools=TOOLS)
  # The template closes the user turn only after the last result, so both results'
  # tokens go to the second; the reply is cut out exactly.
  assert not (r.segments == 3).any() and (r.roles[r.segments == 4] == C.ROLE_TOOL).all()
  decode = lambda ids: qwen25.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
  assert decode(r.ids[r.loss_mask & (r.segments == 5)]) == REPLY["content"] + "<|im_end|>"


def test_a_template_that_is_not_prefix_consistent_is_refused():
  # Marks the last message: a conversation's prefix renders differently from itself.
  marks_last = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if loop.last %} (latest){% endif %}<|im_end|>\n{% endfor %}"
  )
  template = C.ChatTemplate(C.train_chat_tokenizer(), template=marks_last, name="marks-last.jinja")
  with pytest.raises(C.ChatTemplateError, match="marks-last.jinja.*prefix-consistently"):
    template.render(MESSAGES[:2] + [REPLY, {"role": "user", "content": "thanks"}])


def test_template_errors_name_the_template():
  strict = "{% if messages[0].role != 'system' %}{{ raise_exception('no system') }}{% endif %}"
  template = C.ChatTemplate(C.train_chat_tokenizer(), template=strict, name="strict.jinja")
  with pytest.raises(C.ChatTemplateError, match="strict.jinja.*no system"):
    template.render([{"role": "user", "content": "hi"}])
  with pytest.raises(ValueError, match="role"):
    template.render([{"role": "function", "content": "hi"}])
