"""Every model of the project: encoder and decoder families, HF / GGUF readers,
tokenizers, chat templates and sampling.

``apollo.models.load(name_or_path)`` is the one loading entry (see
:mod:`apollo.models.registry`). It is resolved on first use, so importing one
model module (say the tokenizer, in a data-pipeline worker) does not import them all.
"""

_REGISTRY_NAMES = ("load", "LoadedModel", "NAMED_CHECKPOINTS")


def __getattr__(name: str):
  if name in _REGISTRY_NAMES:
    from apollo.models import registry

    return getattr(registry, name)
  raise AttributeError(f"module 'apollo.models' has no attribute {name!r}")
