"""A checkpoint stand-in for native tool-call tests: a tiny ChatML tokenizer with
SmolLM2's kind of template (no tool support) and the Hermes call format, and a
generator that answers with canned text through the batcher's seam."""

import json

from flax import nnx

from apollo.models import batching, registry
from apollo.models import chat_template as chat_lib
from apollo.models.llama import model as decoder
from apollo.models.llama import params as llama_params

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


def write_tiny_llama(path, tokenizer, template, max_position_embeddings=128):
  """A tiny random Llama (width 32) written as a HF directory at `path` with
  `tokenizer` and the Jinja `template` (end of turn `<|im_end|>`, id 2); returns `path`
  as a string, for `apollo.models.load`."""
  config = decoder.get_config(
    "tiny",
    vocab_size=tokenizer.get_vocab_size(),
    hidden_size=32,
    intermediate_size=64,
    max_position_embeddings=max_position_embeddings,
  )
  llama_params.export_hf(decoder.Decoder(config, rngs=nnx.Rngs(0)), path)
  hf_config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": 2}))
  chat_lib.ChatTemplate(
    tokenizer, template=template, special_tokens={"eos_token": "<|im_end|>"}
  ).save_pretrained(path)
  return str(path)


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
