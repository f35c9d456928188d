"""apollo.models.chat_template.render_jinja: a checkpoint's own template, as transformers
renders it (compared token for token where transformers is installed)."""

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
