r"""Chat with a checkpoint: renders the prompt with the model's own template, prints the reply.

  python -m experiments.generate --model=smollm2-135m-instruct \
      --prompt="What is the capital of France?"
  python -m experiments.generate --model=/path/to/model.gguf --prompt=... --temperature=0.7

`--model` is a registered name (`smollm2-135m-instruct`), a `.gguf` file, or a local
Hugging Face Llama / Qwen2 directory; conversions are cached (`--model_cache_dir`,
else `$APOLLO_MODEL_CACHE`, else ~/.cache/apollo/models). Decoding is greedy unless
`--temperature` > 0. The library side is `apollo.models.inference.chat_reply`.
"""

from absl import app, flags

from apollo import models
from apollo.models import inference

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Name, .gguf file or HF directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "The user message.", required=True)
_SYSTEM = flags.DEFINE_string("system", None, "A system message (default: the template's).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; else sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (with --temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CACHE_DIR = flags.DEFINE_string("model_cache_dir", None, "Where converted checkpoints go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _MAX_NEW_TOKENS.value < 1:
    raise app.UsageError(f"--max_new_tokens={_MAX_NEW_TOKENS.value} must be at least 1.")
  if _TEMPERATURE.value < 0:
    raise app.UsageError(f"--temperature={_TEMPERATURE.value} must be >= 0.")
  loaded = models.load(_MODEL.value, cache_dir=_CACHE_DIR.value)
  messages = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
  messages.append({"role": "user", "content": _PROMPT.value})
  print(
    inference.chat_reply(
      loaded,
      messages,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value,
      seed=_SEED.value,
    )
  )


if __name__ == "__main__":
  app.run(main)
