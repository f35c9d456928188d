r"""How well a checkpoint predicts a text, in nats per token (printed as the last line).

  python -m experiments.score_text --model=smollm2-135m-instruct --text_file=page.txt
  python -m experiments.score_text --model=runs/pretrain_minilm/hf --text_file=page.txt

A decoder scores every next token. An encoder with a masked-LM head scores a
fixed, seeded 15% of the tokens replaced by the mask token; an encoder without one
(all-MiniLM-L6-v2 as shipped) is refused with a message saying so. The library
side is `apollo.models.inference.nats_per_token`.
"""

import sys

from absl import app, flags

from apollo import models
from apollo.models import inference

_MODEL = flags.DEFINE_string("model", None, "Name, .gguf file or HF directory.", required=True)
_TEXT_FILE = flags.DEFINE_string("text_file", None, "UTF-8 text to score.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the encoder's masked positions.")
_CACHE_DIR = flags.DEFINE_string("model_cache_dir", None, "Where converted checkpoints go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    with open(_TEXT_FILE.value, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise app.UsageError(f"--text_file={_TEXT_FILE.value}: cannot read it as UTF-8 text ({e}).")
  loaded = models.load(_MODEL.value, cache_dir=_CACHE_DIR.value)
  try:
    nats = inference.nats_per_token(loaded, text, seed=_SEED.value)
  except inference.NoMLMHeadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"model={_MODEL.value} tokens_scored_from={_TEXT_FILE.value}")
  print(f"nats_per_token={nats:.4f}")
  return 0


if __name__ == "__main__":
  app.run(main)
