"""A checkpoint stand-in for native tool-call tests: a tiny ChatML tokenizer with
SmolLM2's kind of template (no tool support) and the Hermes call format, and a
generator that answers with canned text through the batcher's seam."""

import json

from apollo.models import batching, registry
from apollo.models import chat_template as chat_lib

# ChatML without tool support, as SmolLM2's template: the server describes tools in
# the system message and turns tool results into <tool_response> user messages.
CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
  " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hermes(name, **arguments):
  """A reply holding one Hermes-format call."""
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def tiny_checkpoint(directory, name="tiny-chat"):
  """A LoadedModel without weights: enough to render prompts and parse replies."""
  (directory / "config.json").write_text(json.dumps({"eos_token_id": 2}))
  return registry.LoadedModel(
    name=name,
    family="decoder",
    model_type="llama",
    hf_dir=directory,
    model=None,
    tokenizer=chat_lib.train_chat_tokenizer(),
    chat_template=CHATML,
    tokenizer_config={"eos_token": "<|im_end|>"},
    report=None,
    tool_call_format="hermes",
  )


class CannedGenerator:
  """A `TokenGenerator` answering request i with the tokens of `replies[i]` (then the
  last one), recording every request."""

  def __init__(self, tokenizer, replies, max_len=8192):
    self.tokenizer, self.replies, self.max_len = tokenizer, list(replies), max_len
    self.requests: list[batching.GenerationRequest] = []

  def prompt_text(self, i=-1):
    return self.tokenizer.decode(list(self.requests[i].prompt_ids), skip_special_tokens=False)

  def submit(self, request, notify=None):
    gen = batching.Generation(request, notify)
    text = self.replies[min(len(self.requests), len(self.replies) - 1)]
    self.requests.append(request)
    gen.stats.queue_wait_s, gen.stats.batch_rows = 0.0, 1
    for token in self.tokenizer.encode(text, add_special_tokens=False).ids:
      gen.put(token)
    gen.put(request.stop_ids[0])
    gen.finish(batching.STOP)
    return gen

  def stats(self):
    return {}
