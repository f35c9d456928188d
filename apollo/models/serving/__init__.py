"""An OpenAI-compatible chat-completions server for the project's decoder.

    loaded = apollo.models.load("smollm2-135m-instruct")
    batcher = DecodeBatcher(loaded.model, max_batch=16)
    app = create_app(loaded, batcher, model_name="smollm2-135m-instruct")
    uvicorn.run(app, host="127.0.0.1", port=8000)   # python -m experiments.serve

Any OpenAI client then talks to it (``base_url="http://127.0.0.1:8000/v1"``):
plain and streamed completions, tools and tool calls, stop strings, seeds, usage.
Concurrent requests decode together in the batcher's shared batch
(:mod:`apollo.models.batching`).

Modules: :mod:`~apollo.models.serving.protocol` (the wire format),
:mod:`~apollo.models.serving.prompts` (request -> prompt tokens, tools adapted to
the template), :mod:`~apollo.models.serving.replies` (tokens -> text, stop
strings, tool calls), :mod:`~apollo.models.serving.app` (the FastAPI app).
"""

from apollo.models.serving.app import APIError, TokenGenerator, create_app

__all__ = ["APIError", "TokenGenerator", "create_app"]
