r"""An OpenAI-compatible server over the project's decoder, with batched decoding.

  python -m experiments.serve --model=smollm2-135m-instruct --port=8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Any OpenAI client works against ``http://127.0.0.1:8000/v1``; the API and its
schema are at ``/docs``. Concurrent requests share one decode batch of up to
``--max_batch`` rows; ``GET /v1/stats`` reports decode steps/s and queue waits.
``--model`` is a registered name, a ``.gguf`` file or a Hugging Face Llama / Qwen2
directory. The library side is :mod:`apollo.models.serving`.
"""

import os

import uvicorn
from absl import app, flags, logging

from apollo import models
from apollo.models import batching, serving

_MODEL = flags.DEFINE_string("model", "smollm2-135m-instruct", "Name, .gguf file or HF directory.")
_SERVED_NAME = flags.DEFINE_string(
  "served_model_name", None, "The `model` clients send (default: --model)."
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most requests decoded together.")
_MAX_MODEL_LEN = flags.DEFINE_integer(
  "max_model_len", None, "Longest prompt + completion (default: the model's context)."
)
_CACHE_DIR = flags.DEFINE_string("model_cache_dir", None, "Where converted checkpoints go.")
_API_KEY_ENV = flags.DEFINE_string(
  "api_key_env", None, "Name of an environment variable holding the API key clients must send."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  api_key = None
  if _API_KEY_ENV.value:
    api_key = os.environ.get(_API_KEY_ENV.value)
    if not api_key:
      raise app.UsageError(f"--api_key_env={_API_KEY_ENV.value}: that variable is unset or empty.")
  loaded = models.load(_MODEL.value, cache_dir=_CACHE_DIR.value)
  if loaded.family != "decoder":
    raise app.UsageError(f"--model={_MODEL.value} is an encoder ({loaded.model_type}).")
  with batching.DecodeBatcher(
    loaded.model, max_batch=_MAX_BATCH.value, max_len=_MAX_MODEL_LEN.value
  ) as batcher:
    server = serving.create_app(
      loaded, batcher, model_name=_SERVED_NAME.value or _MODEL.value, api_key=api_key
    )
    logging.info("Serving %s on http://%s:%d/v1", _MODEL.value, _HOST.value, _PORT.value)
    uvicorn.run(server, host=_HOST.value, port=_PORT.value, log_level="info")


if __name__ == "__main__":
  app.run(main)
